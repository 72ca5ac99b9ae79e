"""What the driver writes with Dask: a stage's merged probabilities into the masks (MagNet's last stage), and the
label pyramid of every image, chunk by chunk.

The blend itself runs on the workers, block by block (``pipeline.workers.worker``):

    P(q) = Σ_t w_t(q) · p_t(q) / Σ_t w_t(q)        over the tiles t whose window covers q,

with ``w_t`` the tile's blend window (``tiling.window_2d``) placed at the tile's origin. Here
``store_outputs`` stores the argmax, the confidence (max probability) and the probabilities of lazy
probabilities from one graph, so they are computed once for all of them, each Dask task owning whole output
chunks; ``downsample_labels`` builds level l of the label pyramid from level l − 1 by the 2×2 mode.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import zarr


def labels_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


def store_outputs(
    probs: da.Array, targets: dict[str, zarr.Array], num_classes: int, scheduler: Any = None,
    rows: tuple[int, int] | None = None,
) -> None:
    """Store the requested outputs of lazy ``(C, H, W)`` probabilities, computed once for all of them.

    ``targets`` maps ``"labels"`` (required), ``"confidence"`` and ``"probabilities"`` to pre-created Zarr
    arrays whose chunks equal the probabilities' chunks, so each Dask task owns whole output chunks.
    ``rows = (y0, y1)``, on chunk boundaries: only those rows.
    """
    y = slice(None) if rows is None else slice(*rows)
    probs = probs[:, y]
    dtype = labels_dtype(num_classes)
    sources = [probs.map_blocks(argmax_classes, dtype, drop_axis=0, dtype=dtype)]
    dests, regions = [targets["labels"]], [(y, slice(None))]
    if "confidence" in targets:
        sources.append(probs.map_blocks(np.max, axis=0, drop_axis=0, dtype=np.float32))
        dests.append(targets["confidence"])
        regions.append((y, slice(None)))
    if "probabilities" in targets:
        sources.append(probs.astype(np.float16))
        dests.append(targets["probabilities"])
        regions.append((slice(None), y, slice(None)))
    da.store(sources, dests, regions=regions, lock=False, compute=True, scheduler=scheduler or "threads")


def argmax_classes(probs: np.ndarray, dtype=np.uint8) -> np.ndarray:
    """``probs.argmax(axis=0)`` of ``(C, h, w)`` as ``dtype``, ties to the lower class as NumPy's.

    One running maximum compared class by class: a few contiguous passes instead of a strided reduction
    over the class axis (0.25 against 0.68 s for 64 chunks of 4×1024² here). A NaN is never taken over a
    number here, where ``np.argmax`` would take the first NaN; the blend's probabilities are NaN only where
    no tile ran (MagNet-Fast), and those pixels are merged from the previous stage before any argmax.
    """
    best = probs[0].copy()
    out = np.zeros(probs.shape[1:], dtype)
    for c in range(1, probs.shape[0]):
        higher = probs[c] > best
        np.copyto(best, probs[c], where=higher)
        out[higher] = c
    return out


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
