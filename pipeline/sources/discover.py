"""Find the images of an archive with fsspec: files by extension, Zarr arrays and groups by their metadata.

Discovery lists directories only: it stops at each Zarr (never lists chunk keys) and reads no pixels.
``ImageRef.name`` is the image's path relative to the archive URL, without its extension, made a safe
single path component (``/`` → ``__``, other unsafe characters → ``_``) and unique (``-2``, ``-3``, … in
sorted order).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipeline import ome
from pipeline.errors import InputNotFoundError, UnsupportedImageError
from pipeline.sources.slides import SLIDE_SUFFIXES
from pipeline.storage import filesystem, fs_path, join, protocol_of

log = logging.getLogger(__name__)

ImageFormat = Literal["zarr", "ome-zarr", "tiff", "png", "jpeg", "slide"]
_FILE_FORMATS = {".tif": "tiff", ".tiff": "tiff", ".btf": "tiff", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg",
                 **dict.fromkeys(SLIDE_SUFFIXES, "slide")}
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
_STRIP_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".ome.btf", ".zarr", *_FILE_FORMATS)


@dataclass(frozen=True)
class ImageRef:
    """One image of an archive: its URL, a unique file-safe ``name`` and its format."""

    url: str
    name: str
    format: ImageFormat




def discover(
    url: str, patterns: Sequence[str] = ("**/*",), storage_options: Mapping[str, Any] | None = None
) -> list[ImageRef]:
    """Images under ``url`` (a directory/prefix, a single image file, or a single Zarr), sorted by URL.

    Images are ``.tif/.tiff/.btf/.png/.jpg/.jpeg`` files, whole-slide images (``SLIDE_SUFFIXES``: ``.svs``,
    ``.ndpi``, ``.mrxs``, …, read through OpenSlide) and Zarr arrays/groups (a directory holding
    ``zarr.json``, ``.zarray`` or ``.zgroup``; never descended into). A pattern without ``/`` matches the name
    at any depth (``"*.tif"``); one with ``/`` matches the path relative to ``url``, ``**`` spanning
    directories (``"tiles/**/*.zarr"``). Patterns are ignored when ``url`` is itself one image. Hidden
    entries (``.name``) are skipped.
    """
    fs = filesystem(url, storage_options)
    root = fs_path(url).rstrip("/")
    fs.invalidate_cache(root)
    try:
        info = fs.info(root)
    except (FileNotFoundError, PermissionError) as exc:
        raise InputNotFoundError(_missing_message(url, fs, root, exc)) from None
    if info["type"] != "directory":
        fmt = _file_format(root)
        if fmt is None:
            raise UnsupportedImageError(
                f"{url}: not an image file gigaseg reads (extensions {sorted(_FILE_FORMATS)} or a Zarr); "
                f"point inputs.url at the image or at a directory holding images."
            )
        return [ImageRef(url, _safe_name(root.rsplit("/", 1)[-1]), fmt)]

    matchers = [_compile_pattern(p) for p in patterns]
    found: list[tuple[str, ImageFormat]] = []
    skipped: list[str] = []
    others: list[str] = []
    for dirpath, dirs, files in fs.walk(root, topdown=True):
        rel_dir = dirpath[len(root) :].strip("/")
        zfmt = _zarr_format(fs, dirpath, files) if any(m in files for m in _ZARR_MARKERS) else None
        if zfmt is not None:
            dirs.clear()
            if not rel_dir:
                return [ImageRef(url, _safe_name(root.rsplit("/", 1)[-1]), zfmt)]
            (found if _matches(rel_dir, matchers) else skipped).append((rel_dir, zfmt))
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            fmt = _file_format(name)
            if fmt is None:
                others.append(rel)
            else:
                (found if _matches(rel, matchers) else skipped).append((rel, fmt))
    if not found:
        raise InputNotFoundError(
            f"{url}: no image matched patterns {list(patterns)}; found {len(skipped)} other image(s) "
            f"{_sample([r for r, _ in skipped])} and {len(others)} non-image file(s) {_sample(others)}. "
            f"Fix inputs.patterns (a pattern without '/' matches names at any depth, '**' spans directories)."
        )
    refs = sorted((join(url, rel), rel, fmt) for rel, fmt in found)
    used: set[str] = set()
    out = []
    for ref_url, rel, fmt in refs:
        name = base = _safe_name(rel)
        k = 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        out.append(ImageRef(ref_url, name, fmt))
    return out


def _missing_message(url: str, fs: Any, root: str, exc: Exception) -> str:
    reason = "access denied" if isinstance(exc, PermissionError) else "does not exist"
    if protocol_of(url) in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        bucket, _, prefix = root.partition("/")
        try:
            bucket_ok = fs.exists(bucket)
        except Exception:  # noqa: BLE001 - only refines the message
            bucket_ok = None
        if bucket_ok is False:
            return f"{url}: bucket {bucket!r} {reason} (or is not visible with these credentials/endpoint)."
        if bucket_ok and prefix:
            return f"{url}: bucket {bucket!r} exists but prefix {prefix!r} {reason}; check inputs.url."
    return f"{url}: input {reason}; check inputs.url (and storage_options for remote stores)."


def _sample(items: Sequence[str], k: int = 5) -> str:
    return "(" + ", ".join(items[:k]) + (", ..." if len(items) > k else "") + ")" if items else "()"


def _file_format(name: str) -> ImageFormat | None:
    dot = name.rfind(".")
    return _FILE_FORMATS.get(name[dot:].lower()) if dot >= 0 else None  # type: ignore[return-value]


def _zarr_format(fs: Any, dirpath: str, files: Sequence[str]) -> ImageFormat:
    """``"ome-zarr"`` when the group's attributes hold OME multiscales, else ``"zarr"``."""
    try:
        if "zarr.json" in files:
            meta = json.loads(fs.cat_file(f"{dirpath}/zarr.json"))
            attrs = meta.get("attributes", {}) if meta.get("node_type") == "group" else {}
        elif ".zgroup" in files and ".zattrs" in files:
            attrs = json.loads(fs.cat_file(f"{dirpath}/.zattrs"))
        else:
            attrs = {}
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable Zarr metadata (%s); treated as a plain Zarr", dirpath, exc)
        return "zarr"
    return "ome-zarr" if ome.is_multiscales(attrs) else "zarr"


def _compile_pattern(pattern: str) -> tuple[bool, re.Pattern[str]]:
    """Glob → regex: ``**/`` any directories (or none), ``**`` anything, ``*``/``?`` within one component."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (j := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "/" in pattern, re.compile("".join(out))


def _matches(rel: str, matchers: Sequence[tuple[bool, re.Pattern[str]]]) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return any(rx.fullmatch(rel if has_slash else base) for has_slash, rx in matchers)


def _safe_name(rel: str) -> str:
    """Relative path → one file-safe component: extension dropped, ``/`` → ``__``, others → ``_``."""
    low = rel.lower()
    for suffix in _STRIP_SUFFIXES:
        if low.endswith(suffix) and len(rel) > len(suffix):
            rel = rel[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", rel.replace("/", "__")) or "image"



