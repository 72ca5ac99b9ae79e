"""Metrics agree with direct numpy computations, whatever the chunking; graphs stay lazy and chunk-sized."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from pipeline.evaluation.metrics import (
    BoundaryCounts,
    boundary_counts,
    boundary_graph,
    confusion_graph,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
    precision_recall,
)

IGNORE = 255


def random_pair(shape, classes, seed, ignore_fraction=0.1):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, classes, shape).astype(np.uint8)
    gt = np.where(rng.random(shape) < 0.7, pred, rng.integers(0, classes, shape)).astype(np.uint8)
    gt[rng.random(shape) < ignore_fraction] = IGNORE
    return pred, gt


def blobs(shape, classes, seed, n=25):
    """Discs and rectangles of random classes on class 0: masks with long, curved boundaries."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        c = rng.integers(1, classes)
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(5, max(6, min(shape) // 4))
        if rng.random() < 0.5:
            out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = c
        else:
            out[max(cy - r, 0) : cy + r, max(cx - 2 * r, 0) : cx + r] = c
    return out


def blob_pair(shape, classes, seed):
    gt = blobs(shape, classes, seed)
    pred = np.roll(blobs(shape, classes, seed), (2, -1), axis=(0, 1))  # shifted edges: partly within tolerance
    pred[blobs(shape, 2, seed + 1, n=4) == 1] = classes - 1  # plus some wrong regions
    gt[blobs(shape, 2, seed + 2, n=3) == 1] = IGNORE
    return pred, gt


def numpy_confusion(pred, gt, classes, ignore=IGNORE):
    keep = gt != ignore
    cm = np.zeros((classes, classes), np.int64)
    np.add.at(cm, (gt[keep].astype(int), pred[keep].astype(int)), 1)
    return cm


# ---------------------------------------------------------------- confusion matrix


@pytest.mark.parametrize("shape, pred_chunks, gt_chunks", [
    ((517, 389), 128, (100, 90)), ((517, 389), (517, 389), 64), ((64, 64), 64, 64), ((1, 700), (1, 128), 50)])
def test_confusion_matches_numpy_whatever_the_chunks(shape, pred_chunks, gt_chunks):
    pred, gt = random_pair(shape, 5, seed=sum(shape))
    cm = confusion_matrix(da.from_array(pred, chunks=pred_chunks), da.from_array(gt, chunks=gt_chunks), 5)
    assert cm.dtype == np.int64 and cm.shape == (5, 5)
    np.testing.assert_array_equal(cm, numpy_confusion(pred, gt, 5))
    assert cm.sum() == (gt != IGNORE).sum()


def test_confusion_rows_are_gt_and_columns_pred():
    gt = np.array([[0, 0, 1, 2]], np.uint8)
    pred = np.array([[0, 1, 1, 1]], np.uint8)
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 3), [[1, 1, 0], [0, 1, 0], [0, 1, 0]])


def test_without_ignore_index_every_pixel_counts():
    pred, gt = random_pair((40, 30), 4, seed=3, ignore_fraction=0.0)
    cm = confusion_matrix(da.from_array(pred, chunks=16), gt, 4, ignore_index=None)
    np.testing.assert_array_equal(cm, numpy_confusion(pred, gt, 4, ignore=None))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(10, 12\).*\(10, 11\)"):
        confusion_matrix(np.zeros((10, 12), np.uint8), np.zeros((10, 11), np.uint8), 3)


def test_ids_outside_the_classes_are_counted_and_refused():
    pred = np.array([[0, 5, 1]], np.uint8)
    gt = np.array([[7, 1, 255]], np.uint8)
    with pytest.raises(ValueError, match=r"1 ground-truth and 1 predicted pixels.*0\.\.2"):
        confusion_matrix(pred, gt, 3)


# ---------------------------------------------------------------- scores


def test_scores_from_a_hand_made_matrix():
    cm = np.array([[5, 1, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    cm[3, 0] = 4  # class 3 is in the gt but never predicted
    iou = iou_per_class(cm)
    np.testing.assert_allclose(iou[:2], [5 / (5 + 1 + 2 + 4), 3 / (3 + 2 + 1)])
    assert np.isnan(iou[2]) and iou[3] == 0.0  # absent from both → NaN; missed entirely → 0
    assert mean_iou(cm) == pytest.approx(np.mean([iou[0], iou[1], 0.0]))
    assert mean_iou(cm, exclude=[0]) == pytest.approx(np.mean([iou[1], 0.0]))
    assert np.isnan(mean_iou(cm, exclude=[0, 1, 3]))  # nothing left
    assert pixel_accuracy(cm) == pytest.approx(8 / 15)
    precision, recall = precision_recall(cm)
    np.testing.assert_allclose(precision[:2], [5 / 11, 3 / 4])
    np.testing.assert_allclose(recall[[0, 1, 3]], [5 / 6, 3 / 5, 0.0])
    assert np.isnan(precision[2]) and np.isnan(precision[3]) and np.isnan(recall[2])
    assert np.isnan(pixel_accuracy(np.zeros((3, 3))))


def test_scores_match_numpy_on_random_masks_with_absent_classes():
    pred, gt = random_pair((517, 389), 4, seed=7)  # ids 0..3 of 6 classes: 4 and 5 absent
    cm = confusion_matrix(da.from_array(pred, chunks=128), gt, 6)
    keep = gt != IGNORE
    g, p = gt[keep], pred[keep]
    for c in range(4):
        inter, union = np.sum((g == c) & (p == c)), np.sum((g == c) | (p == c))
        assert iou_per_class(cm)[c] == pytest.approx(inter / union)
    assert np.isnan(iou_per_class(cm)[4:]).all()
    expected = np.mean([np.sum((g == c) & (p == c)) / np.sum((g == c) | (p == c)) for c in (1, 2, 3)])
    assert mean_iou(cm, exclude=[0]) == pytest.approx(expected)
    assert pixel_accuracy(cm) == pytest.approx(np.mean(g == p))


# ---------------------------------------------------------------- boundary F1


def reference_boundary(mask, valid):
    """Pixel by pixel: valid pixels with a valid 4-neighbour of another id."""
    h, w = mask.shape
    out = np.zeros(mask.shape, bool)
    for y in range(h):
        for x in range(w):
            if not valid[y, x]:
                continue
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and valid[ny, nx] and mask[ny, nx] != mask[y, x]:
                    out[y, x] = True
    return out


def reference_matched(src, dst, tol, distance):
    """Pixels of ``src`` with a pixel of ``dst`` within ``tol``, by brute force over all pairs."""
    s, d = np.argwhere(src), np.argwhere(dst)
    if len(s) == 0 or len(d) == 0:
        return 0
    diff = np.abs(s[:, None, :] - d[None, :, :])
    dist = np.sqrt((diff**2).sum(-1)) if distance == "euclidean" else diff.max(-1)
    return int((dist.min(1) <= tol).sum())


@pytest.mark.parametrize("distance", ["euclidean", "chessboard"])
@pytest.mark.parametrize("tol", [0, 1, 3])
def test_boundary_counts_match_a_brute_force_reference(tol, distance):
    pred, gt = blob_pair((70, 55), 4, seed=11)
    valid = gt != IGNORE
    pb, gb = reference_boundary(pred, valid), reference_boundary(gt, valid)
    expected = BoundaryCounts(int(pb.sum()), reference_matched(pb, gb, tol, distance),
                              int(gb.sum()), reference_matched(gb, pb, tol, distance))
    assert expected.pred > 50 and expected.gt > 50 and 0 < expected.pred_matched < expected.pred
    assert boundary_counts(pred, gt, tol, IGNORE, distance) == expected


@pytest.mark.parametrize("distance", ["euclidean", "chessboard"])
@pytest.mark.parametrize("shape, tol, chunks", [
    ((517, 389), 3, 128), ((517, 389), 3, (50, 77)), ((517, 389), 0, 128), ((517, 389), 10, (128, 389)),
    ((61, 47), 5, 3),  # chunks smaller than the halo are merged first
])
def test_chunked_boundary_counts_equal_the_whole_array(shape, tol, chunks, distance):
    pred, gt = blob_pair(shape, 5, seed=5)
    whole = boundary_counts(pred, gt, tol, IGNORE, distance)
    chunked = boundary_graph(da.from_array(pred, chunks=chunks), da.from_array(gt, chunks=(100, 90)), tol, IGNORE,
                             distance).compute()
    assert BoundaryCounts(*chunked.tolist()) == whole
    assert 0 < whole.pred_matched < whole.pred and 0 < whole.gt_matched < whole.gt


def test_boundary_of_a_sliver_and_without_ignore_index():
    pred, gt = blob_pair((3, 300), 3, seed=2)
    gt[gt == IGNORE] = 0
    for p, g in ((pred, gt), (pred.T.copy(), gt.T.copy())):
        got = boundary_graph(da.from_array(p, chunks=64), da.from_array(g, chunks=64), 3, None).compute()
        assert BoundaryCounts(*got.tolist()) == boundary_counts(p, g, 3, None)


def test_boundary_scores():
    assert BoundaryCounts(10, 8, 20, 10).scores() == pytest.approx((0.8, 0.5, 2 * 0.8 * 0.5 / 1.3))
    assert BoundaryCounts(0, 0, 5, 0).scores() == (0.0, 0.0, 0.0)
    assert all(np.isnan(BoundaryCounts(0, 0, 0, 0).scores()))
    assert BoundaryCounts(1, 1, 2, 2) + BoundaryCounts(3, 2, 1, 0) == BoundaryCounts(4, 3, 3, 2)


def test_boundary_ignores_edges_against_ignore_pixels_and_the_image_border():
    gt = np.zeros((6, 6), np.uint8)
    gt[:, 3:] = IGNORE  # an ignore region is not a class: no boundary along it
    pred = np.zeros((6, 6), np.uint8)
    assert boundary_counts(pred, gt, 1) == BoundaryCounts(0, 0, 0, 0)


# ---------------------------------------------------------------- out of core


def _never(block):
    raise AssertionError("a metric graph was computed while only being built")


def test_graphs_of_a_20000_square_pair_are_built_without_computing():
    zeros = da.zeros((20000, 20000), dtype=np.uint8, chunks=1024)
    pred, gt = zeros.map_blocks(_never, dtype=np.uint8), zeros.map_blocks(_never, dtype=np.uint8)
    cm, bf = confusion_graph(pred, gt, 7), boundary_graph(pred, gt, 3)
    assert cm.shape == (8, 8) and bf.shape == (4,)
    blocks = 20 * 20
    assert len(cm.__dask_graph__()) < 6 * blocks  # O(chunks) tasks
    assert len(bf.__dask_graph__()) < 40 * blocks  # map_overlap adds halo slices per chunk


def test_every_task_sees_one_chunk_plus_its_halo(monkeypatch):
    """Memory is flat by construction: the block functions never see more than a chunk (+ 2·(tol + 1))."""
    from pipeline.evaluation import metrics

    seen = []
    for name in ("_block_confusion", "_boundary_block"):
        original = getattr(metrics, name)

        def spy(gt, *args, _original=original, **kwargs):
            seen.append(gt.shape)
            return _original(gt, *args, **kwargs)

        monkeypatch.setattr(metrics, name, spy)
    pred, gt = (da.zeros((2100, 1500), dtype=np.uint8, chunks=512) for _ in range(2))
    gt = gt.rechunk(700)  # a different storage chunking, rechunked to the prediction's
    assert confusion_graph(pred, gt, 3).compute()[0, 0] == 2100 * 1500
    assert BoundaryCounts(*boundary_graph(pred, gt, 3).compute().tolist()) == BoundaryCounts(0, 0, 0, 0)
    real = [s for s in seen if min(s) > 1]  # dask may call with tiny meta arrays
    assert len(real) >= 2 * 5 * 3 and max(max(s) for s in real) <= 512 + 2 * 4
