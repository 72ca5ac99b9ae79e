"""The fault-injecting S3 endpoint (``tests/faults_s3.py``) in front of the session's moto server: each fault does
what it says, rules select request kinds and prefixes, and a seed replays the same faults on the same requests."""

from __future__ import annotations

import http.client
import time

import pytest

from tests.faults_s3 import FaultProxy, FaultRule, target_of

pytestmark = pytest.mark.integration


#: moto answers anonymous GETs with 403; it reads the key id from the header and checks no signature.
AUTH = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, "
                         "SignedHeaders=host, Signature=0"}


def _connect(proxy: FaultProxy) -> http.client.HTTPConnection:
    host, port = proxy.url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def _request(proxy: FaultProxy, method: str, path: str, body: bytes | None = None):
    """``(status, headers, body)`` of one request, or the exception the connection raised."""
    conn = _connect(proxy)
    try:
        conn.request(method, path, body=body, headers=AUTH)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    except (http.client.HTTPException, OSError) as err:
        return err
    finally:
        conn.close()


@pytest.fixture
def proxy(s3_endpoint):
    with FaultProxy(s3_endpoint, seed=7) as p:
        yield p


def test_without_rules_requests_pass_through(proxy, s3_bucket):
    bucket, _ = s3_bucket
    assert _request(proxy, "PUT", f"/{bucket}/a/x", b"hello")[0] == 200
    status, _, body = _request(proxy, "GET", f"/{bucket}/a/x")
    assert (status, body) == (200, b"hello")
    status, headers, _ = _request(proxy, "HEAD", f"/{bucket}/a/x")
    assert status == 200 and headers["Content-Length"] == "5"
    status, _, listing = _request(proxy, "GET", f"/{bucket}?list-type=2&prefix=a/")
    assert status == 200 and b"<Key>a/x</Key>" in listing
    assert proxy.faults() == 0 and proxy.served == {"PUT": 1, "GET": 1, "HEAD": 1, "LIST": 1}


@pytest.mark.parametrize("fault,status,code", [
    ("slowdown", 503, b"SlowDown"), ("error", 500, b"InternalError"), ("forbidden", 403, b"AccessDenied"),
    ("no_bucket", 404, b"NoSuchBucket")])
def test_error_faults_answer_instead_of_the_store(proxy, s3_bucket, fault, status, code):
    bucket, _ = s3_bucket
    proxy.set_rules(FaultRule(fault, 1.0, frozenset({"PUT", "GET"})))
    got = _request(proxy, "PUT", f"/{bucket}/k", b"data")
    assert got[0] == status and b"<Code>" + code + b"</Code>" in got[2]
    proxy.set_rules()
    assert _request(proxy, "GET", f"/{bucket}/k")[0] == 404, "the faulted PUT never reached the store"
    assert proxy.injected[(fault, "PUT")] == 1


def test_reset_cuts_a_body_and_a_put_takes_effect_unanswered(proxy, s3_bucket):
    bucket, _ = s3_bucket
    payload = bytes(range(256)) * 40
    assert _request(proxy, "PUT", f"/{bucket}/big", payload)[0] == 200
    proxy.set_rules(FaultRule("reset", 1.0, frozenset({"GET", "PUT"})))
    conn = _connect(proxy)
    conn.request("GET", f"/{bucket}/big", headers=AUTH)
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(payload)
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        resp.read()  # half the body, then a reset
    conn.close()
    got = _request(proxy, "PUT", f"/{bucket}/written", b"new")
    assert isinstance(got, (ConnectionError, http.client.RemoteDisconnected)), got
    proxy.set_rules()
    assert _request(proxy, "GET", f"/{bucket}/written")[2] == b"new", "the PUT was carried out before the reset"


def test_delay_holds_a_request_then_serves_it(proxy, s3_bucket):
    bucket, _ = s3_bucket
    proxy.set_rules(FaultRule("delay", 1.0, frozenset({"PUT"}), delay_s=0.3))
    t0 = time.monotonic()
    assert _request(proxy, "PUT", f"/{bucket}/slow", b"x")[0] == 200
    assert time.monotonic() - t0 >= 0.3
    assert proxy.injected[("delay", "PUT")] == 1 and proxy.faults() == 0


def test_rules_select_request_kinds_and_prefixes(proxy, s3_bucket):
    bucket, _ = s3_bucket
    proxy.set_rules(FaultRule("forbidden", 1.0, frozenset({"PUT", "LIST"}), prefix=f"{bucket}/out/"))
    assert _request(proxy, "PUT", f"/{bucket}/in/a", b"1")[0] == 200
    assert _request(proxy, "PUT", f"/{bucket}/out/a", b"1")[0] == 403
    assert _request(proxy, "GET", f"/{bucket}/out/a")[0] == 404  # GETs of out/ pass (nothing written there)
    assert _request(proxy, "GET", f"/{bucket}?list-type=2&prefix=out/")[0] == 403
    assert _request(proxy, "GET", f"/{bucket}?list-type=2&prefix=in/")[0] == 200
    assert target_of("GET", f"/{bucket}?list-type=2&prefix=out/x&delimiter=/") == ("LIST", f"{bucket}/out/x")


def test_a_seed_replays_the_same_faults_on_the_same_requests(s3_endpoint, s3_bucket):
    bucket, _ = s3_bucket
    rule = FaultRule("error", 0.3, frozenset({"GET"}))
    paths = [f"/{bucket}/k{i % 40}" for i in range(120)]  # each key three times: occurrences count

    def faulted(seed: int, order: list[str]) -> set[tuple[str, int]]:
        with FaultProxy(s3_endpoint, seed=seed, rules=(rule,)) as p:
            seen: dict[str, int] = {}
            out = set()
            for path in order:
                seen[path] = seen.get(path, 0) + 1
                if _request(p, "GET", path)[0] == 500:
                    out.add((path, seen[path]))
            return out

    first = faulted(3, paths)
    assert faulted(3, list(reversed(paths))) == first, "the same seed faults the same requests in any order"
    assert faulted(4, paths) != first
    assert 12 <= len(first) <= 60  # 30 % of 120, loosely
