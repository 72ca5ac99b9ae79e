"""The blend of a block's tiles on the worker's device: running sums, and the finished bands handed to a sink.

For every pixel ``q`` of a block::

    P(q) = Σ_t w_t(q) · p_t(q) / Σ_t w_t(q)        over the tiles t whose window covers q,

with ``w_t`` the tile's blend window (``tiling.window_2d``) placed at the tile's origin. ``BlockBlend`` keeps
``Σ w·p`` ``(C, rows, w)`` and ``Σ w`` ``(rows, w)`` only for the rows still open, in a ring of one tile's height:
once a tile row is added, every row above the next tile row's top is final and handed on, so memory depends on
the block's width and the tile, not on the block's height or the mask chunks; nothing is moved as the block goes
down: a band taken is zeroed in place for the rows that come next. Bands are whatever rows became final (a
tile step, typically); the worker assembles whole chunk rows of what sinks make of them before writing
(``worker.ChunkRows``).

A finished ``Band`` gives what sinks store, computed where the sums are (the GPU on a GPU node):
``labels`` (the argmax of ``Σ w·p``: dividing every class by the same ``Σ w`` does not change it, so no division
is made for it), ``confidence`` (``max Σ w·p / Σ w``), ``probabilities`` (``P``), ``covered`` (``Σ w > 0``). On a
CPU device the argmax runs as contiguous class-by-class passes (``blend.argmax_classes``), 30× faster there than
a reduction over the class axis.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.blend import argmax_classes
from pipeline.tiling import Window


@dataclass(frozen=True)
class Band:
    """Rows ``region`` of a block, finished: views of its running sums (valid until the next band is taken)."""

    region: Window
    acc: torch.Tensor  # Σ w·p (C, h, w)
    wsum: torch.Tensor  # Σ w (h, w)

    def covered(self) -> torch.Tensor:
        """Where a tile ran (everywhere but where MagNet-Fast chose none)."""
        return self.wsum > 0

    def probabilities(self) -> torch.Tensor:
        """``P = Σ w·p / Σ w`` ``(C, h, w)`` float32, NaN where no tile ran."""
        return self.acc / torch.where(self.wsum > 0, self.wsum, torch.full_like(self.wsum, float("nan")))

    def labels(self, dtype: str = "uint8") -> np.ndarray:
        """The class of highest ``P`` as a host array (ties to the lower class, as NumPy's and ``torch.argmax``'s
        first maximum)."""
        out = self.label_tensor(dtype).cpu().numpy()
        return out if out.dtype == np.dtype(dtype) else out.astype(dtype)

    def label_tensor(self, dtype: str = "uint8") -> torch.Tensor:
        """The labels on the sums' device: ``uint8`` for ``dtype`` uint8, else ``int32`` (torch has no uint16)."""
        if self.acc.device.type == "cpu":  # NumPy's class-by-class argmax is faster than torch's on a CPU
            return torch.from_numpy(argmax_classes(self.acc.numpy(), np.dtype(dtype)).astype(
                np.uint8 if dtype == "uint8" else np.int32, copy=False))
        return self.acc.argmax(0).to(torch.uint8 if dtype == "uint8" else torch.int32)

    def confidence(self) -> np.ndarray:
        """``max P`` over classes ``(h, w)``, a float32 host array."""
        return (self.acc.amax(0) / self.wsum).cpu().numpy()

    def host_probabilities(self) -> np.ndarray:
        """``P`` as a float16 host array."""
        return self.probabilities().to(torch.float16).cpu().numpy()


class BlockBlend:
    """The running sums of one block (module docstring); rows from ``top`` (the first not handed on) down."""

    def __init__(self, num_classes: int, region: Window, rows: int, device: torch.device) -> None:
        """``rows``: the most rows open at once, the ring's size: a tile's height (once a tile row is added, the
        rows above the next tile row's top are handed on before that row is added)."""
        self.region = region
        self.capacity = max(1, rows)
        self.top = region.y0
        self.acc = torch.zeros((num_classes, self.capacity, region.w), dtype=torch.float32, device=device)
        self.wsum = torch.zeros((self.capacity, region.w), dtype=torch.float32, device=device)

    def _ring(self, y: int) -> int:
        return (y - self.region.y0) % self.capacity

    def add(self, window: Window, probs: torch.Tensor, weights: torch.Tensor) -> None:
        """Add ``probs (C, T, T)`` of the tile at ``window``, weighted by ``weights (T, T)``, where it meets the
        block's open rows (rows above ``top`` are final: no tile added later reaches them)."""
        part = window.intersect(self.region).intersect(Window(self.top, self.region.x0, self.region.h, self.region.w))
        if part.empty:
            return
        if part.y1 > self.top + self.capacity:
            raise ValueError(f"tile rows {window.y0}..{window.y1} reach past the ring's {self.capacity} open rows "
                             f"from row {self.top}: hand on the bands above a tile row before adding the next")
        ty, tx = part.y0 - window.y0, part.x0 - window.x0
        ax = part.x0 - self.region.x0
        y, done = part.y0, 0
        while done < part.h:  # at most two pieces: the ring's end and its start
            r = self._ring(y)
            n = min(part.h - done, self.capacity - r)
            w = weights[ty + done : ty + done + n, tx : tx + part.w]
            self.acc[:, r : r + n, ax : ax + part.w].addcmul_(probs[:, ty + done : ty + done + n, tx : tx + part.w], w)
            self.wsum[r : r + n, ax : ax + part.w].add_(w)
            y, done = y + n, done + n

    def ready(self, final: int) -> Iterator[Band]:
        """The rows from ``top`` to ``final`` (the first row a later tile can still reach; at most the block's
        bottom) as bands, one per contiguous piece of the ring. Each band's rows are zeroed for reuse once the
        consumer moves on, so take what is needed from a band before asking for the next."""
        final = min(final, self.region.y1)
        while self.top < final:
            r = self._ring(self.top)
            n = min(final - self.top, self.capacity - r)
            yield Band(Window(self.top, self.region.x0, n, self.region.w), self.acc[:, r : r + n], self.wsum[r : r + n])
            self.acc[:, r : r + n].zero_()
            self.wsum[r : r + n].zero_()
            self.top += n


__all__ = ["Band", "BlockBlend"]
