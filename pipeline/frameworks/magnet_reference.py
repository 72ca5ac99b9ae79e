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

Nearest-neighbour resizing follows ``torch.nn.functional.interpolate(mode="nearest")``: output index ``i`` takes
input ``min(⌊i · (in/out)⌋, in − 1)`` computed in float32 (``i >> 1`` when ``out = 2·in``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from models import magnet as mg
from pipeline.frameworks.base import OpenArray
from pipeline.frameworks.magnet_maps import StageMaps
from pipeline.plan import ArrayRef
from pipeline.reader import upsample2x_window
from pipeline.tiling import Window


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
    """``roi_align(Y_up, window, window size, aligned=False)`` with ``Y_up`` the ×2 bilinear upsampling of the
    ``(C, h, w)`` map ``previous`` to ``shape``: ``(C, window.h, window.w)`` float32. Only the part of ``Y_up``
    under the window (one more row and column) is computed."""
    (ly, hy, wly, why), (lx, hx, wlx, whx) = (_roi_axis(window.y0, window.h, shape[0]),
                                              _roi_axis(window.x0, window.w, shape[1]))
    y0, y1 = int(min(ly.min(), hy.min())), int(max(ly.max(), hy.max())) + 1
    x0, x1 = int(min(lx.min(), hx.min())), int(max(lx.max(), hx.max())) + 1
    up = upsample2x_window(previous, prev_shape, shape, Window(y0, x0, y1 - y0, x1 - x0))
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


__all__ = ["OPTIONS", "REFERENCE", "RoiAlignedMap", "WholeImage", "fits_one_tile", "median_view",
           "median_view_pass", "nearest_index", "options_of", "roi_align_window", "view_of"]
