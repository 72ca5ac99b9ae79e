"""Dask blend of overlapping tile predictions, argmax and label pyramid, chunk by chunk.

For an output chunk ``Q`` the blended probabilities are

    P(q) = Σ_t w_t(q) · p_t(q) / Σ_t w_t(q)        over the tiles t whose window covers q,

with ``w_t`` the tile's blend window (``tiling.window_2d``) placed at the tile's origin. Each output
chunk is one Dask task that reads only the tiles overlapping it, so memory per task is one chunk's
probabilities plus one tile, whatever the image size, and each output chunk has exactly one writer.
The argmax, the confidence (max probability) and the probabilities are stored from the same graph, so
the blend is computed once for all of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.storage import zarr_store
from pipeline.tiling import BlendWindow, TileGrid, Window, window_2d


@dataclass(frozen=True)
class BlendPlan:
    grid: TileGrid
    tiles_url: str
    num_classes: int
    window: BlendWindow = "gaussian"
    sigma_scale: float = 0.125
    chunk: int = 1024
    storage_options: dict[str, Any] | None = None
    tiles: frozenset[tuple[int, int]] | None = None  # the tiles that ran (MagNet-Fast); None: every tile

    def expected(self) -> set[tuple[int, int]]:
        return set(self.grid.indices()) if self.tiles is None else set(self.tiles)


class _TileSource:
    """Opens the tile store lazily, once per process (Dask threads share it)."""

    def __init__(self, url: str, storage_options):
        self.url, self.storage_options = url, storage_options
        self._array = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(state["url"], state["storage_options"])

    @property
    def array(self) -> zarr.Array:
        with self._lock:
            if self._array is None:
                store = zarr_store(self.url, self.storage_options, read_only=True)
                self._array = zarr.open_array(store=store, mode="r")
            return self._array


def blend_region(plan: BlendPlan, tiles: _TileSource, region: Window) -> np.ndarray:
    """Blended probabilities ``(C, region.h, region.w)`` float32 of ``region`` (formula above)."""
    acc = np.zeros((plan.num_classes, region.h, region.w), np.float32)
    wsum = np.zeros((region.h, region.w), np.float32)
    w2d = window_2d(plan.window, plan.grid.tile, plan.sigma_scale)
    for iy, ix in plan.grid.tiles_overlapping(region):
        if plan.tiles is not None and (iy, ix) not in plan.tiles:
            continue
        tw = plan.grid.window(iy, ix)
        part = tw.intersect(region)
        ty, tx = part.y0 - tw.y0, part.x0 - tw.x0
        ry, rx = part.y0 - region.y0, part.x0 - region.x0
        p = np.asarray(tiles.array[iy, ix, :, ty : ty + part.h, tx : tx + part.w], dtype=np.float32)
        w = w2d[ty : ty + part.h, tx : tx + part.w]
        acc[:, ry : ry + part.h, rx : rx + part.w] += p * w
        wsum[ry : ry + part.h, rx : rx + part.w] += w
    if plan.tiles is None:
        acc /= wsum
    else:  # a subset of the tiles ran: pixels none of them covers are NaN
        acc = np.divide(acc, wsum, out=np.full_like(acc, np.nan), where=(wsum > 0)[None])
    return acc


def blended_probabilities(plan: BlendPlan) -> da.Array:
    """Lazy ``(C, H, W)`` float32 Dask array of blended probabilities, chunks ``(C, chunk, chunk)``."""
    h, w, c = plan.grid.height, plan.grid.width, plan.chunk
    source = _TileSource(plan.tiles_url, plan.storage_options)
    ychunks = tuple(min(c, h - y) for y in range(0, h, c))
    xchunks = tuple(min(c, w - x) for x in range(0, w, c))

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        return blend_region(plan, source, Window(y0, x0, y1 - y0, x1 - x0))

    return da.map_blocks(
        block, dtype=np.float32, chunks=((plan.num_classes,), ychunks, xchunks), meta=np.empty((0, 0, 0), np.float32)
    )


def labels_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


def check_complete(plan: BlendPlan) -> None:
    """Refuse to blend a tile store with missing tiles (one listing, not a scan of every tile)."""
    from pipeline.output import finished_tiles

    missing = plan.expected() - finished_tiles(plan.tiles_url, plan.storage_options or {})
    if missing:
        raise RuntimeError(
            f"{len(missing)} tile(s) of {plan.tiles_url} are missing, e.g. {sorted(missing)[:3]}; the blend "
            "needs every tile: rerun the job to resume the missing tiles"
        )


def store_outputs(
    probs: da.Array, targets: dict[str, zarr.Array], num_classes: int, scheduler: Any = None
) -> None:
    """Store the requested outputs of lazy ``(C, H, W)`` probabilities, computed once for all of them.

    ``targets`` maps ``"labels"`` (required), ``"confidence"`` and ``"probabilities"`` to pre-created Zarr
    arrays whose chunks equal the probabilities' chunks, so each Dask task owns whole output chunks.
    """
    sources, dests = [probs.argmax(axis=0).astype(labels_dtype(num_classes))], [targets["labels"]]
    if "confidence" in targets:
        sources.append(probs.max(axis=0).astype(np.float32))
        dests.append(targets["confidence"])
    if "probabilities" in targets:
        sources.append(probs.astype(np.float16))
        dests.append(targets["probabilities"])
    da.store(sources, dests, lock=False, compute=True, scheduler=scheduler or "threads")


def store_blend(plan: BlendPlan, targets: dict[str, zarr.Array], scheduler: Any = None) -> None:
    """Check every tile is there, then blend and store the outputs (``store_outputs``)."""
    check_complete(plan)
    store_outputs(blended_probabilities(plan), targets, plan.num_classes, scheduler)


def mode_2x2(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Downsample ``(h, w)`` labels by 2 with the most frequent class of each 2×2 block.

    Output ``(⌈h/2⌉, ⌈w/2⌉)``. With the block's pixels ``a b / c d`` (an odd edge repeats its last
    row/column, so a cut block votes with the pixels it has): ``a`` if it equals any of b, c, d; else
    ``b`` if it equals c or d; else ``c`` if ``c == d``; else ``a``. That is the exact mode, ties going to
    the top-left pixel (a 2–2 tie always contains ``a``). Four comparisons per output pixel, whatever
    the class count (``num_classes`` is accepted for symmetry with other reducers and unused).
    """
    h, w = labels.shape
    if h % 2 or w % 2:
        labels = np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")
    a, b = labels[0::2, 0::2], labels[0::2, 1::2]
    c, d = labels[1::2, 0::2], labels[1::2, 1::2]
    return np.where((a == b) | (a == c) | (a == d), a, np.where((b == c) | (b == d), b, np.where(c == d, c, a)))


def downsample_labels(src: zarr.Array, dst: zarr.Array, num_classes: int, scheduler: Any = None) -> None:
    """Write ``dst`` (level l) from ``src`` (level l−1, already written) by ``mode_2x2``, chunk-local.

    Reads source blocks of twice the destination chunk, so each destination chunk is one task; the
    result is cropped to ``dst``'s shape (for in-place pyramids whose levels use ⌊h/2⌋).
    """
    cy, cx = dst.chunks
    s = da.from_zarr(src, chunks=(2 * cy, 2 * cx))
    out = s.map_blocks(
        mode_2x2, num_classes, dtype=src.dtype,
        chunks=(tuple((n + 1) // 2 for n in s.chunks[0]), tuple((n + 1) // 2 for n in s.chunks[1])),
    )
    out = out[: dst.shape[0], : dst.shape[1]]
    if out.shape != dst.shape:  # destination larger than ⌈src/2⌉ cannot happen for a 2× pyramid
        raise ValueError(f"label level shape {dst.shape} does not follow from {src.shape} by 2× downsampling")
    da.store(out.rechunk(dst.chunks), dst, lock=False, compute=True, scheduler=scheduler or "threads")
