"""fsspec URLs → filesystems and Zarr stores.

Every path in gigaseg is a URL: a local path, ``file://``, ``s3://bucket/prefix`` or any fsspec protocol.
``storage_options`` are passed to fsspec unchanged (``endpoint_url`` for S3-compatible stores goes under
``client_kwargs`` or at the top level, as s3fs accepts both). Credentials are never part of them: fsspec
reads them from the environment or the standard config files.

S3 filesystems and stores are ``pipeline.objectstore.S3FileSystem``: s3fs under the retry policy of
``pipeline.retries``. Writes conditional on a file's version (the output lease) are in ``pipeline.conditional``. Writes are whole or absent: locally a temp file and a rename (``write_bytes``; Zarr's
``LocalStore`` does the same for chunks and metadata), on object stores one PUT, which S3 makes visible whole or
not at all. Errors name the file or object and the cause.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import zarr
from zarr.storage import FsspecStore

from pipeline.objectstore import S3FileSystem

_LOCAL_PROTOCOLS = {"file", "local"}
#: Filesystem classes gigaseg builds itself (the rest come from fsspec's registry).
_FILESYSTEMS: dict[str, type] = {"s3": S3FileSystem, "s3a": S3FileSystem}


def protocol_of(url: str) -> str:
    """The fsspec protocol of ``url`` (``"file"`` for plain paths)."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0]


def is_local(url: str) -> bool:
    return protocol_of(url) in _LOCAL_PROTOCOLS


def local_path(url: str) -> str:
    """Plain filesystem path of a local URL (``file:///a/b`` → ``/a/b``)."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return url


def join(url: str, *parts: str) -> str:
    """Join URL path parts with ``/`` whatever the protocol (never ``os.path.join`` on URLs)."""
    out = url.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


# Defaults gigaseg sets per protocol unless the spec's storage_options say otherwise. s3fs reads a whole
# object with a HEAD (its size) then a GET, to split objects larger than its block size into concurrent
# range GETs; Zarr chunks are a few MB at most, so that HEAD doubles the requests per chunk for nothing:
# with max_concurrency 1 a chunk read is one GET (benchmarks/s3_requests.py counts them).
_PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {"s3": {"max_concurrency": 1}, "s3a": {"max_concurrency": 1}}


def effective_options(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``storage_options`` with the protocol's defaults (``_PROTOCOL_DEFAULTS``) filled in where absent."""
    return {**_PROTOCOL_DEFAULTS.get(protocol_of(url), {}), **dict(storage_options or {})}


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem serving ``url``."""
    protocol = protocol_of(url)
    if protocol in _LOCAL_PROTOCOLS:
        return fsspec.filesystem("file")
    if protocol in _FILESYSTEMS:
        return _FILESYSTEMS[protocol](**effective_options(url, storage_options))
    return fsspec.filesystem(protocol, **effective_options(url, storage_options))


def fs_path(url: str) -> str:
    """The path form fsspec filesystems expect (protocol stripped; HTTP(S) URLs, a presigned one for instance,
    stay whole: fsspec's HTTP filesystem takes them so)."""
    if is_local(url):
        return os.path.abspath(local_path(url))
    if protocol_of(url) in ("http", "https"):
        return url
    return url.split("://", 1)[1]


def zarr_store(url: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = False):
    """A Zarr v3 store for ``url``.

    Local URLs get ``LocalStore`` (writes are temp file + rename, so a killed writer never leaves a torn
    chunk; errors name the file); S3 gets ``FsspecStore`` over gigaseg's ``S3FileSystem`` (object PUTs are
    atomic), other protocols an ``FsspecStore`` over fsspec's async filesystem.
    """
    if is_local(url):
        path = os.path.abspath(local_path(url))
        if not read_only:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as err:
                raise _named_local(err, path, "create the directory") from err
        return LocalStore(path, read_only=read_only)
    protocol = protocol_of(url)
    if protocol in _FILESYSTEMS:
        fs = _FILESYSTEMS[protocol](asynchronous=True, **effective_options(url, storage_options))
        return FsspecStore(fs=fs, path=fs_path(url), read_only=read_only)
    return FsspecStore.from_url(url, storage_options=effective_options(url, storage_options), read_only=read_only)


def _named_local(err: OSError, path: str | Path, action: str) -> OSError:
    """``err`` (same type and errno) with a message naming ``path`` and what failed."""
    if str(err).startswith(str(path)) or err.errno is None:
        return err
    return type(err)(err.errno, f"{path}: cannot {action}: {err.strerror or err}")


class LocalStore(zarr.storage.LocalStore):
    """Zarr's ``LocalStore`` (each write a temp file renamed over the key: ``zarr/storage/_local.py``,
    ``_atomic_write``) whose write errors name the file and the cause (disk full, read-only, permission)."""

    async def set(self, key: str, value) -> None:
        try:
            await super().set(key, value)
        except OSError as err:
            raise _named_local(err, self.root / key, "write") from err

    def set_sync(self, key: str, value) -> None:
        try:
            super().set_sync(key, value)
        except OSError as err:
            raise _named_local(err, self.root / key, "write") from err


def open_group(url: str, storage_options: Mapping[str, Any] | None = None, *, mode: str = "r") -> zarr.Group:
    return zarr.open_group(store=zarr_store(url, storage_options, read_only=mode == "r"), mode=mode)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    return filesystem(url, storage_options).exists(fs_path(url))


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove ``url`` (a file or a whole tree) if it is there."""
    fs = filesystem(url, storage_options)
    path = fs_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


class AuditStore(zarr.storage.WrapperStore):
    """A store that appends ``<writer>\\t<key>`` to a log file for every key it writes.

    Keys are logged under ``root`` (the store's URL) so logs from many stores can be compared. Used by
    tests and ``--audit-writes`` to check on a real run that no two tasks write the same chunk:
    each writer (a worker actor or the blend) logs under its own name, and the check reads all logs.
    """

    def __init__(self, store, log_path: str, writer: str, root: str):
        super().__init__(store)
        self._log_path = log_path
        self._writer = writer
        self._root = root.rstrip("/")

    def _record(self, key: str) -> None:
        with open(self._log_path, "a") as f:
            f.write(f"{self._writer}\t{self._root}/{key}\n")

    async def set(self, key, value) -> None:
        self._record(key)
        await self._store.set(key, value)

    async def set_if_not_exists(self, key, value) -> None:
        self._record(key)
        await self._store.set_if_not_exists(key, value)

    def with_read_only(self, read_only: bool = False):
        return AuditStore(self._store.with_read_only(read_only), self._log_path, self._writer, self._root)


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole file at ``url`` (``FileNotFoundError`` when it is not there): one GET on object stores
    (``cat_file``; opening the file would ask for its size first)."""
    return filesystem(url, storage_options).cat_file(fs_path(url))


def read_json(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The JSON document at ``url``, or None when there is none."""
    try:
        return json.loads(read_bytes(url, storage_options))
    except FileNotFoundError:
        return None


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Whole-file write that readers never see half done. Locally: a temp file in the same directory, then
    ``os.replace`` (a writer killed midway leaves at most a hidden ``.<name>.*.tmp``, never a short file under
    ``url``'s name). Object stores: one PUT, which S3 and its peers make visible whole or not at all."""
    if is_local(url):
        path = os.path.abspath(local_path(url))
        try:
            _write_local(path, data)
        except OSError as err:
            raise _named_local(err, path, "write") from err
        return
    filesystem(url, storage_options).pipe_file(fs_path(url), data)


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_once(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Make ``url`` hold exactly ``data``: written (``write_bytes``) unless a file with these bytes is there
    already. A different file under the name (cut short by a killed copy of an older version, or corrupted)
    is replaced, never trusted. Returns whether it wrote."""
    try:
        if read_bytes(url, storage_options) == data:
            return False
    except FileNotFoundError:
        pass
    write_bytes(url, data, storage_options)
    return True


def write_json(url: str, data: Any, storage_options: Mapping[str, Any] | None = None) -> None:
    write_bytes(url, json.dumps(data, indent=2).encode(), storage_options)
