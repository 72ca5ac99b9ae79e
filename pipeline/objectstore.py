"""The S3 filesystem gigaseg uses: s3fs with the retry policy of ``pipeline.retries``, retries counted, and errors
that name the URL.

``pipeline.storage`` builds every S3 filesystem (and every S3 Zarr store) from ``S3FileSystem`` here, so the policy
applies to every read, write, listing and HEAD of a job, in the driver and in the workers. What it adds to s3fs:

- botocore's ``standard`` retry mode with ``retries.ATTEMPTS`` tries (unless ``storage_options`` set
  ``config_kwargs.retries``), and s3fs's own retry loop off (``retries = 1``);
- a GET whose body is cut after the headers is read again (``_cat_file``), the one retry botocore cannot make;
  ranged reads of open files (TIFF) go through the same path (``_RangeFile``);
- each retry counted in ``retries.RETRY_LOG`` against the object's URL (botocore's ``request-created`` event
  tells a retry by its attempt number);
- an error names ``s3://bucket/key`` and the cause; a bucket that is gone is a ``StorageError``, never a
  ``FileNotFoundError``, which Zarr would take for a chunk never written and read as fill values.
"""

from __future__ import annotations

import asyncio
import errno

import s3fs
from fsspec.spec import AbstractBufferedFile

from pipeline.errors import StorageError
from pipeline.retries import ATTEMPTS, RETRY_LOG, backoff_s, botocore_retries

try:  # the errors of a body cut short, as aiohttp and botocore raise them
    from aiohttp import ClientPayloadError
except ImportError:  # pragma: no cover - aiobotocore needs aiohttp
    ClientPayloadError = ConnectionError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError, IncompleteReadError

_TRANSPORT_ERRORS = (HTTPClientError, BotoConnectionError)
_BODY_ERRORS = (ClientPayloadError, HTTPClientError, IncompleteReadError, asyncio.TimeoutError, ConnectionError)
#: Calls for one object; on these a missing bucket must not read as a missing key.
_OBJECT_CALLS = frozenset({"get_object", "put_object", "delete_object", "copy_object", "create_multipart_upload",
                           "upload_part", "complete_multipart_upload"})


def _url(params: dict) -> str:
    return f"s3://{params.get('Bucket', '')}/{params.get('Key', params.get('Prefix', ''))}".rstrip("/")


def _remember_url(params=None, context=None, **_) -> None:
    """``before-parameter-build``: keep the call's URL in its context (the request sees the same dict)."""
    if context is not None and params is not None:
        context["gigaseg_url"] = _url(params)


def _count_retry(request=None, **_) -> None:
    """``request-created``: botocore builds a request for every attempt; attempt 2 and on are retries."""
    context = getattr(request, "context", None) or {}
    if context.get("retries", {}).get("attempt", 1) > 1:
        RETRY_LOG.add(context.get("gigaseg_url") or str(getattr(request, "url", "s3://?")).split("?", 1)[0])


def client_error_code(err: BaseException) -> str | None:
    """The S3 error code (``NoSuchBucket``, ``AccessDenied``, …) behind an error s3fs translated, if any."""
    seen = 0
    while err is not None and seen < 8:
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
        err, seen = err.__cause__, seen + 1
    return None


def named(err: BaseException, url: str, action: str, *, missing_bucket_fails: bool = True) -> BaseException:
    """``err`` with a message that starts with ``url`` and says what failed (same type, so callers catch it as
    before); a transport error botocore gave up on becomes a ``StorageError``; so does a missing bucket when
    ``missing_bucket_fails``. Errors already named are returned as they are."""
    text = str(err)
    if url in text:
        return err
    if missing_bucket_fails and client_error_code(err) == "NoSuchBucket":
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return StorageError(errno.ENOENT, f"{url}: cannot {action}: bucket {bucket!r} does not exist (NoSuchBucket); "
                                          "it was deleted or the endpoint changed. Recreate it or choose another URL")
    if isinstance(err, _TRANSPORT_ERRORS):
        return StorageError(errno.EIO, f"{url}: cannot {action} after {ATTEMPTS} tries: {type(err).__name__}: {text}")
    if not isinstance(err, OSError):
        return err
    reason = err.strerror or text or type(err).__name__
    try:
        return type(err)(err.errno, f"{url}: cannot {action}: {reason}") if err.errno is not None \
            else type(err)(f"{url}: cannot {action}: {reason}")
    except Exception:  # noqa: BLE001 - an OSError subclass with another signature: keep it as it is
        return err


class S3FileSystem(s3fs.S3FileSystem):
    """s3fs's S3 filesystem under gigaseg's retry policy (module docstring)."""

    retries = 1  # s3fs's retry loop: one try (botocore retries the request, ``_cat_file`` a cut body)

    def __init__(self, *args, config_kwargs=None, **kwargs):
        config = dict(config_kwargs or {})
        config.setdefault("retries", botocore_retries())
        super().__init__(*args, config_kwargs=config, **kwargs)

    async def get_s3(self, bucket=None):
        client = await super().get_s3(bucket)
        if client is not None and not getattr(client, "_gigaseg_hooks", False):
            client.meta.events.register("before-parameter-build.s3", _remember_url)
            client.meta.events.register("request-created.s3", _count_retry)
            client._gigaseg_hooks = True
        return client

    async def _call_s3(self, method, *akwarglist, **kwargs):
        try:
            return await super()._call_s3(method, *akwarglist, **kwargs)
        except Exception as err:
            new = named(err, _url(kwargs), method, missing_bucket_fails=method in _OBJECT_CALLS)
            if new is err:
                raise
            raise new from err

    async def _cat_file(self, path, version_id=None, start=None, end=None, **kwargs):
        return await retry_body(
            lambda: super(S3FileSystem, self)._cat_file(path, version_id=version_id, start=start, end=end, **kwargs),
            f"s3://{self._strip_protocol(path)}")

    def _open(self, path, mode="rb", block_size=None, cache_type=None, cache_options=None, size=None, **kwargs):
        if mode != "rb" or kwargs.get("version_id"):
            return super()._open(path, mode, block_size=block_size, cache_type=cache_type,
                                 cache_options=cache_options, size=size, **kwargs)
        return _RangeFile(self, path, mode, block_size=block_size or self.default_block_size,
                          cache_type=cache_type or self.default_cache_type, cache_options=cache_options, size=size)


async def retry_body(read, url: str):
    """``await read()`` (a GET and the read of its body), again while the body is cut short: at most
    ``ATTEMPTS`` tries, waiting ``backoff_s`` between them, each retry counted against ``url``."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await read()
        except _BODY_ERRORS as err:
            if isinstance(err, OSError) and url in str(err):
                raise  # named by _call_s3: a request botocore has retried already
            if attempt == ATTEMPTS:
                raise StorageError(errno.EIO, f"{url}: read cut short {ATTEMPTS} times, giving up: "
                                              f"{type(err).__name__}: {err}") from err
            RETRY_LOG.add(url)
            await asyncio.sleep(backoff_s(attempt))


class _RangeFile(AbstractBufferedFile):
    """A read-only S3 file whose range reads are ``cat_file`` calls, so a cut body is read again as anywhere."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        return self.fs.cat_file(self.path, start=start, end=end)


__all__ = ["S3FileSystem", "client_error_code", "named", "retry_body"]
