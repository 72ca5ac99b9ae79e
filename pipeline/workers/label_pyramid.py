"""A block's label pyramid, made on the worker's device from its level-0 labels as the rows come.

Level ``l`` of the labels is ``mode_2x2`` of level ``l − 1`` (``pipeline.blend.mode_2x2``: the most frequent
class of each 2×2 block, ties to the top-left pixel; an odd last row or column votes with itself repeated). A
block whose region is aligned to ``chunk · 2^l`` at every level it makes (``pyramid_levels``) owns whole chunks
of those levels too, so it writes them and no other writer touches them: the driver then builds only the levels
above (``pipeline.blend.downsample_labels``), which are ``4^K`` times smaller. The labels never come back from
storage to be downsampled: that read, the decode and the 2×2 votes on the host cost about as much CPU per pixel
as writing the labels did.

Rows arrive in order, a band at a time, each band's rows on the device; a band may end on an odd row, whose row
waits for its pair (``carry``). Everything here is tensor work on the labels' device.
"""

from __future__ import annotations

import torch

from pipeline.tiling import Window


def mode_2x2(x: torch.Tensor) -> torch.Tensor:
    """``pipeline.blend.mode_2x2`` of ``(h, w)`` labels (``h`` even) on their device: ``(h/2, ⌈w/2⌉)``."""
    if x.shape[1] % 2:
        x = torch.cat([x, x[:, -1:]], dim=1)
    a, b = x[0::2, 0::2], x[0::2, 1::2]
    c, d = x[1::2, 0::2], x[1::2, 1::2]
    return torch.where((a == b) | (a == c) | (a == d), a, torch.where((b == c) | (b == d), b, torch.where(c == d, c, a)))


def pyramid_levels(n_levels: int, side: int, chunk: int, height: int, width: int) -> int:
    """How many levels above 0 a block of ``side`` px makes: the largest ``K < n_levels`` with every block aligned
    to ``chunk · 2^K`` (``side`` a multiple of it), or all of them when one block covers the level."""
    if side >= height and side >= width:
        return n_levels - 1
    k = 0
    while k + 1 < n_levels and side % (chunk << (k + 1)) == 0:
        k += 1
    return k


def level_window(region: Window, level: int) -> Window:
    """``region`` (level 0, its origin a multiple of ``2^level``) at ``level``: ``⌈·/2^l⌉`` ends."""
    s = 1 << level
    y0, x0 = region.y0 // s, region.x0 // s
    return Window(y0, x0, -(-region.y1 // s) - y0, -(-region.x1 // s) - x0)


class LabelPyramid:
    """Levels ``1 … levels`` of one block's labels (module docstring). ``add(y0, rows)`` takes level-0 rows
    ``[y0, y0 + h)`` of the block's width; it and ``finish`` return ``(level, first row, rows)`` for every row of a
    level that became final, in order."""

    def __init__(self, levels: int, region: Window) -> None:
        self.levels, self.region = levels, region
        self.carry: dict[int, tuple[int, torch.Tensor]] = {}  # level → (its row, the row) awaiting its pair

    def add(self, y0: int, rows: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        return self._push(1, y0, rows)

    def finish(self) -> list[tuple[int, int, torch.Tensor]]:
        """The last row of each level whose height is odd (it votes with itself), once the block's rows are in."""
        out = []
        for level in range(1, self.levels + 1):
            if level - 1 not in self.carry:
                continue
            cy, row = self.carry.pop(level - 1)
            last = level_window(self.region, level - 1).y1 - 1
            if cy != last:
                raise RuntimeError(f"level {level - 1} row {cy} left unpaired before the block's last row {last}")
            down = mode_2x2(torch.stack([row, row]))
            out.append((level, cy // 2, down))
            out += self._push(level + 1, cy // 2, down)
        return out

    def _push(self, level: int, y0: int, rows: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """Rows ``[y0, …)`` of level ``level − 1`` into ``level`` and the levels above it."""
        out = []
        for lv in range(level, self.levels + 1):
            if lv - 1 in self.carry:
                cy, row = self.carry.pop(lv - 1)
                y0, rows = cy, torch.cat([row[None], rows])
            n = rows.shape[0] // 2 * 2
            if rows.shape[0] > n:
                self.carry[lv - 1] = (y0 + n, rows[n])
            if not n:
                break
            rows, y0 = mode_2x2(rows[:n]), y0 // 2
            out.append((lv, y0, rows))
        return out


__all__ = ["LabelPyramid", "level_window", "mode_2x2", "pyramid_levels"]
