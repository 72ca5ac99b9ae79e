"""A moto S3 server that counts the requests it serves, per bucket, method and kind of key.

Every process of a job (the driver, Ray's workers) talks to the one server, so counting at the server sees
all of them. Path-style URLs (``http://127.0.0.1:PORT/BUCKET/KEY?QUERY``), as s3fs sends to an endpoint_url.
"""

from __future__ import annotations

import collections
import threading
from urllib.parse import parse_qs

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


def request_kind(method: str, query: str) -> str:
    """GET, PUT, HEAD, DELETE, POST, or LIST (a GET of a bucket listing)."""
    if method == "GET" and "list-type" in parse_qs(query) or method == "GET" and query.startswith("delimiter"):
        return "LIST"
    return method


class RequestCounter:
    """``(bucket, kind, key) → count`` of the requests served, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def add(self, bucket: str, kind: str, key: str) -> None:
        with self._lock:
            self.requests[(bucket, kind, key)] += 1

    def for_bucket(self, bucket: str) -> list[tuple[str, str, int]]:
        """``[(kind, key, count)]`` of one bucket."""
        with self._lock:
            return [(kind, key, n) for (b, kind, key), n in self.requests.items() if b == bucket]


class CountingMotoServer(ThreadedMotoServer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counter = RequestCounter()

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        counter = self.counter

        def counting_app(environ, start_response):
            path = environ.get("PATH_INFO", "").lstrip("/")
            bucket, _, key = path.partition("/")
            counter.add(bucket, request_kind(environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")), key)
            return app(environ, start_response)

        self._server = make_server(self._ip_address, self._port, counting_app, True,
                                   request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()
