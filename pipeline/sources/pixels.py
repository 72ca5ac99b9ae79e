"""Lazy pixels of an ``ImageSource`` (described by ``pipeline.sources``): a ``(C, H, W)`` uint8 Dask array (``C``: 3
for RGB, else one per ``inputs.bands``) read
chunk by chunk, so memory stays flat however large the image, except for PNG/JPEG, which have no random
access and are decoded whole, once (``sources.MAX_DECODE_PIXELS``).
"""

from __future__ import annotations

import io
import threading
import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
import tifffile
import zarr
from PIL import Image

from models.errors import GigasegError
from pipeline.errors import ImageReadError
from pipeline.sources.convert import to_uint8
from pipeline.sources.formats import ImageSource, native_dtype, open_tiff_file, pil_mode, spatial_shape
from pipeline.sources.slides import SlideLevel
from pipeline.storage import filesystem, fs_path, join, zarr_store

_READ_BUDGET_BYTES = 64 * 2**20  # largest block read at once when storage chunks are strips


class LazyLevel:
    """Array-like over one Zarr array or one TIFF pyramid level, opened on first use in each process.

    It holds a URL and ``storage_options`` only, so Dask pickles it as it is; the open handle is per process
    and shared by the scheduler's threads (zarr 3 arrays are thread-safe, and tifffile's Zarr store locks its
    file handle around each seek + read).
    """

    def __init__(self, url: str, storage_options: dict, tiff_level: int | None) -> None:
        self.url, self.storage_options, self.tiff_level = url, storage_options, tiff_level
        self._lock = threading.Lock()
        self._handle: tuple | None = None
        arr = self.array()
        self.shape, self.chunks = tuple(arr.shape), tuple(arr.chunks)
        self.dtype, self.ndim = np.dtype(native_dtype(arr.dtype)), len(arr.shape)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_handle")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _handle=None)

    def __dask_tokenize__(self) -> tuple:
        return ("gigaseg-level", self.url, self.tiff_level, self.shape, self.dtype.str)

    def array(self) -> Any:
        with self._lock:
            if self._handle is None:
                if self.tiff_level is None:
                    store = zarr_store(self.url, self.storage_options, read_only=True)
                    self._handle = (zarr.open_array(store=store, mode="r"),)
                else:
                    fh = open_tiff_file(self.url, self.storage_options)
                    tif = tifffile.TiffFile(fh)
                    store = tif.series[0].aszarr(level=self.tiff_level)
                    self._handle = (fh, tif, zarr.open_array(store=store, mode="r"))
            return self._handle[-1]

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            block = self.array()[key]
        except Exception as exc:  # noqa: BLE001 - reported with the image and window
            parts = key if isinstance(key, tuple) else (key,)
            window = ", ".join(f"{k.start}:{k.stop}" if isinstance(k, slice) else str(k) for k in parts)
            raise ImageReadError(
                f"{self.url}: reading window [{window}] failed ({type(exc).__name__}: {exc}); the image may be "
                f"truncated or corrupt, or a codec may be missing (tifffile needs imagecodecs)."
            ) from exc
        return np.asarray(block, dtype=self.dtype)


def read_chunks_yx(
    storage_yx: tuple[int, int],
    shape_yx: tuple[int, int],
    chunk: int,
    bytes_per_pixel: int,
    budget: int = _READ_BUDGET_BYTES,
) -> tuple[int, int]:
    """Block (ry, rx) to read so that storage chunks (cy, cx) are decoded once.

    Per axis ``r = min(n, c · max(1, chunk // c))``: a multiple of the storage chunk near ``chunk``, or the
    storage chunk itself when larger (strips, whole-page TIFFs). If ``ry · rx · bytes_per_pixel > budget``,
    the axis whose storage chunk is ≤ ``chunk`` is thinned to the largest multiple of it that fits; if still
    over, both fall back to ``min(r, chunk)`` and an oversized storage chunk is decoded once per block.
    """
    r = [min(n, c * max(1, chunk // c)) for c, n in zip(storage_yx, shape_yx, strict=True)]
    for a, o in ((0, 1), (1, 0)):
        if r[0] * r[1] * bytes_per_pixel > budget and storage_yx[o] > chunk >= storage_yx[a]:
            fit = budget // (r[o] * bytes_per_pixel) // storage_yx[a] * storage_yx[a]
            r[a] = max(min(storage_yx[a], shape_yx[a]), min(r[a], fit))
    if r[0] * r[1] * bytes_per_pixel > budget:
        r = [min(x, chunk) for x in r]
    return r[0], r[1]


def _decode_pil(url: str, storage_options: dict) -> np.ndarray:
    """Whole PNG/JPEG → ``(C, H, W)`` in the dtype ``_pil_meta`` announced (native byte order)."""
    try:
        data = filesystem(url, storage_options).cat_file(fs_path(url))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                target, _, dtype = pil_mode(im.mode, im.info, url)
                a = np.asarray(im.convert(target) if target else im)
    except GigasegError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"{url}: decoding failed ({type(exc).__name__}: {exc}); re-export the image.") from exc
    a = a.astype(dtype, copy=False)
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


def level_reader(source: ImageSource, level: int = 0) -> tuple[Any, str]:
    """An array-like over one level of a Zarr, TIFF or slide source, in its own dtype and ``axes`` (returned too):
    ``LazyLevel`` or ``SlideLevel``, read window by window. PNG/JPEG have none (no random access)."""
    url, so, path = source.ref.url, source.storage_options, source.levels[level].path
    if source.ref.format == "tiff":
        return LazyLevel(url, so, int(path)), source.axes
    if source.ref.format == "slide":
        return SlideLevel(url, int(path)), source.axes
    if source.ref.format in ("zarr", "ome-zarr"):
        return LazyLevel(join(source.group_url or url, path), so, None), source.axes
    raise ValueError(f"{url}: a {source.ref.format} image has no level reader (decoded whole, see _decode_pil).")


def source_to_dask(source: ImageSource, chunk: int = 512, *, level: int = 0) -> da.Array:
    """Lazy ``(C, H, W)`` uint8 of one level of ``source`` (``C = source.out_channels``), chunks ``(C, chunk, chunk)``.

    Zarr/TIFF blocks are read aligned to the storage chunks (``read_chunks_yx``), converted by
    ``convert.to_uint8`` (RGB, or the selected bands) block by block and rechunked; nothing is read until computed. PNG/JPEG are one task
    decoding the whole file (``MAX_DECODE_PIXELS``), then split.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}.")
    url, so = source.ref.url, source.storage_options
    if source.ref.format in ("png", "jpeg"):
        h, w = source.shape_yx
        decoded = dask.delayed(_decode_pil, pure=True)(url, so)
        raw, axes = da.from_delayed(decoded, shape=(source.channels, h, w), dtype=source.dtype), "cyx"
    else:
        reader, axes = level_reader(source, level)
        iy, ix = axes.index("y"), axes.index("x")
        bpp = reader.dtype.itemsize * source.channels
        ry, rx = read_chunks_yx((reader.chunks[iy], reader.chunks[ix]), spatial_shape(reader.shape, axes), chunk, bpp)
        read = tuple({"y": ry, "x": rx, "c": n}.get(a, 1) for a, n in zip(axes, reader.shape, strict=True))
        meta = np.empty((0,) * reader.ndim, reader.dtype)
        raw = da.from_array(reader, chunks=read, lock=False, asarray=False, meta=meta)
    raw = raw[tuple(0 if a in "tz" else slice(None) for a in axes)]
    kept = [a for a in axes if a not in "tz"]
    if "c" not in kept:
        raw, kept = raw[None], ["c", *kept]
    cyx = raw.transpose([kept.index(a) for a in "cyx"]).rechunk({0: -1})
    n = source.out_channels
    converted = cyx.map_blocks(
        to_uint8,
        value_range=source.value_range,
        bands=source.bands,
        dtype=np.uint8,
        chunks=((n,), *cyx.chunks[1:]),
        meta=np.empty((0, 0, 0), np.uint8),
    )
    return converted.rechunk((n, chunk, chunk))
