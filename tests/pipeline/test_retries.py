"""The retry policy, the retry log, errors that name the URL, and redaction: pure parts, no server."""

from __future__ import annotations

import errno
import logging

import numpy as np
import pytest
import zarr
from botocore.exceptions import ClientError, ConnectionClosedError

from pipeline.errors import StorageError
from pipeline.objectstore import S3FileSystem, named
from pipeline.redact import MASK, RedactingFilter, redact
from pipeline.retries import ATTEMPTS, CAP_S, RetryLog, backoff_s, botocore_retries, under
from pipeline.storage import zarr_store


def test_backoff_is_exponential_with_full_jitter_and_a_cap():
    assert [backoff_s(i, rand=1.0) for i in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 4, 8, 16, CAP_S, CAP_S]
    assert backoff_s(3, rand=0.0) == 0.0 and backoff_s(3, rand=0.5) == 2.0
    assert all(0.0 <= backoff_s(2) <= 2.0 for _ in range(100))
    with pytest.raises(ValueError):
        backoff_s(0)


def test_the_log_hands_over_counts_under_their_roots_once():
    log = RetryLog()
    log.add("s3://b/a.zarr/c/0/0")
    log.add("s3://b/a.zarr/c/0/0")
    log.add("s3://b/a.zarr2/zarr.json")
    log.add("s3://b/_work/lease.json")
    assert log.take(["s3://b/a.zarr/"]) == {"s3://b/a.zarr/c/0/0": 2}  # not a.zarr2: a sibling, not below
    assert log.take(["s3://b/a.zarr"]) == {}
    assert log.take() == {"s3://b/a.zarr2/zarr.json": 1, "s3://b/_work/lease.json": 1}
    assert under("s3://b/x", "s3://b/x") and not under("s3://b/xy", "s3://b/x")


def test_botocore_gets_the_policy_unless_the_options_set_their_own():
    fs = S3FileSystem(endpoint_url="http://127.0.0.1:1", skip_instance_cache=True)
    assert fs.config_kwargs["retries"] == botocore_retries() == {"mode": "standard", "total_max_attempts": ATTEMPTS}
    assert fs.retries == 1, "s3fs's own retry loop is off"
    own = S3FileSystem(endpoint_url="http://127.0.0.1:1", skip_instance_cache=True,
                       config_kwargs={"retries": {"mode": "adaptive", "max_attempts": 2}, "connect_timeout": 3})
    assert own.config_kwargs == {"retries": {"mode": "adaptive", "max_attempts": 2}, "connect_timeout": 3}


def _client_error(code: str, message: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "GetObject")


def test_errors_name_the_url_and_a_missing_bucket_is_not_a_missing_key():
    url = "s3://b/masks/x.zarr/zarr.json"
    missing = FileNotFoundError(errno.ENOENT, "The specified key does not exist.")
    assert isinstance(named(missing, url, "get_object"), FileNotFoundError)
    assert str(named(missing, url, "get_object")).endswith(
        f"{url}: cannot get_object: The specified key does not exist.")

    gone = FileNotFoundError("The specified bucket does not exist")
    gone.__cause__ = _client_error("NoSuchBucket", "The specified bucket does not exist")
    err = named(gone, url, "get_object")
    assert isinstance(err, StorageError) and not isinstance(err, FileNotFoundError)
    assert "bucket 'b' does not exist (NoSuchBucket)" in str(err) and url in str(err)
    assert isinstance(named(gone, url, "list_objects_v2", missing_bucket_fails=False), FileNotFoundError)

    cut = ConnectionClosedError(endpoint_url="http://127.0.0.1:1/b/k")
    assert isinstance(named(cut, url, "put_object"), StorageError)
    assert named(named(missing, url, "x"), url, "x") is not None  # naming twice keeps one URL
    assert str(named(named(missing, url, "x"), url, "x")).count(url) == 1


def test_a_local_write_error_names_the_file(tmp_path):
    store = zarr_store(str(tmp_path / "g.zarr"))
    arr = zarr.create_array(store=store, shape=(4, 4), chunks=(2, 2), dtype="uint8")
    (tmp_path / "g.zarr" / "c").write_bytes(b"")  # a file where the chunk directory must go
    with pytest.raises(OSError) as err:
        arr[:] = np.ones((4, 4), np.uint8)
    assert str(tmp_path / "g.zarr" / "c") in str(err.value) and "cannot write" in str(err.value)


def test_redaction_masks_signatures_and_credentials_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abcdefghijklmnopqrstuvwxyz0123456789ABCD")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "short")  # too short to mask: a word, not a key
    url = ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAXX%2F2026&"
           "X-Amz-Signature=deadbeef&X-Amz-Security-Token=tok123")
    out = redact(f"cannot read {url}: secret abcdefghijklmnopqrstuvwxyz0123456789ABCD, key short")
    assert "deadbeef" not in out and "AKIAXX" not in out and "tok123" not in out and "abcdefghij" not in out
    assert f"X-Amz-Signature={MASK}" in out and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out and "key short" in out
    assert redact("Authorization: AWS4-HMAC-SHA256 Credential=AKIA1/x, Signature=ff00") == \
        f"Authorization: AWS4-HMAC-SHA256 Credential={MASK}, Signature={MASK}"

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "reading %s", (url,), None)
    try:
        raise OSError(f"denied: {url}")
    except OSError as e:
        record.exc_info = (type(e), e, e.__traceback__)
    assert RedactingFilter().filter(record)
    assert "deadbeef" not in record.getMessage() and "deadbeef" not in record.exc_text
