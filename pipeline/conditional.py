"""Conditional writes: a small file replaced only if it is still the version read (the output lease,
``pipeline.output.lease``).

S3: PutObject with ``If-None-Match: *`` (create only) or ``If-Match: <ETag>`` (replace only that version), which S3
and moto (5.x) check on the server. Locally: the check and the write under an exclusive ``flock`` of
``<path>.lock``, which the kernel releases when its holder dies. Other protocols: check then write, not atomic.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from typing import Any

from fsspec.asyn import sync

from pipeline.objectstore import S3FileSystem, client_error_code, retry_body
from pipeline.storage import _named_local, filesystem, fs_path, is_local, local_path, write_bytes


def read_versioned(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[bytes, str] | None:
    """``(content, version)`` of the file at ``url``, or None when there is none. The version is the ETag on S3,
    inode, size and mtime locally: what ``write_if`` compares."""
    if is_local(url):
        path = os.path.abspath(local_path(url))
        try:
            with open(path, "rb") as f:
                return f.read(), _local_version(os.fstat(f.fileno()))
        except FileNotFoundError:
            return None
    fs = filesystem(url, storage_options)
    if isinstance(fs, S3FileSystem):
        try:
            return sync(fs.loop, _s3_get_with_etag, fs, fs_path(url))
        except FileNotFoundError:
            return None
    try:
        data = fs.cat_file(fs_path(url))
    except FileNotFoundError:
        return None
    return data, str(fs.info(fs_path(url)).get("ETag") or fs.ukey(fs_path(url)))


async def _s3_get_with_etag(fs: S3FileSystem, path: str) -> tuple[bytes, str]:
    bucket, key, _ = fs.split_path(path)

    async def get():
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await resp["Body"].read(), resp["ETag"]
        finally:
            resp["Body"].close()

    return await retry_body(get, f"s3://{path}")


def write_if(url: str, data: bytes, version: str | None,
             storage_options: Mapping[str, Any] | None = None) -> str | None:
    """Write ``data`` at ``url`` only if the file there is still ``version`` (None: only if there is none).
    Returns the new version, or None when the condition failed (someone else wrote or removed it)."""
    if is_local(url):
        path = os.path.abspath(local_path(url))
        with _local_mutex(path):
            current = read_versioned(url)
            if (current[1] if current else None) != version:
                return None
            write_bytes(url, data)
            return read_versioned(url)[1]
    fs = filesystem(url, storage_options)
    if isinstance(fs, S3FileSystem):
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            out = fs.pipe_file(fs_path(url), data, **condition)
        except (FileExistsError, FileNotFoundError):
            return None  # If-None-Match failed (FileExistsError), or If-Match on a removed object
        except OSError as err:
            if client_error_code(err) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise
        return (out or {}).get("ETag") or read_versioned(url, storage_options)[1]
    current = read_versioned(url, storage_options)
    if (current[1] if current else None) != version:
        return None
    write_bytes(url, data, storage_options)
    return read_versioned(url, storage_options)[1]


def delete_if(url: str, version: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Remove the file at ``url`` if it is still ``version``; whether it did."""
    if is_local(url):
        path = os.path.abspath(local_path(url))
        with _local_mutex(path):
            current = read_versioned(url)
            if current is None or current[1] != version:
                return False
            os.unlink(path)
            return True
    current = read_versioned(url, storage_options)
    if current is None or current[1] != version:
        return False  # S3 has no conditional delete everywhere (moto 5.2 ignores If-Match on DELETE): check first
    filesystem(url, storage_options).rm_file(fs_path(url))
    return True


def _local_version(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


@contextlib.contextmanager
def _local_mutex(path: str) -> Iterator[None]:
    """An exclusive ``flock`` of ``<path>.lock`` (created if needed), released when the block ends or the process
    dies."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as err:
        raise _named_local(err, f"{path}.lock", "create") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


__all__ = ["delete_if", "read_versioned", "write_if"]
