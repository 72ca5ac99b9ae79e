"""MagNet's reference procedure where it is a choice (github VinAIResearch/MagNet, ``test.py``), as options of
``pipeline.frameworks.magnet`` (``MagnetConfig``; ``procedure: reference`` sets them all), on the block path
(``magnet_blocks``):

- **median view** (``median_view``): the reference median-filters the error score ``E`` (``H × W``, the stage's
  size) on a view the size of its network input (``input_size``, e.g. 508²): ``E`` is resized there by nearest
  neighbour, filtered ``k × k``, and resized back by nearest neighbour, so a pixel's median reads ``E`` about
  ``(r + 1)·H/view`` pixels away (``view_halo``, the stage's halo). ``ViewMedianRows`` does it on a block's rows as
  they come: it keeps only the sampled rows and columns of ``E``.
- **zero padding** (``median_padding: zero``): the reference's ``MedianBlur`` is a conv with zero padding, then
  ``torch.median``: past the level's (or the view's) edges the neighbourhood holds zeros (``ZeroMedianRows``),
  not the repeated edge.
- **crop alignment** (``crop: roi_align``): the refiner's coarse input is ``torchvision.ops.roi_align(Y_up,
  [x0, y0, x0 + T, y0 + T], T, aligned=False)``: with one sample per output pixel at ``(y0 + i + ½, x0 + j + ½)``
  (pixel ``i`` at coordinate ``i``), the mean of each 2 × 2 block of ``Y_up``, the last row and column clamped to
  the image, 0 past it (``roi_align_window`` on whole arrays, ``RoiPreviousMap`` on a block's rows).
- **stage 0 in one pass** (``stage0: whole``): when the coarsest level fits one tile, the segmenter runs on
  exactly the image (padded to its size multiple by the tile's own mirrored margin), not on the mirrored tile
  (``WholeImage``, read by ``MagnetModel``).

Nearest-neighbour resizing follows ``torch.nn.functional.interpolate(mode="nearest")``: output index ``i`` takes
input ``min(⌊i · (in/out)⌋, in − 1)`` computed in float32 (``i >> 1`` when ``out = 2·in``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models import magnet as mg
from pipeline.frameworks.base import OpenArray
from pipeline.frameworks.magnet_blocks import MedianRows, PreviousRows, StageMap
from pipeline.plan import ArrayRef
from pipeline.reader import upsample2x_window
from pipeline.row_reader import upsample2x_rows, upsample_source
from pipeline.tiling import Window
from pipeline.workers.median import median_float16


def nearest_index(out: int, size: int) -> np.ndarray:
    """Source index of each of ``out`` outputs of a nearest-neighbour resize from ``size`` (PyTorch's rule)."""
    i = np.arange(out, dtype=np.int64)
    if out == size:
        return i
    if out == 2 * size:
        return i >> 1
    scale = np.float32(size) / np.float32(out)
    return np.minimum(np.floor(i.astype(np.float32) * scale).astype(np.int64), size - 1)


def median_view(error: np.ndarray, view: tuple[int, int], k: int, padding: str = "zero") -> np.ndarray:
    """The reference's smoothing of a whole ``(H, W)`` error score: nearest to ``view``, ``k × k`` median (zeros or
    the edge past it), nearest back. ``(H, W) → (H, W)`` float32."""
    h, w = error.shape
    small = error[np.ix_(nearest_index(view[0], h), nearest_index(view[1], w))].astype(np.float32)
    filtered = mg.median_filter(small, k, padding)
    return filtered[nearest_index(h, view[0])][:, nearest_index(w, view[1])]


def view_halo(shape: tuple[int, int], view: tuple[int, int], k: int) -> int:
    """How far (px of the stage) a pixel's median on the view reads ``E``: ``⌈(r + 1)·H/view⌉ + 1`` (either axis)."""
    return math.ceil((k // 2 + 1) * max(shape[0] / view[0], shape[1] / view[1])) + 1


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


def _span(*index: np.ndarray) -> tuple[int, int]:
    return int(min(i.min() for i in index)), int(max(i.max() for i in index)) + 1


def roi_align_window(previous, prev_shape: tuple[int, int], shape: tuple[int, int], window: Window) -> np.ndarray:
    """``roi_align(Y_up, window, window size, aligned=False)`` with ``Y_up`` the ×2 bilinear upsampling of the
    ``(C, h, w)`` map ``previous`` to ``shape``: ``(C, window.h, window.w)`` float32 (whole arrays; tests)."""
    (ly, hy, wly, why), (lx, hx, wlx, whx) = (_roi_axis(window.y0, window.h, shape[0]),
                                              _roi_axis(window.x0, window.w, shape[1]))
    (y0, y1), (x0, x1) = _span(ly, hy), _span(lx, hx)
    up = upsample2x_window(previous, prev_shape, shape, Window(y0, x0, y1 - y0, x1 - x0))
    rows = up[:, ly - y0] * wly[None, :, None] + up[:, hy - y0] * why[None, :, None]
    return rows[:, :, lx - x0] * wlx[None, None, :] + rows[:, :, hx - x0] * whx[None, None, :]


@dataclass(frozen=True)
class RoiPreviousMap:
    """A tile input: the previous stage's map cropped for each tile as the reference crops it (``roi_align``)."""

    map: StageMap

    def open_rows(self, open_array: OpenArray, image: ArrayRef, tile: int, x_lo: int, x_hi: int,
                  shared: dict) -> RoiPreviousRows:
        # nothing shared with the sink: its Y_up is the plain ×2 upsampling, these are roi_align's samples
        return RoiPreviousRows(self.map, open_array, image.shape_yx, tile, x_lo, x_hi)


class RoiPreviousRows(PreviousRows):
    """One block's ``RoiPreviousMap``: per tile row, the map rows under the samples on the host; on the device the
    ×2 upsampling of the rows and columns the samples read (inside the level), then ``roi_align``'s weights."""

    def __init__(self, stage_map: StageMap, open_array: OpenArray, fine_shape: tuple[int, int], tile: int,
                 x_lo: int, x_hi: int) -> None:
        super().__init__(stage_map, open_array, fine_shape, tile, x_lo, x_hi + 1)  # one more column: the samples'
        self.cols = _roi_axis(x_lo, x_hi - x_lo, fine_shape[1])
        self.x_lo, self.tiles_hi = x_lo, x_hi

    def read(self, windows: list[Window]) -> tuple[np.ndarray, int, tuple]:
        w0 = windows[0]
        axis = _roi_axis(w0.y0, w0.h, self.fine[0])
        a, b = _span(axis[0], axis[1])
        r0, r1 = upsample_source((a, b), self.fine[0], self.map.shape_yx[0])
        return self.rows.rows(r0, r1), r0, (a, b, axis)

    def to_device(self, host, windows: list[Window], runner) -> torch.Tensor:
        slab, r0, (a, b, (ly, hy, wly, why)) = host
        lx, hx, wlx, whx = self.cols
        c0, c1 = _span(lx, hx)
        up = upsample2x_rows(runner.upload(slab), (r0, self.s0), self.map.shape_yx, self.fine,
                             Window(a, c0, b - a, c1 - c0))
        dev = up.device
        t = {k: torch.from_numpy(v).to(dev) for k, v in
             (("ly", ly - a), ("hy", hy - a), ("wly", wly), ("why", why), ("lx", lx - c0), ("hx", hx - c0),
              ("wlx", wlx), ("whx", whx))}
        rows = up[:, t["ly"]] * t["wly"][None, :, None] + up[:, t["hy"]] * t["why"][None, :, None]
        full = rows[:, :, t["lx"]] * t["wlx"][None, None, :] + rows[:, :, t["hx"]] * t["whx"][None, None, :]
        return torch.stack([full[:, :, w.x0 - self.x_lo : w.x1 - self.x_lo] for w in windows])


class ZeroMedianRows(MedianRows):
    """``MedianRows`` with zeros past the level's edges (the reference's zero-padded conv), not the edge repeated;
    inside the level the block's halo holds the neighbours as before."""

    def __init__(self, k: int, blend: Window, own: Window, device: torch.device, level: tuple[int, int]) -> None:
        super().__init__(k, blend, own, device)
        cols = np.arange(own.x0 - self.r, own.x1 + self.r)
        self.col_out = torch.from_numpy((cols < 0) | (cols >= level[1])).to(device)
        self.height = level[0]

    def _median(self, a: int, b: int) -> torch.Tensor:
        rows = np.arange(a - self.r, b + self.r)
        clipped = np.clip(rows, self.blend.y0, self.blend.y1 - 1) - self.lo
        win = self.buf[torch.from_numpy(clipped).to(self.buf.device)][:, self.cols]
        out = torch.from_numpy((rows < 0) | (rows >= self.height)).to(self.buf.device)
        return median_float16(win.masked_fill(out[:, None] | self.col_out[None, :], 0), self.k)


class ViewMedianRows:
    """The reference's median of ``E`` on a ``view`` (``median_view``) for the pixels of ``own``, from the rows of
    ``blend`` as they come (the interface of ``MedianRows``). It keeps the sampled rows and columns of ``E`` only: a
    ``(view rows, view columns)`` window around ``own``'s, zeros past the view's edges (or its edge repeated)."""

    def __init__(self, k: int, blend: Window, own: Window, device: torch.device, level: tuple[int, int],
                 view: tuple[int, int], padding: str = "zero") -> None:
        (h, w), (vh, vw) = level, view
        self.k, self.r, self.blend, self.own = k, k // 2, blend, own
        self.src_rows = nearest_index(vh, h)
        back_rows, back_cols = nearest_index(h, vh), nearest_index(w, vw)
        r = self.r
        self.v0, self.v1 = int(back_rows[own.y0]) - r, int(back_rows[own.y1 - 1]) + r + 1  # view rows kept
        self.c0, c1 = int(back_cols[own.x0]) - r, int(back_cols[own.x1 - 1]) + r + 1
        cols = np.arange(self.c0, c1)
        inside = np.clip(cols, 0, vw - 1)
        src_cols = nearest_index(vw, w)[inside] - blend.x0
        if src_cols.min() < 0 or src_cols.max() >= blend.w:
            raise ValueError(f"the median's view reads columns past the block's halo ({blend}); raise the stage's halo")
        self.src_cols = torch.from_numpy(src_cols).to(device)
        self.col_zero = torch.from_numpy((cols < 0) | (cols >= vw)).to(device) if padding == "zero" else None
        self.edge = padding != "zero"
        self.vh = vh
        self.small = torch.zeros((self.v1 - self.v0, len(cols)), dtype=torch.float16, device=device)
        self.next_v = max(self.v0, 0)  # the next view row to sample
        self.last_v = min(self.v1, vh)
        self.own_rows = back_rows[own.y0 : own.y1]
        self.own_cols = torch.from_numpy(back_cols[own.x0 : own.x1] - self.c0 - r).to(device)
        self.next = own.y0

    def add(self, y0: int, rows: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        n = rows.shape[0]
        while self.next_v < self.last_v and self.src_rows[self.next_v] < y0 + n:
            y = int(self.src_rows[self.next_v])
            if y < y0:
                raise ValueError(f"the median's view row {self.next_v} reads row {y}, above the rows given ({y0}..)")
            row = rows[y - y0][self.src_cols]
            self.small[self.next_v - self.v0] = row if self.col_zero is None else row.masked_fill(self.col_zero, 0)
            self.next_v += 1
        done_v = self.v1 if self.next_v >= self.last_v else self.next_v  # view rows below this are known
        last = self.next
        while last < self.own.y1 and self.own_rows[last - self.own.y0] + self.r < done_v:
            last += 1
        if last == self.next:
            return []
        out = (self.next, self._median(self.next, last))
        self.next = last
        return [out]

    def finish(self) -> None:
        if self.next != self.own.y1:
            raise RuntimeError(f"view median rows up to {self.next} of {self.own.y1}: the block's rows did not all come")

    def _median(self, a: int, b: int) -> torch.Tensor:
        """Own rows ``[a, b)``: the median on the view at each pixel's view row and column, ``(b − a, own.w)``."""
        va, vb = int(self.own_rows[a - self.own.y0]), int(self.own_rows[b - 1 - self.own.y0]) + 1
        lo, hi = va - self.r - self.v0, vb + self.r - self.v0
        win = self.small[lo:hi]
        if self.edge:  # the view's edge repeated (rows past it were never sampled: copy the nearest)
            idx = np.clip(np.arange(va - self.r, vb + self.r), 0, self.vh - 1) - self.v0
            win = self.small[torch.from_numpy(idx).to(self.small.device)]
        filtered = median_float16(win, self.k)  # (vb − va, view columns − 2r)
        rows = torch.from_numpy(self.own_rows[a - self.own.y0 : b - self.own.y0] - va).to(filtered.device)
        return filtered[rows][:, self.own_cols]


@dataclass(frozen=True)
class MedianFactory:
    """The median a refinement stage's blocks run (``magnet_blocks.RefineSink.median_rows``): on the view (when
    ``view``), with zeros or the edge past the level."""

    view: tuple[int, int] | None
    padding: str

    def __call__(self, k: int, blend: Window, own: Window, device: torch.device, level: tuple[int, int]):
        if self.view is not None:
            return ViewMedianRows(k, blend, own, device, level, self.view, self.padding)
        if self.padding == "zero":
            return ZeroMedianRows(k, blend, own, device, level)
        return MedianRows(k, blend, own, device)


@dataclass(frozen=True)
class WholeImage:
    """A tile input of stage 0 when its level fits one tile: where the image lies in each tile, ``(B, 4)`` int64
    rows ``(y, x, h, w)`` (kept on the host), so the model runs on the image alone (``MagnetModel``)."""

    def open_rows(self, open_array: OpenArray, image: ArrayRef, tile: int, x_lo: int, x_hi: int,
                  shared: dict) -> _Extents:
        return _Extents(image.shape_yx)


@dataclass(frozen=True)
class _Extents:
    shape: tuple[int, int]

    def read(self, windows: list[Window]) -> np.ndarray:
        return np.array([[-w.y0, -w.x0, *self.shape] for w in windows], np.int64)

    def to_device(self, host: np.ndarray, windows: list[Window], runner) -> torch.Tensor:
        return torch.from_numpy(host)


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


__all__ = ["OPTIONS", "REFERENCE", "MedianFactory", "RoiPreviousMap", "RoiPreviousRows", "ViewMedianRows",
           "WholeImage", "ZeroMedianRows", "fits_one_tile", "median_view", "nearest_index", "options_of",
           "roi_align_window", "view_halo", "view_of"]
