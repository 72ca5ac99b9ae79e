"""A fault-injecting S3 endpoint for tests: an HTTP proxy on 127.0.0.1 (a free port) in front of the moto server.

Every request is forwarded to moto unless a rule fires for it. A rule names a fault, a rate, the request kinds it
applies to (GET, PUT, HEAD, LIST, DELETE, POST; ``tests.s3count.request_kind``) and a key prefix
(``"bucket/some/prefix"``: input vs output). The faults:

- ``slowdown``   503 SlowDown, what S3 answers when a prefix is hot (the request never reaches moto)
- ``error``      500 InternalError (never reaches moto)
- ``reset``      the request is carried out by moto, then the connection is reset: a response with a body is cut
                 after half of it (headers promise the whole length), one without a body is never answered
                 (a PUT that took effect, but the client cannot know)
- ``delay``      forwarded after ``delay_s``
- ``forbidden``  403 AccessDenied (a persistent fault: a policy that denies the prefix)
- ``no_bucket``  404 NoSuchBucket (the bucket is gone)

Whether a rule fires is a pure function of (seed, rule, kind, bucket/key, how many times this same request was
made before), not of the order in which concurrent requests arrive, so a run with the same seed sees the same
faults on the same requests, and a failing test can be replayed. The first rule that matches and fires wins.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from tests.s3count import request_kind

Fault = Literal["slowdown", "error", "reset", "delay", "forbidden", "no_bucket"]
FAULTS: tuple[str, ...] = ("slowdown", "error", "reset", "delay", "forbidden", "no_bucket")
ALL_KINDS = frozenset({"GET", "PUT", "HEAD", "LIST", "DELETE", "POST"})
#: The faults a retry can get past.
TRANSIENT: tuple[str, ...] = ("slowdown", "error", "reset", "delay")

_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "error": (500, "InternalError", "We encountered an internal error. Please try again."),
    "forbidden": (403, "AccessDenied", "Access Denied"),
    "no_bucket": (404, "NoSuchBucket", "The specified bucket does not exist"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "expect"}


@dataclass(frozen=True)
class FaultRule:
    """Answer ``fault`` to a ``rate`` share of the requests of ``kinds`` whose ``bucket/key`` starts with ``prefix``."""

    fault: Fault
    rate: float
    kinds: frozenset[str] = ALL_KINDS
    prefix: str = ""
    delay_s: float = 0.2
    limit: int | None = None  # at most this many faults from this rule (1: only the first matching request)
    echo_auth: bool = False  # error messages quote the request's Authorization and token headers (as a careless
    #                          S3-compatible server might): what a secrets test needs an error to carry

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"FaultRule.fault must be one of {FAULTS}, got {self.fault!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"FaultRule.rate must be in [0, 1], got {self.rate}")
        unknown = set(self.kinds) - ALL_KINDS
        if unknown:
            raise ValueError(f"FaultRule.kinds: unknown {sorted(unknown)}; valid: {sorted(ALL_KINDS)}")
        object.__setattr__(self, "kinds", frozenset(self.kinds))

    def matches(self, kind: str, target: str) -> bool:
        return kind in self.kinds and target.startswith(self.prefix.lstrip("/"))


def _uniform(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts``."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def target_of(method: str, raw_path: str) -> tuple[str, str]:
    """``(kind, "bucket/key")`` of a path-style request; a listing's target is ``bucket/<its prefix>``."""
    split = urlsplit(raw_path)
    kind = request_kind(method, split.query)
    path = split.path.lstrip("/")
    if kind == "LIST":
        bucket = path.split("/", 1)[0]
        prefix = parse_qs(split.query).get("prefix", [""])[0]
        return kind, f"{bucket}/{prefix}"
    return kind, path


class FaultProxy:
    """The proxy; ``url`` is its endpoint (give it as ``endpoint_url``). ``rules`` may be replaced while it runs
    (``set_rules``): a fault that starts mid-job. ``injected[(fault, kind)]`` and ``served[kind]`` count what it did."""

    def __init__(self, upstream: str, *, seed: int = 0, rules: tuple[FaultRule, ...] = ()) -> None:
        split = urlsplit(upstream)
        self.upstream = (split.hostname or "127.0.0.1", split.port or 80)
        self.seed = seed
        self._lock = threading.Lock()
        self._rules = tuple(rules)
        self._seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self._fired: collections.Counter[FaultRule] = collections.Counter()
        self.injected: collections.Counter[tuple[str, str]] = collections.Counter()
        self.served: collections.Counter[str] = collections.Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ rules

    def set_rules(self, *rules: FaultRule) -> None:
        with self._lock:
            self._rules = tuple(rules)

    def decide(self, kind: str, target: str) -> FaultRule | None:
        """The rule that fires for this request, if any (counts the request as seen)."""
        with self._lock:
            occurrence = self._seen[(kind, target)]
            self._seen[(kind, target)] += 1
            self.served[kind] += 1
            rules = self._rules
        for index, rule in enumerate(rules):
            if rule.matches(kind, target) and _uniform(self.seed, index, kind, target, occurrence) < rule.rate:
                with self._lock:
                    if rule.limit is not None and self._fired[rule] >= rule.limit:
                        continue
                    self._fired[rule] += 1
                    self.injected[(rule.fault, kind)] += 1
                return rule
        return None

    def faults(self) -> int:
        """Requests answered with a fault other than a delay."""
        with self._lock:
            return sum(n for (fault, _), n in self.injected.items() if fault != "delay")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:  # a reset we caused, or a client that hung up
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_GET(self):
        self._serve()

    do_PUT = do_HEAD = do_POST = do_DELETE = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._body()
        kind, target = target_of(self.command, self.path)
        rule = self.proxy.decide(kind, target)
        fault = rule.fault if rule else None
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            if rule.echo_auth:
                message += (f" (request Authorization: {self.headers.get('Authorization', '')}; "
                            f"X-Amz-Security-Token: {self.headers.get('X-Amz-Security-Token', '')})")
            self._error(status, code, message, target)
            return
        if fault == "delay":
            time.sleep(rule.delay_s)
        status, reason, headers, payload = self._forward(body)
        if fault == "reset":
            self._reset(status, reason, headers, payload)
            return
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, body: bytes):
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command != "HEAD":
                out = [(k, v) for k, v in out if k.lower() != "content-length"]
                out.append(("Content-Length", str(len(payload))))
            return resp.status, resp.reason, out, payload
        finally:
            conn.close()

    def _error(self, status: int, code: str, message: str, target: str) -> None:
        bucket, _, key = target.partition("/")
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}</Message>'
               f"<BucketName>{bucket}</BucketName><Key>{key}</Key><RequestId>faultproxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _reset(self, status, reason, headers, payload: bytes) -> None:
        """Cut the connection with a TCP reset: mid-body when there is a body, else before any answer."""
        if payload and self.command != "HEAD":
            self.send_response(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
        self.close_connection = True
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST, not FIN: what a load balancer that drops the connection sends


__all__ = ["ALL_KINDS", "FAULTS", "TRANSIENT", "FaultProxy", "FaultRule", "target_of"]
