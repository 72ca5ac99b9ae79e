"""What the driver writes with Dask: labels, confidence and probabilities from lazy probabilities (MagNet's
last stage), and the label pyramid. The blend itself is the workers' (``tests/pipeline/test_blocks.py``)."""

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.blend import argmax_classes, downsample_labels, mode_2x2, store_outputs


def test_store_outputs_argmax_confidence_probabilities(tmp_path):
    expected = np.random.default_rng(3).random((4, 130, 97)).astype(np.float32)
    probs = da.from_array(expected, chunks=(4, 40, 40))
    root = zarr.open_group(str(tmp_path / "out"), mode="w")
    targets = {
        "labels": root.create_array("labels", shape=(130, 97), chunks=(40, 40), dtype="uint8"),
        "confidence": root.create_array("conf", shape=(130, 97), chunks=(40, 40), dtype="float32"),
        "probabilities": root.create_array("probs", shape=(4, 130, 97), chunks=(4, 40, 40), dtype="float16"),
    }
    store_outputs(probs, targets, 4)
    np.testing.assert_array_equal(targets["labels"][:], expected.argmax(0))
    np.testing.assert_array_equal(targets["confidence"][:], expected.max(0))
    np.testing.assert_array_equal(targets["probabilities"][:], expected.astype(np.float16))


def _mode_reference(labels, n):
    """Most frequent class of the real pixels of each block; ties to the top-left pixel."""
    h, w = labels.shape
    out = np.zeros(((h + 1) // 2, (w + 1) // 2), labels.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = labels[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel()
            counts = np.bincount(block, minlength=n)
            best = counts.max()
            assert counts[block[0]] == best or (counts == best).sum() == 1, "a tie without the top-left pixel"
            out[i, j] = block[0] if counts[block[0]] == best else counts.argmax()
    return out


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (1, 5), (33, 2)])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_mode_2x2_matches_reference(shape, n):
    labels = np.random.default_rng(1).integers(0, n, shape).astype(np.uint8)
    np.testing.assert_array_equal(mode_2x2(labels, n), _mode_reference(labels, n))


def test_downsample_labels_chunked_equals_whole(tmp_path):
    labels = np.random.default_rng(2).integers(0, 5, (301, 257)).astype(np.uint8)
    root = zarr.open_group(str(tmp_path / "p"), mode="w")
    src = root.create_array("0", shape=labels.shape, chunks=(64, 64), dtype="uint8")
    src[:] = labels
    dst = root.create_array("1", shape=(151, 129), chunks=(64, 64), dtype="uint8")
    downsample_labels(src, dst, 5)
    np.testing.assert_array_equal(dst[:], mode_2x2(labels, 5))


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9), levels=st.integers(1, 4), seed=st.integers(0, 99))
def test_argmax_classes_is_numpy_argmax_ties_included(c, h, w, levels, seed):
    """Few distinct values, so ties between classes are common: the lower class wins, as in NumPy."""
    probs = np.random.default_rng(seed).integers(0, levels, (c, h, w)).astype(np.float32) / levels
    got = argmax_classes(probs, np.uint8)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, probs.argmax(0))
