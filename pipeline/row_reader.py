"""Windows of rows read down one level, each source chunk row decoded once; the bilinear upsampling of a map on a
device (×2 between pyramid levels, else by the ratio of the sizes: ``reader.resize_index``).

A block's tile rows move down its level and overlap (a row of ``T``-high tiles every ``step`` rows), and so do
the windows a tile row reads besides its image (FCtL's contexts on coarser levels, MagNet's previous map at half
resolution): reading each window anew would decode most chunks two to five times. ``LevelRows`` keeps the decoded
rows until no later window can need them and copies each window out of them.

Past the level's edges a window is padded as ``pipeline.reader`` pads: ``reflect`` (tiles and maps: the level
mirrored about its edges, ``reader.reflect_index``) or ``constant`` (zeros: FCtL's contexts).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.reader import PadMode, index_slices, read_region, reflect_index, resize_index, take_slices
from pipeline.sources.convert import ValueRange, out_channels, to_uint8
from pipeline.tiling import Window

#: Reads ``(C, h, w)`` of a window inside the level (never past its edges).
ReadFn = Callable[[Window], np.ndarray]


class LevelRows:
    """Windows ``rows(y0, y1)`` of one level over a fixed span of columns ``[x0, x1)`` (which may reach past the
    level), read top to bottom: ``y0`` never moves up. ``read(window)`` decodes the level inside its edges;
    ``chunk_rows`` is the level's chunk height (whole chunk rows are read, once)."""

    def __init__(self, read: ReadFn, shape_yx: tuple[int, int], chunk_rows: int, x0: int, x1: int,
                 pad: PadMode = "reflect", channels: int = 3, dtype=np.uint8, margin: int | None = None) -> None:
        self.read, self.pad, self.chunk_rows = read, pad, max(1, chunk_rows)
        self.channels, self.dtype = channels, np.dtype(dtype)  # of what ``read`` returns
        # near the bottom edge a later window may mirror back up by ``margin`` rows (default: its own height)
        self.margin = margin
        self.height, self.width = shape_yx
        self.x0, self.x1 = x0, x1
        if pad == "reflect":
            cols = reflect_index(x0, x1 - x0, self.width)
            self.c0, self.c1 = int(cols.min()), int(cols.max()) + 1
            self.col_slices = None if (x0 >= 0 and x1 <= self.width) else index_slices(cols - self.c0)
        else:
            self.c0, self.c1 = max(0, x0), min(self.width, x1)
        self.lo = self.hi = 0  # rows [lo, hi) of the level are held, in whole pieces as read (chunk rows)
        self.pieces: list[np.ndarray] = []

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """``(C, y1 − y0, x1 − x0)`` of rows ``[y0, y1)``, padded past the level."""
        if self.pad == "reflect":
            r = reflect_index(y0, y1 - y0, self.height)
            need_lo, need_hi = int(r.min()), int(r.max()) + 1
            # near the bottom edge a later window mirrors back up to rows above its own top
            margin = y1 - y0 if self.margin is None else self.margin
            self._drop_below(min(need_lo, max(0, self.height - 1 - margin)))
            self._fill(need_hi)
            out = take_slices(self._span(need_lo, need_hi), index_slices(r - need_lo), 1)
            return out if self.col_slices is None else take_slices(out, self.col_slices, 2)
        need_lo, need_hi = min(max(y0, 0), self.height), min(max(y1, 0), self.height)
        if need_hi <= need_lo or self.c1 <= self.c0:  # wholly outside the level: nothing to read
            return np.zeros((self.channels, y1 - y0, self.x1 - self.x0), self.dtype)
        self._drop_below(need_lo)
        self._fill(need_hi)
        inner = self._span(need_lo, need_hi)
        out = np.zeros((inner.shape[0], y1 - y0, self.x1 - self.x0), inner.dtype)
        out[:, need_lo - y0 : need_hi - y0, self.c0 - self.x0 : self.c1 - self.x0] = inner
        return out

    def _span(self, a: int, b: int) -> np.ndarray:
        """Held rows ``[a, b)`` as one array: a view when one piece holds them (the common case), else the pieces'
        parts joined (a copy of the window only, never of all that is held)."""
        parts, y = [], self.lo
        for piece in self.pieces:
            n = piece.shape[1]
            if y + n > a and y < b:
                parts.append(piece[:, max(a - y, 0) : min(b - y, n)])
            y += n
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def _fill(self, need_hi: int) -> None:
        if need_hi <= self.hi:
            return
        end = min(self.height, -(-need_hi // self.chunk_rows) * self.chunk_rows)
        self.pieces.append(self.read(Window(self.hi, self.c0, end - self.hi, self.c1 - self.c0)))
        self.hi = end

    def _drop_below(self, row: int) -> None:
        """Let go of the pieces wholly above ``row``."""
        while self.pieces and self.lo + self.pieces[0].shape[1] <= row:
            self.lo += self.pieces.pop(0).shape[1]
        if row > self.hi:  # nothing held: start reading at ``row``
            self.lo = self.hi = row


def chunk_rows(array, axes: str) -> int:
    """The chunk height of an array (512 for one without chunks, e.g. a TIFF page read as a whole)."""
    chunks = getattr(array, "chunks", None)
    return int(chunks[axes.index("y")]) if chunks else 512


def image_rows(array, axes: str, shape_yx: tuple[int, int], x0: int, x1: int,
               value_range: ValueRange | None = None, bands: tuple[int, ...] | None = None,
               pad: PadMode = "reflect") -> LevelRows:
    """``LevelRows`` of an image level as uint8 (RGB, or the ``bands`` selected: ``convert.to_uint8``), mirrored
    past its edges (what tiles see) or zeros there (``pad="constant"``: FCtL's contexts)."""
    return LevelRows(lambda w: to_uint8(read_region(array, axes, w), value_range, bands), shape_yx,
                     chunk_rows(array, axes), x0, x1, pad, channels=out_channels(bands))


def upsample_source(window_rows: tuple[int, int], fine_size: int, coarse_size: int) -> tuple[int, int]:
    """The coarse rows ``[s0, s1)`` the upsampling (``upsample2x_rows``) of fine rows ``[y0, y1)`` (mirrored
    past the fine level, as tiles see it) reads."""
    y0, y1 = window_rows
    r = reflect_index(y0, y1 - y0, fine_size)
    i0, i1, _ = resize_index(int(r.min()), int(r.max()) - int(r.min()) + 1, coarse_size, fine_size)
    return int(i0.min()), int(i1.max()) + 1


def _axis_index(start: int, length: int, fine_size: int, coarse_size: int, origin: int, device) -> tuple:
    r = reflect_index(start, length, fine_size)
    i0, i1, lam = resize_index(0, int(r.max()) + 1, coarse_size, fine_size)
    i0, i1, lam = i0[r], i1[r], lam[r]
    to = dict(device=device)
    return (torch.from_numpy(i0 - origin).to(**to), torch.from_numpy(i1 - origin).to(**to),
            torch.from_numpy(lam).to(**to))


def upsample2x_rows(src: torch.Tensor, origin: tuple[int, int], coarse_shape: tuple[int, int],
                    fine_shape: tuple[int, int], window: Window) -> torch.Tensor:
    """``window`` of the bilinear upsampling of a ``coarse_shape`` map ``(C, h, w)`` to ``fine_shape`` (×2 from
    ``(C, H/2, W/2)``, else by the ratio of the sizes: ``reader.resize_index``), mirrored past ``fine_shape``, computed
    on ``src``'s device from ``src`` = the map's rows and columns from ``origin`` (``upsample_source`` of the
    window's rows and columns): ``(C, window.h, window.w)`` float32.

    The same arithmetic as ``pipeline.reader.upsample2x_window`` in the same order (rows, then columns: ``(1 − λ)·a
    + λ·b`` with ``reader.resize_index``'s indices and weights), so the two agree bit for bit."""
    src = src.float()
    ry0, ry1, wy = _axis_index(window.y0, window.h, fine_shape[0], coarse_shape[0], origin[0], src.device)
    rx0, rx1, wx = _axis_index(window.x0, window.w, fine_shape[1], coarse_shape[1], origin[1], src.device)
    rows = src[:, ry0] * (1 - wy)[None, :, None] + src[:, ry1] * wy[None, :, None]
    return rows[:, :, rx0] * (1 - wx)[None, None, :] + rows[:, :, rx1] * wx[None, None, :]


__all__ = ["LevelRows", "ReadFn", "chunk_rows", "image_rows", "upsample2x_rows", "upsample_source"]
