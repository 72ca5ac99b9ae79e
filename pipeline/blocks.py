"""Blocks: the unit of work a worker takes. A block is a rectangle of output chunks of one stage's level; the
worker runs every tile that overlaps it, blends them on its device and writes the block's chunks, finished.

Geometry (pure functions; ``grid`` the stage's ``TileGrid``, ``chunk`` the output chunk side)::

    blocks      the level cut into rectangles of whole chunks, ≤ ``side`` px a side (``side`` a multiple of
                ``chunk``): rows [i·side, min((i+1)·side, H)), likewise columns
    block tiles the tiles whose window overlaps the block: ``grid.tiles_overlapping(block)``
    owned tiles each tile belongs to the one block holding the centre of its window clipped to the image

Every pixel of a block is covered by exactly the tiles of the block's tile set that cover it in the whole grid,
so a block's blend is the whole image's blend there: blocks need no seam pass, and the output does not depend
on the block size (``tests/pipeline/test_blocks.py``). The price is that a tile straddling a block edge runs
once per block it overlaps: ``duplication`` = Σ block tiles ÷ grid tiles − 1, about ``T/side`` per axis
(3 % at side 16384 with 512 px tiles), none for a level of one block.

Block ``(by, bx)`` owns its chunks, and no other block writes them: one writer per chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.tiling import TileGrid, Window

Tile = tuple[int, int]


@dataclass(frozen=True)
class Block:
    """Block ``index = (by, bx)`` of a stage: its ``region`` (chunk-aligned, inside the level)."""

    index: tuple[int, int]
    region: Window

    @property
    def name(self) -> str:
        return f"{self.index[0]}-{self.index[1]}"


def block_side(side: int, chunk: int) -> int:
    """``side`` rounded down to a multiple of ``chunk`` (at least one chunk)."""
    return max(chunk, side // chunk * chunk)


def plan_blocks(height: int, width: int, chunk: int, side: int) -> list[Block]:
    """The blocks of an ``height × width`` level (module docstring), row by row."""
    s = block_side(side, chunk)
    return [Block((by, bx), Window(y, x, min(s, height - y), min(s, width - x)))
            for by, y in enumerate(range(0, height, s)) for bx, x in enumerate(range(0, width, s))]


def block_tiles(grid: TileGrid, block: Block, subset: frozenset[Tile] | None = None, halo: int = 0) -> list[Tile]:
    """The tiles the block runs, in grid order (row by row): all that overlap its region grown by ``halo`` (within
    the level), or those of ``subset``."""
    r = block.region
    region = Window(r.y0 - halo, r.x0 - halo, r.h + 2 * halo, r.w + 2 * halo).clip(grid.height, grid.width)
    tiles = grid.tiles_overlapping(region)
    return tiles if subset is None else [t for t in tiles if t in subset]


def owner(grid: TileGrid, tile: Tile, side: int, chunk: int) -> tuple[int, int]:
    """The block holding the centre of ``tile``'s window clipped to the level: ``⌊c / side⌋`` per axis."""
    w = grid.window(*tile).clip(grid.height, grid.width)
    s = block_side(side, chunk)
    return ((w.y0 + w.y1 - 1) // 2 // s, (w.x0 + w.x1 - 1) // 2 // s)


def owned_counts(grid: TileGrid, side: int, chunk: int, subset: frozenset[Tile] | None = None) -> dict[tuple, int]:
    """How many tiles (of ``subset``, default all) each block owns; they sum to the tile count."""
    counts: dict[tuple, int] = {}
    for t in grid.indices() if subset is None else sorted(subset):
        b = owner(grid, t, side, chunk)
        counts[b] = counts.get(b, 0) + 1
    return counts


def duplication(grid: TileGrid, blocks: list[Block], subset: frozenset[Tile] | None = None) -> float:
    """Σ block tiles ÷ tiles − 1: the share of tile runs spent on tiles another block runs too."""
    runs = sum(len(block_tiles(grid, b, subset)) for b in blocks)
    total = len(grid) if subset is None else len(subset)
    return runs / total - 1 if total else 0.0


def blocks_needed(height: int, width: int, chunk: int, side: int) -> int:
    s = block_side(side, chunk)
    return math.ceil(height / s) * math.ceil(width / s)


__all__ = ["Block", "Tile", "block_side", "block_tiles", "blocks_needed", "duplication", "owned_counts", "owner",
           "plan_blocks"]
