"""Segmentation metrics out of core: confusion matrix and boundary F1 as Dask graphs, scores from counts.

Every pixel-level quantity is a sum of per-chunk counts, so a 100,000² pair is scored one chunk at a time:
each task reads one chunk of the prediction and one of the ground truth (plus a ``tol + 1`` halo for the
boundary F1) and returns a few integers; Dask adds them up in a tree. Scores (IoU, accuracy, F1) are pure
functions of the summed counts, so per-image counts can also be summed across images first.

Memory: the confusion matrix holds one chunk pair per worker thread whatever the image size. The boundary
F1's halos come from neighbouring chunks, so Dask keeps about three rows of chunks alive: memory grows with
the image width, not its area (1024² chunks: 66 MB of chunks held at 16384², 177 MB at 32768²).

Conventions: class ids are integers ``0 ≤ id < C``; ground-truth pixels equal to ``ignore_index`` are left
out of every count; the confusion matrix has rows = ground truth, columns = prediction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import dask.array as da
import numpy as np

Distance = Literal["euclidean", "chessboard"]


# ---------------------------------------------------------------- confusion matrix


def confusion_graph(
    pred: da.Array | np.ndarray,
    gt: da.Array | np.ndarray,
    num_classes: int,
    ignore_index: int | None = 255,
    chunks: int | tuple[int, ...] | None = None,
) -> da.Array:
    """Lazy extended confusion matrix ``(C + 1, C + 1)`` int64: rows gt, columns pred.

    Row/column ``C`` count ids outside ``0..C-1`` (a wrong ``num_classes``); ``confusion_matrix`` checks they
    are empty. Both masks are rechunked to ``chunks`` (default: the prediction's); each chunk pair becomes one
    ``bincount(gt · (C + 1) + pred)`` and the per-chunk matrices are summed as a tree reduction.
    """
    pred, gt = _common_chunks(pred, gt, chunks)
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}.")
    k = num_classes + 1
    nd = pred.ndim
    per_block = da.map_blocks(
        _block_confusion, gt, pred, num_classes=num_classes, ignore_index=ignore_index,
        dtype=np.int64, chunks=tuple((1,) * len(c) for c in pred.chunks) + ((k,), (k,)),
        new_axis=[nd, nd + 1], meta=np.empty((0,) * (nd + 2), np.int64),
    )
    return per_block.sum(axis=tuple(range(nd)), dtype=np.int64)


def confusion_matrix(
    pred: da.Array | np.ndarray,
    gt: da.Array | np.ndarray,
    num_classes: int,
    ignore_index: int | None = 255,
    chunks: int | tuple[int, ...] | None = None,
) -> np.ndarray:
    """Confusion matrix ``(C, C)`` int64, ``M[g, p]`` = pixels with gt class ``g`` predicted ``p``.

    Ground-truth pixels equal to ``ignore_index`` are not counted. Raises ``ValueError`` when either mask holds
    ids outside ``0..C-1`` (other than ignored gt pixels), with the counts.
    """
    return check_confusion(np.asarray(confusion_graph(pred, gt, num_classes, ignore_index, chunks).compute()))


def check_confusion(extended: np.ndarray, where: str = "") -> np.ndarray:
    """``(C, C)`` part of an extended confusion matrix; raises if ids outside ``0..C-1`` were counted."""
    c = extended.shape[0] - 1
    bad_gt, bad_pred = int(extended[c].sum()), int(extended[:, c].sum())
    if bad_gt or bad_pred:
        at = f"{where}: " if where else ""
        raise ValueError(
            f"{at}{bad_gt} ground-truth and {bad_pred} predicted pixels hold class ids outside 0..{c - 1} "
            f"(num_classes={c}); give the right number of classes, or set ignore_index to the gt's ignore value."
        )
    return extended[:c, :c]


def _block_confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    g, p = gt.ravel(), pred.ravel()
    if ignore_index is not None:
        keep = g != ignore_index
        g, p = g[keep], p[keep]
    k = num_classes + 1
    g = np.where((g >= 0) & (g < num_classes), g, num_classes).astype(np.int64)
    p = np.where((p >= 0) & (p < num_classes), p, num_classes).astype(np.int64)
    counts = np.bincount(g * k + p, minlength=k * k).reshape(k, k)
    return counts.reshape((1,) * gt.ndim + (k, k))


def _common_chunks(pred, gt, chunks) -> tuple[da.Array, da.Array]:
    pred, gt = da.asarray(pred), da.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}; both masks must cover "
            "the same pixels (same image, same pyramid level)."
        )
    target = pred.chunks if chunks is None else chunks
    return pred.rechunk(target), gt.rechunk(target)


# ---------------------------------------------------------------- scores from a confusion matrix


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` ``(C,)`` float64, with ``TP_c = M[c, c]``,
    ``FN_c = Σ_p M[c, p] − TP_c`` (row), ``FP_c = Σ_g M[g, c] − TP_c`` (column).
    NaN for a class absent from both gt and prediction (denominator 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    return _ratio(tp, cm.sum(0) + cm.sum(1) - tp)


def mean_iou(cm: np.ndarray, exclude: Iterable[int] = ()) -> float:
    """``mIoU = mean_c IoU_c`` over classes not in ``exclude`` whose IoU is defined (absent classes, NaN,
    are left out of the mean). NaN when no class is left."""
    iou = iou_per_class(cm)
    keep = np.ones(len(iou), bool)
    keep[[c for c in exclude if 0 <= c < len(iou)]] = False
    kept = iou[keep & ~np.isnan(iou)]
    return float(kept.mean()) if kept.size else float("nan")


def pixel_accuracy(cm: np.ndarray) -> float:
    """``trace(M) / Σ M``: the fraction of counted (non-ignored) pixels predicted right; NaN if none."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def precision_recall(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class ``precision_c = TP_c / Σ_g M[g, c]`` (column) and ``recall_c = TP_c / Σ_p M[c, p]`` (row),
    each ``(C,)`` float64, NaN where the class is never predicted (precision) or never in the gt (recall)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    return _ratio(tp, cm.sum(0)), _ratio(tp, cm.sum(1))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


# ---------------------------------------------------------------- boundary F1


@dataclass(frozen=True)
class BoundaryCounts:
    """Boundary pixel counts: predicted, predicted within ``tol`` of a gt boundary, gt, gt within ``tol`` of a
    predicted boundary. Counts add across chunks and images."""

    pred: int
    pred_matched: int
    gt: int
    gt_matched: int

    def __add__(self, other: BoundaryCounts) -> BoundaryCounts:
        return BoundaryCounts(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.pred, self.pred_matched, self.gt, self.gt_matched

    def scores(self) -> tuple[float, float, float]:
        """``(precision, recall, F1)``: ``P = pred_matched / pred``, ``R = gt_matched / gt``,
        ``F1 = 2PR / (P + R)``. A side with no boundary pixels scores 0 (nothing found or nothing right),
        except that all three are NaN when neither mask has a boundary (nothing to score)."""
        if self.pred == 0 and self.gt == 0:
            return float("nan"), float("nan"), float("nan")
        p = self.pred_matched / self.pred if self.pred else 0.0
        r = self.gt_matched / self.gt if self.gt else 0.0
        return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def boundary_counts(
    pred: np.ndarray, gt: np.ndarray, tol: int = 3, ignore_index: int | None = 255,
    distance: Distance = "euclidean",
) -> BoundaryCounts:
    """Boundary F1 counts of a whole in-memory pair ``(H, W)`` (the reference ``boundary_graph`` matches).

    Overall, not per class: a pixel is a boundary pixel of a mask when one of its 4-neighbours inside the
    image has a different class id. Ground-truth ignore pixels are neither boundary pixels nor neighbours
    (as if outside the image). A predicted boundary pixel is matched when a gt boundary pixel lies within
    distance ``≤ tol`` (Euclidean ``√(dy² + dx²)`` or chessboard ``max(|dy|, |dx|)``), and symmetrically.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"boundary F1 needs two 2-D masks of one shape, got {pred.shape} and {gt.shape}.")
    counts = _boundary_block(gt, pred, tol=tol, distance=distance, ignore_index=ignore_index, depth=0)
    return BoundaryCounts(*counts[0, 0].tolist())


def boundary_graph(
    pred: da.Array | np.ndarray,
    gt: da.Array | np.ndarray,
    tol: int = 3,
    ignore_index: int | None = 255,
    distance: Distance = "euclidean",
    chunks: int | tuple[int, ...] | None = None,
) -> da.Array:
    """Lazy ``BoundaryCounts`` fields ``(4,)`` int64 of a 2-D pair, chunk by chunk (see ``boundary_counts``).

    ``da.map_overlap`` gives each chunk a halo of ``tol + 1`` pixels from its neighbours (1 to classify a
    pixel, ``tol`` to reach a match) and none past the image edge, so chunked counts equal whole-image
    counts. Each task counts over its own chunk only; the counts are summed.
    """
    if tol < 0:
        raise ValueError(f"boundary tolerance must be ≥ 0 pixels, got {tol}.")
    if distance not in ("euclidean", "chessboard"):
        raise ValueError(f"distance must be 'euclidean' or 'chessboard', got {distance!r}.")
    pred, gt = _common_chunks(pred, gt, chunks)
    if pred.ndim != 2:
        raise ValueError(f"boundary F1 needs 2-D (H, W) masks, got shape {pred.shape}.")
    depth = tol + 1
    kwargs = dict(tol=tol, distance=distance, ignore_index=ignore_index, dtype=np.int64, new_axis=[2],
                  meta=np.empty((0, 0, 0), np.int64))
    if min(pred.shape) < depth:  # a sliver of an image: one task over the whole of it, no halo needed
        return da.map_blocks(_boundary_block, gt.rechunk(-1), pred.rechunk(-1), depth=0, chunks=((1,), (1,), (4,)),
                             **kwargs).sum(axis=(0, 1), dtype=np.int64)
    target = tuple(_merge_short(c, depth) for c in pred.chunks)  # map_overlap needs chunks ≥ depth
    gt, pred = gt.rechunk(target), pred.rechunk(target)
    per_block = da.map_overlap(
        _boundary_block, gt, pred, depth=depth, boundary="none", trim=False, allow_rechunk=False,
        halo=depth, chunks=tuple((1,) * len(c) for c in target) + ((4,),), **kwargs,
    )
    return per_block.sum(axis=(0, 1), dtype=np.int64)


def _merge_short(chunks: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """Chunk sizes along one axis with every chunk shorter than ``minimum`` merged into its neighbour."""
    out: list[int] = []
    for c in chunks:
        if out and (c < minimum or out[-1] < minimum):
            out[-1] += c
        else:
            out.append(c)
    return tuple(out)


def _boundary_block(
    gt: np.ndarray, pred: np.ndarray, *, tol: int, distance: Distance, ignore_index: int | None,
    depth: int = 0, halo: int = 0, block_info: dict | None = None,
) -> np.ndarray:
    """Counts ``(1, 1, 4)`` over the block without its halo: ``halo`` pixels on every side that has a
    neighbouring chunk (``block_info`` says which; none past the image edge), or ``depth`` on every side."""
    rim = [(depth, depth), (depth, depth)]
    if halo and block_info is not None:
        loc, num = block_info[0]["chunk-location"], block_info[0]["num-chunks"]
        rim = [(halo if loc[a] > 0 else 0, halo if loc[a] < num[a] - 1 else 0) for a in (0, 1)]
    valid = np.ones(gt.shape, bool) if ignore_index is None else gt != ignore_index
    gb, pb = _boundary(gt, valid), _boundary(pred, valid)
    gd, pd = _dilate(gb, tol, distance), _dilate(pb, tol, distance)
    core = tuple(slice(lo, n - hi) for (lo, hi), n in zip(rim, gb.shape, strict=True))
    pb, gb, gd, pd = pb[core], gb[core], gd[core], pd[core]
    counts = [np.count_nonzero(pb), np.count_nonzero(pb & gd), np.count_nonzero(gb), np.count_nonzero(gb & pd)]
    return np.asarray(counts, np.int64).reshape(1, 1, 4)


def _boundary(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Valid pixels with a valid 4-neighbour of a different id."""
    out = np.zeros(mask.shape, bool)
    for axis in (0, 1):
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        edge = (mask[lo] != mask[hi]) & valid[lo] & valid[hi]
        out[lo] |= edge
        out[hi] |= edge
    return out


def _dilate(b: np.ndarray, r: int, distance: Distance) -> np.ndarray:
    """Binary dilation by a disk ``dy² + dx² ≤ r²`` or a square ``max(|dy|, |dx|) ≤ r`` (shifted maxima)."""
    if r == 0:
        return b.copy()
    if distance == "chessboard":
        return _shift_max(_shift_max(b, r, 0), r, 1)
    rows = [_shift_max(b, dy_span, 1) for dy_span in range(r + 1)]  # rows[s]: dilated by |dx| ≤ s along x
    out = np.zeros_like(b)
    for dy in range(-r, r + 1):
        span = int(np.floor(np.sqrt(r * r - dy * dy)))
        _or_shifted(out, rows[span], dy, 0)
    return out


def _shift_max(b: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Max of ``b`` over offsets ``-r..r`` along ``axis`` (zero outside)."""
    out = b.copy()
    for s in range(1, r + 1):
        _or_shifted(out, b, s, axis)
        _or_shifted(out, b, -s, axis)
    return out


def _or_shifted(out: np.ndarray, b: np.ndarray, s: int, axis: int) -> None:
    """``out[i] |= b[i + s]`` along ``axis`` where ``i + s`` is inside."""
    n = b.shape[axis]
    if abs(s) >= n:
        return
    dst = [slice(None)] * b.ndim
    src = [slice(None)] * b.ndim
    dst[axis], src[axis] = (slice(0, n - s), slice(s, n)) if s >= 0 else (slice(-s, n), slice(0, n + s))
    out[tuple(dst)] |= b[tuple(src)]
