"""MagNet's reference procedure where it is a choice (github VinAIResearch/MagNet, ``test.py``), as options of
``pipeline.frameworks.magnet`` (``MagnetConfig``; ``procedure: reference`` sets them all):

- **median view** (``median_view``): the reference median-filters the error score ``E`` (``H × W``, the stage's
  size) on a view the size of its network input (``input_size``, e.g. 508²): ``E`` is resized there by nearest
  neighbour, filtered ``k × k`` with zero padding, and resized back by nearest neighbour. Its footprint is then
  about ``k·H/view`` stage pixels. The view is small, so the driver holds it; ``E`` is sampled chunk by chunk
  and the result written chunk by chunk (``median_view_pass``).
- **crop alignment** (``crop: roi_align``): the refiner's coarse input is ``torchvision.ops.roi_align(Y_up,
  [x0, y0, x0 + T, y0 + T], T, aligned=False)``: with one sample per output pixel at ``(y0 + i + ½, x0 + j + ½)``
  (pixel ``i`` at coordinate ``i``), the mean of each 2 × 2 block of ``Y_up``, the last row and column clamped to
  the image, 0 past ``H`` (``roi_align_window``; a tile input, ``RoiAlignedMap``).
- **stage 0 in one pass** (``stage0: whole``): when the coarsest level fits one tile, the segmenter runs on
  exactly the image (padded to its size multiple by the tile's own mirrored margin), not on the mirrored tile
  (``WholeImage``, read by ``MagnetModel``).
- **any list of scales** (``scales: [f₀, …, 1]``): stage ``s`` covers the image at ``f_s`` of its size. A power of
  two is its pyramid level; another factor is read from the nearest finer level and resized bilinearly, chunk by
  chunk, into the stage's work area (``stage_images``); the previous stage's map is resized to each stage's size
  by the same bilinear rule (``resize_window``; ×2 is ``reader.upsample2x_window``).

Nearest-neighbour resizing follows ``torch.nn.functional.interpolate(mode="nearest")``: output index ``i`` takes
input ``min(⌊i · (in/out)⌋, in − 1)`` computed in float32 (``i >> 1`` when ``out = 2·in``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import zarr

from models import magnet as mg
from pipeline.frameworks.base import OpenArray
from pipeline.plan import ArrayRef
from pipeline.pyramid import Pyramid
from pipeline.reader import read_window, reflect_index, upsample2x_window, upsample_index
from pipeline.storage import zarr_store
from pipeline.tiling import Window

if TYPE_CHECKING:  # magnet_maps reads resize_window from here
    from pipeline.frameworks.magnet_maps import StageMaps


def nearest_index(out: int, size: int) -> np.ndarray:
    """Source index of each of ``out`` outputs of a nearest-neighbour resize from ``size`` (PyTorch's rule)."""
    i = np.arange(out, dtype=np.int64)
    if out == size:
        return i
    if out == 2 * size:
        return i >> 1
    scale = np.float32(size) / np.float32(out)
    return np.minimum(np.floor(i.astype(np.float32) * scale).astype(np.int64), size - 1)


def median_view(error: np.ndarray | Any, view: tuple[int, int], k: int, padding: str = "zero") -> np.ndarray:
    """The reference's smoothing of a whole ``(H, W)`` error score (an array or anything indexable by rows and
    columns): nearest to ``view``, ``k × k`` median, nearest back. ``(H, W) → (H, W)`` float32."""
    h, w = error.shape
    small = _sample(error, nearest_index(view[0], h), nearest_index(view[1], w))
    filtered = mg.median_filter(small, k, padding)
    return filtered[nearest_index(h, view[0])][:, nearest_index(w, view[1])]


def _sample(error, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if isinstance(error, np.ndarray):
        return error[np.ix_(rows, cols)].astype(np.float32)
    return np.asarray(error[rows][:, cols], np.float32)


def median_view_pass(maps: StageMaps, k: int, view: tuple[int, int], padding: str, scheduler: Any = "threads") -> None:
    """``median_view`` of the stage's ``E`` into ``error_median``, one chunk at a time (the view is held whole)."""
    err = da.from_zarr(maps.error)
    h, w = err.shape
    rows, cols = nearest_index(view[0], h), nearest_index(view[1], w)
    small = np.asarray(err[rows][:, cols].compute(scheduler=scheduler), np.float32)
    filtered = mg.median_filter(small, k, padding)
    back_rows, back_cols = nearest_index(h, view[0]), nearest_index(w, view[1])

    def block(e, block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return filtered[back_rows[y0:y1]][:, back_cols[x0:x1]].astype(np.float16)

    da.store(err.map_blocks(block, dtype=np.float16), maps.error_median, lock=False, scheduler=scheduler)


def _roi_axis(start: int, length: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's ``roi_align`` bilinear sampling along one axis, one sample per output at ``start + i + ½``:
    ``(low, high, w_low, w_high)``; samples past ``[-1, size]`` weigh 0, those in ``[size − 1, size]`` take the
    last pixel, those in ``[-1, 0]`` the first."""
    c = start + np.arange(length, dtype=np.float64) + 0.5
    valid = (c >= -1.0) & (c <= size)
    c = np.maximum(c, 0.0)
    low = np.floor(c).astype(np.int64)
    end = low >= size - 1
    low = np.where(end, size - 1, low)
    high = np.where(end, size - 1, low + 1)
    frac = np.where(end, 0.0, c - low)
    return low, high, ((1 - frac) * valid).astype(np.float32), (frac * valid).astype(np.float32)


def roi_align_window(previous, prev_shape: tuple[int, int], shape: tuple[int, int], window: Window) -> np.ndarray:
    """``roi_align(Y_up, window, window size, aligned=False)`` with ``Y_up`` the bilinear upsampling of the
    ``(C, h, w)`` map ``previous`` to ``shape`` (``resize_window``): ``(C, window.h, window.w)`` float32. Only the part of ``Y_up``
    under the window (one more row and column) is computed."""
    (ly, hy, wly, why), (lx, hx, wlx, whx) = (_roi_axis(window.y0, window.h, shape[0]),
                                              _roi_axis(window.x0, window.w, shape[1]))
    y0, y1 = int(min(ly.min(), hy.min())), int(max(ly.max(), hy.max())) + 1
    x0, x1 = int(min(lx.min(), hx.min())), int(max(lx.max(), hx.max())) + 1
    up = resize_window(previous, prev_shape, shape, Window(y0, x0, y1 - y0, x1 - x0))
    rows = up[:, ly - y0] * wly[None, :, None] + up[:, hy - y0] * why[None, :, None]
    return rows[:, :, lx - x0] * wlx[None, None, :] + rows[:, :, hx - x0] * whx[None, None, :]


@dataclass(frozen=True)
class RoiAlignedMap:
    """A tile input: the previous stage's map cropped for the tile as the reference crops it (``roi_align_window``)."""

    ref: ArrayRef

    def read(self, open_array: OpenArray, image: ArrayRef, windows: list[Window]) -> np.ndarray:
        previous = open_array(self.ref)
        return np.stack([roi_align_window(previous, self.ref.shape_yx, image.shape_yx, w) for w in windows])


@dataclass(frozen=True)
class WholeImage:
    """A tile input of stage 0 when its level fits one tile: where the image lies in each tile,
    ``(B, 4)`` int64 rows ``(y, x, h, w)``, so the model runs on the image alone (``MagnetModel``)."""

    def read(self, open_array: OpenArray, image: ArrayRef, windows: list[Window]) -> np.ndarray:
        h, w = image.shape_yx
        return np.array([[-win.y0, -win.x0, h, w] for win in windows], np.int64)


def fits_one_tile(grid, shape: tuple[int, int]) -> bool:
    """Whether a stage's grid is one tile holding the whole ``(H, W)`` level."""
    if len(grid) != 1:
        return False
    win = grid.window(0, 0)
    return win.y0 <= 0 and win.x0 <= 0 and win.y1 >= shape[0] and win.x1 >= shape[1]


def _axis(start: int, length: int, src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear (``align_corners=False``) source rows and weights of outputs ``start…start+length−1`` of a
    ``src → dst`` resize, by size as ``F.interpolate(size=…)``: ``u = max(0, (i + ½)·src/dst − ½)`` in float32;
    ×2 (``dst`` = 2·src or 2·src − 1) is ``reader.upsample_index``, the rule of gigaseg's power-of-two stages."""
    if dst in (2 * src, 2 * src - 1):
        return upsample_index(start, length, src)
    scale = np.float32(src) / np.float32(dst)
    u = np.maximum(np.float32(0), (np.arange(start, start + length, dtype=np.float32) + np.float32(0.5)) * scale
                   - np.float32(0.5))
    i0 = np.minimum(np.floor(u).astype(np.int64), src - 1)
    return i0, np.minimum(i0 + 1, src - 1), (u - i0).astype(np.float32)


def resize_window(array, src_shape: tuple[int, int], dst_shape: tuple[int, int], window: Window) -> np.ndarray:
    """Window of the bilinear resize of a ``(C, h, w)`` map to ``dst_shape``, mirrored past it: float32; the ×2
    case is exactly ``reader.upsample2x_window``. Only the source rows and columns under the window are read."""
    if all(d in (2 * s_, 2 * s_ - 1) for s_, d in zip(src_shape, dst_shape, strict=True)):
        return upsample2x_window(array, src_shape, dst_shape, window)
    iy = reflect_index(window.y0, window.h, dst_shape[0])
    ix = reflect_index(window.x0, window.w, dst_shape[1])
    y0, x0 = int(iy.min()), int(ix.min())
    ry0, ry1, wy = _axis(y0, int(iy.max()) + 1 - y0, src_shape[0], dst_shape[0])
    rx0, rx1, wx = _axis(x0, int(ix.max()) + 1 - x0, src_shape[1], dst_shape[1])
    sy0, sy1, sx0, sx1 = int(ry0.min()), int(ry1.max()) + 1, int(rx0.min()), int(rx1.max()) + 1
    src = np.asarray(array[:, sy0:sy1, sx0:sx1], dtype=np.float32)
    rows = src[:, ry0 - sy0] * (1 - wy)[None, :, None] + src[:, ry1 - sy0] * wy[None, :, None]
    up = rows[:, :, rx0 - sx0] * (1 - wx)[None, None, :] + rows[:, :, rx1 - sx0] * wx[None, None, :]
    return up[:, iy - y0][:, :, ix - x0]


def level_of(factor: float, n_levels: int) -> int:
    """The pyramid level a stage at ``factor`` of the image reads: the coarsest still at least that fine,
    ``clamp(⌊log2(1/f)⌋, 0, n − 1)``."""
    return min(max(math.floor(math.log2(1 / factor) + 1e-9), 0), n_levels - 1)


def stage_shape(factor: float, level: int, pyramid: Pyramid) -> tuple[int, int]:
    """The stage's (H, W): its pyramid level's when ``factor`` is ``2^-level``, else ``round(f·H₀) × round(f·W₀)``."""
    if math.isclose(factor, 2.0**-level):
        return tuple(pyramid.shapes[level])
    h0, w0 = pyramid.shapes[0]
    return max(1, round(factor * h0)), max(1, round(factor * w0))


def stage_images(factors: tuple[float, ...], pyramid: Pyramid, maps_urls: list[str], chunk: int,
                 storage_options: dict) -> list[tuple[ArrayRef, tuple[int, int]]]:
    """Each stage's image and (H, W): a pyramid level, or that level resized to the stage's size, written (once:
    a complete one is reused when resuming) as ``image`` in the stage's maps group, chunk by chunk."""
    out = []
    for factor, url in zip(factors, maps_urls, strict=True):
        level = level_of(factor, pyramid.n_levels)
        shape = stage_shape(factor, level, pyramid)
        source = pyramid.level_ref(level)
        if shape == tuple(pyramid.shapes[level]):
            out.append((source, shape))
            continue
        out.append((_resized(source, shape, url, chunk, storage_options), shape))
    return out


def _resized(source: ArrayRef, shape: tuple[int, int], url: str, chunk: int, storage_options: dict) -> ArrayRef:
    group = zarr.open_group(store=zarr_store(url, storage_options), mode="a")
    if "image" in group and tuple(group["image"].shape) == (3, *shape) and group["image"].attrs.get("complete"):
        return ArrayRef(url, "image", "cyx", shape, dict(storage_options))
    target = group.create_array("image", shape=(3, *shape), chunks=(3, min(chunk, shape[0]), min(chunk, shape[1])),
                                dtype="uint8", overwrite=True)
    src_shape = source.shape_yx

    def block(_, block_info=None):
        (_c0, _c1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        ry0, ry1, wy = _axis(y0, y1 - y0, src_shape[0], shape[0])
        rx0, rx1, wx = _axis(x0, x1 - x0, src_shape[1], shape[1])
        sy0, sy1, sx0, sx1 = int(ry0.min()), int(ry1.max()) + 1, int(rx0.min()), int(rx1.max()) + 1
        src = read_window(source.open(), source.axes, src_shape, Window(sy0, sx0, sy1 - sy0, sx1 - sx0),
                          value_range=source.value_range).astype(np.float32)
        rows = src[:, ry0 - sy0] * (1 - wy)[None, :, None] + src[:, ry1 - sy0] * wy[None, :, None]
        up = rows[:, :, rx0 - sx0] * (1 - wx)[None, None, :] + rows[:, :, rx1 - sx0] * wx[None, None, :]
        return np.clip(np.rint(up), 0, 255).astype(np.uint8)

    blocks = da.zeros((3, *shape), dtype=np.uint8, chunks=target.chunks).map_blocks(block, dtype=np.uint8)
    da.store(blocks, target, lock=False)
    target.attrs["complete"] = True
    return ArrayRef(url, "image", "cyx", shape, dict(storage_options))


def view_of(config, tile: int) -> tuple[int, int] | None:
    """The median's view: None at the stage's resolution, the tile's size for ``"tile"``, else the one given."""
    v = config.median_view
    if v == "stage":
        return None
    if v == "tile":
        return tile, tile
    return (v, v) if isinstance(v, int) else tuple(v)


#: Each option's value under ``procedure: reference`` (gigaseg's are ``MagnetConfig``'s defaults).
REFERENCE = {"median_view": "tile", "median_padding": "zero", "crop": "roi_align", "stage0": "whole",
             "patch_choice": "least_uncertain"}
OPTIONS = tuple(REFERENCE)


def options_of(spec_options: dict[str, Any]) -> dict[str, Any]:
    """``MagnetConfig``'s procedure fields from ``model.magnet``: each given one, else its ``procedure``'s value."""
    reference = spec_options.get("procedure") == "reference"
    out = {}
    for name in OPTIONS:
        given = spec_options.get(name)
        if given is not None:
            out[name] = tuple(given) if isinstance(given, list) else given
        elif reference:
            out[name] = REFERENCE[name]
    return out


__all__ = ["OPTIONS", "REFERENCE", "RoiAlignedMap", "WholeImage", "fits_one_tile", "level_of", "median_view",
           "median_view_pass", "nearest_index", "options_of", "resize_window", "roi_align_window", "stage_images",
           "stage_shape", "view_of"]
