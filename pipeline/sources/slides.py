"""Whole-slide images through OpenSlide (``openslide-python`` with ``openslide-bin``, the ``slides`` extra): Aperio
SVS, Hamamatsu NDPI/VMS/VMU, MIRAX MRXS, Leica SCN, Ventana BIF, Sakura SVSLIDE.

A slide is described from its properties (levels, tile size, ``openslide.mpp-x/y``) and read level by level,
window by window, through ``SlideLevel``, an array-like of shape ``(H_l, W_l, 4)`` uint8 (RGBA, as OpenSlide
returns it: premultiplied, fully transparent outside the scanned area). Its "chunks" are the level's tiles, so the
readers ask OpenSlide for whole tiles. Nothing is decoded before a window is read.

OpenSlide opens local files only (a path it can ``open()``, including a mounted bucket), so a remote URL is
refused with a message saying so.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from pipeline.errors import ImageReadError, UnsupportedImageError
from pipeline.optional import require
from pipeline.spatial import Spatial
from pipeline.storage import is_local, local_path

SLIDE_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide")
_DEFAULT_TILE = 512  # when a format states no tile size (OpenSlide reads any window; this bounds one read)


def open_slide(url: str) -> Any:
    """An ``openslide.OpenSlide`` of the slide at ``url`` (a local path)."""
    openslide = require("openslide", f"{url}: a whole-slide image")
    if not is_local(url):
        raise UnsupportedImageError(
            f"{url}: OpenSlide reads local files only; copy the slide to a local or mounted file system, or "
            f"convert it to OME-Zarr (e.g. bioformats2raw) to read it from object storage.")
    try:
        return openslide.OpenSlide(local_path(url))
    except openslide.OpenSlideError as exc:
        raise ImageReadError(f"{url}: OpenSlide cannot read this slide ({exc}).") from exc


def slide_spatial(properties: Any) -> Spatial:
    """µm per pixel from ``openslide.mpp-x/y`` (each format's own field, normalised by OpenSlide); no data where a
    read is fully transparent."""
    mpp_x, mpp_y = properties.get("openslide.mpp-x"), properties.get("openslide.mpp-y")
    size = None
    if mpp_x and mpp_y and float(mpp_x) > 0 and float(mpp_y) > 0:
        size = (float(mpp_y), float(mpp_x))
    return Spatial(size, "micrometer" if size else None, nodata_alpha=True, origin="openslide")


def slide_levels(slide: Any) -> list[tuple[tuple[int, int], float]]:
    """``((H_l, W_l), downsample_l)`` per level, finest first."""
    return [((int(h), int(w)), float(ds)) for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples,
                                                                  strict=True)]


class SlideLevel:
    """Array-like over one level of a slide: ``shape (H, W, 4)`` uint8, ``chunks`` the level's tiles; ``[y, x, c]``
    slices read that window with ``read_region``. Holds the path only (it pickles); the slide is opened once per
    process (OpenSlide handles are thread-safe)."""

    def __init__(self, url: str, level: int) -> None:
        self.url, self.level = url, level
        self._lock = threading.Lock()
        self._slide: Any = None
        slide = self.slide()
        (h, w), self.downsample = slide_levels(slide)[level]
        props = slide.properties
        th = int(props.get(f"openslide.level[{level}].tile-height", _DEFAULT_TILE))
        tw = int(props.get(f"openslide.level[{level}].tile-width", _DEFAULT_TILE))
        self.shape, self.chunks = (h, w, 4), (min(th, h), min(tw, w), 4)
        self.dtype, self.ndim = np.dtype(np.uint8), 3

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_slide")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _slide=None)

    def __dask_tokenize__(self) -> tuple:
        return ("gigaseg-slide", self.url, self.level, self.shape)

    def slide(self) -> Any:
        with self._lock:
            if self._slide is None:
                self._slide = open_slide(self.url)
            return self._slide

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        (y0, y1), (x0, x1) = (_bounds(k, n) for k, n in zip(key[:2], self.shape[:2], strict=True))
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 4), np.uint8)[:, :, key[2]]
        # read_region takes the window's top-left corner in level-0 pixels
        corner = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))
        try:
            region = self.slide().read_region(corner, self.level, (x1 - x0, y1 - y0))
        except Exception as exc:  # noqa: BLE001 - reported with the slide and window
            raise ImageReadError(f"{self.url}: reading level {self.level} window [{y0}:{y1}, {x0}:{x1}] failed "
                                 f"({type(exc).__name__}: {exc}); the slide may be truncated or corrupt.") from exc
        return np.asarray(region, dtype=np.uint8)[:, :, key[2]]


def _bounds(k: Any, n: int) -> tuple[int, int]:
    if not isinstance(k, slice) or k.step not in (None, 1):
        raise IndexError(f"a slide level is read by contiguous slices, got {k!r}")
    start, stop, _ = k.indices(n)
    return start, stop


__all__ = ["SLIDE_SUFFIXES", "SlideLevel", "open_slide", "slide_levels", "slide_spatial"]
