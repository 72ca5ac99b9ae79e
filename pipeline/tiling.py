"""Tile geometry and blend windows: pure functions, each stating its formula.

A stage reads an image (or a map) of size ``H × W`` at one pyramid level and covers it with square tiles
on a regular grid:

    step      = tile − overlap
    origin_i  = i · step − offset_y − margin      for i = 0 … ny − 1
    ny        = max(1, ⌈(H + offset_y + 2·margin − overlap) / step⌉)

(likewise for x). Tiles reach ``margin`` pixels past the image on every side (more where the grid does
not end flush); reads mirror the image there and writes are cropped to it. So the image edge never
falls on a tile edge, where a network sees its own zero padding: every image pixel is predicted with
image (or mirrored) context, whatever the grid's offset, and grids shifted against each other agree at
the border too. With ``step``, ``offset`` and ``margin`` multiples of the network's stride, every tile
sees the image at the same phase of the network's downsampling, which makes tiled inference of a fully
convolutional network shift-consistent (tests/pipeline/test_seams.py). ``0 ≤ margin ≤ overlap`` keeps
every tile touching the image.

Each tile is one chunk of the tile store (``(ny, nx, C, tile, tile)``, chunk ``(1, 1, C, tile, tile)``),
so no two tile tasks ever write the same chunk; the blend owns the output chunks, one task each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

BlendWindow = Literal["gaussian", "cosine", "constant"]

#: Smallest window weight, as MONAI clamps it: keeps Σw > 0 where only tile borders reach.
MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class Window:
    """A rectangle ``[y0, y0 + h) × [x0, x0 + w)`` in pixels of one level; may reach past the image."""

    y0: int
    x0: int
    h: int
    w: int

    @property
    def y1(self) -> int:
        return self.y0 + self.h

    @property
    def x1(self) -> int:
        return self.x0 + self.w

    def clip(self, height: int, width: int) -> "Window":
        """The part inside ``[0, height) × [0, width)`` (may be empty: h or w == 0)."""
        y0, x0 = max(self.y0, 0), max(self.x0, 0)
        y1, x1 = min(self.y1, height), min(self.x1, width)
        return Window(y0, x0, max(y1 - y0, 0), max(x1 - x0, 0))

    def intersect(self, other: "Window") -> "Window":
        y0, x0 = max(self.y0, other.y0), max(self.x0, other.x0)
        y1, x1 = min(self.y1, other.y1), min(self.x1, other.x1)
        return Window(y0, x0, max(y1 - y0, 0), max(x1 - x0, 0))

    @property
    def empty(self) -> bool:
        return self.h <= 0 or self.w <= 0


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one stage over an ``height × width`` level (formula in the module docstring)."""

    height: int
    width: int
    tile: int
    overlap: int
    offset_y: int = 0
    offset_x: int = 0
    margin: int = 0

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"TileGrid: image size must be positive, got {self.height}×{self.width}")
        if self.tile < 1:
            raise ValueError(f"TileGrid: tile must be positive, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(
                f"TileGrid: overlap must be in [0, tile), got overlap={self.overlap} with tile={self.tile}"
            )
        if not 0 <= self.margin <= self.overlap:
            raise ValueError(f"TileGrid: margin must be in [0, overlap={self.overlap}], got {self.margin}")
        for name, value in (("offset_y", self.offset_y), ("offset_x", self.offset_x)):
            if not 0 <= value < self.step:
                raise ValueError(f"TileGrid: {name} must be in [0, step={self.step}), got {value}")

    @property
    def step(self) -> int:
        return self.tile - self.overlap

    @property
    def ny(self) -> int:
        return _count(self.height, self.step, self.overlap, self.offset_y + self.margin, self.margin)

    @property
    def nx(self) -> int:
        return _count(self.width, self.step, self.overlap, self.offset_x + self.margin, self.margin)

    def __len__(self) -> int:
        return self.ny * self.nx

    def window(self, iy: int, ix: int) -> Window:
        """Window of tile ``(iy, ix)``: origin ``(iy·step − offset_y − margin, ix·step − offset_x − margin)``."""
        m = self.margin
        return Window(iy * self.step - self.offset_y - m, ix * self.step - self.offset_x - m, self.tile, self.tile)

    def indices(self) -> list[tuple[int, int]]:
        return [(iy, ix) for iy in range(self.ny) for ix in range(self.nx)]

    def tiles_overlapping(self, region: Window) -> list[tuple[int, int]]:
        """Tiles whose window intersects ``region``: ``iy`` with ``iy·step − o < region.y1`` and
        ``iy·step − o + tile > region.y0``, ``o = offset_y + margin`` (likewise for x)."""
        ys = _range_overlapping(region.y0, region.y1, self.step, self.tile, self.offset_y + self.margin, self.ny)
        xs = _range_overlapping(region.x0, region.x1, self.step, self.tile, self.offset_x + self.margin, self.nx)
        return [(iy, ix) for iy in ys for ix in xs]


def _count(size: int, step: int, overlap: int, start: int, end_margin: int) -> int:
    return max(1, math.ceil((size + start + end_margin - overlap) / step))


def _range_overlapping(lo: int, hi: int, step: int, tile: int, offset: int, n: int) -> range:
    first = max(0, (lo + offset - tile) // step + 1)
    last = min(n - 1, (hi - 1 + offset) // step)
    return range(first, last + 1)


def chunk_windows(height: int, width: int, chunk: int) -> list[Window]:
    """The regular chunk grid of an ``height × width`` array: ``[i·chunk, min((i+1)·chunk, H))``."""
    return [
        Window(y, x, min(chunk, height - y), min(chunk, width - x))
        for y in range(0, height, chunk)
        for x in range(0, width, chunk)
    ]


def chunks_touched(region: Window, chunk: int) -> set[tuple[int, int]]:
    """Chunk indices of a ``chunk × chunk`` grid that ``region`` writes into."""
    if region.empty:
        return set()
    return {
        (cy, cx)
        for cy in range(region.y0 // chunk, (region.y1 - 1) // chunk + 1)
        for cx in range(region.x0 // chunk, (region.x1 - 1) // chunk + 1)
    }


def window_1d(kind: BlendWindow, size: int, sigma_scale: float = 0.125) -> np.ndarray:
    """One axis of a blend window, float64 of length ``size``, peak 1, clamped below at ``MIN_WEIGHT``.

    gaussian: ``exp(−(i − c)² / (2σ²))`` with ``c = (size − 1)/2`` and ``σ = sigma_scale · size``
    (MONAI's default σ = 0.125·roi); cosine: ``sin²(π (i + ½) / size)`` (a Hann window: shifted copies at
    50 % overlap sum to a constant); constant: 1.
    """
    i = np.arange(size, dtype=np.float64)
    if kind == "gaussian":
        sigma = sigma_scale * size
        w = np.exp(-((i - (size - 1) / 2.0) ** 2) / (2.0 * sigma * sigma))
    elif kind == "cosine":
        w = np.sin(np.pi * (i + 0.5) / size) ** 2
    elif kind == "constant":
        w = np.ones(size)
    else:
        raise ValueError(f"unknown blend window {kind!r}; valid: gaussian, cosine, constant")
    w = w / w.max()
    return np.maximum(w, MIN_WEIGHT)


@lru_cache(maxsize=8)
def window_2d(kind: BlendWindow, size: int, sigma_scale: float = 0.125) -> np.ndarray:
    """Separable 2-D window ``w(y, x) = w₁(y) · w₁(x)``, float32 ``(size, size)``, read-only."""
    w1 = window_1d(kind, size, sigma_scale)
    out = np.outer(w1, w1).astype(np.float32)
    out.setflags(write=False)
    return out
