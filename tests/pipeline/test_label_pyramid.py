"""The label pyramid a block makes on its device equals the driver's 2×2 mode, level by level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.blend import mode_2x2
from pipeline.tiling import Window
from pipeline.workers.label_pyramid import LabelPyramid, level_window, mode_2x2 as mode_2x2_device, pyramid_levels


def _reference(labels: np.ndarray, levels: int) -> list[np.ndarray]:
    out = [labels]
    for _ in range(levels):
        out.append(mode_2x2(out[-1]))
    return out


@pytest.mark.parametrize(("h", "w", "cuts"), [(64, 48, [0, 17, 18, 40, 64]), (61, 37, [0, 1, 2, 3, 30, 61]),
                                              (9, 5, [0, 9]), (33, 1, [0, 5, 6, 33])])
def test_rows_in_bands_give_the_drivers_levels(h, w, cuts):
    rng = np.random.default_rng(h * w)
    labels = rng.integers(0, 4, (h, w)).astype(np.uint8)
    labels[h // 3 :, w // 2 :] = 2  # runs as well as noise: ties and clear majorities
    levels = 3
    want = _reference(labels, levels)
    got = [np.full(a.shape, 255, np.uint8) for a in want]
    region = Window(0, 0, h, w)
    pyramid = LabelPyramid(levels, region)
    rows = []
    for a, b in zip(cuts, cuts[1:]):
        rows += pyramid.add(a, torch.from_numpy(labels[a:b]))
    rows += pyramid.finish()
    seen = {lv: 0 for lv in range(1, levels + 1)}
    for level, y0, values in rows:
        assert y0 == seen[level], "each level's rows come in order, once"
        seen[level] += values.shape[0]
        got[level][y0 : y0 + values.shape[0]] = values.numpy()
    for level in range(1, levels + 1):
        assert seen[level] == level_window(region, level).h
        np.testing.assert_array_equal(got[level], want[level])


def test_device_mode_is_the_hosts():
    x = np.random.default_rng(0).integers(0, 3, (40, 23)).astype(np.uint8)
    np.testing.assert_array_equal(mode_2x2_device(torch.from_numpy(x)).numpy(), mode_2x2(x))


def test_an_unpaired_row_before_the_blocks_end_is_an_error():
    pyramid = LabelPyramid(1, Window(0, 0, 10, 4))
    pyramid.add(0, torch.zeros((3, 4), dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="unpaired"):
        pyramid.finish()


@pytest.mark.parametrize(("side", "chunk", "size", "want"), [(16384, 1024, 8192, 4), (4096, 1024, 8192, 2),
                                                            (1024, 1024, 8192, 0), (3072, 1024, 8192, 0),
                                                            (2048, 512, 8192, 2)])
def test_blocks_make_the_levels_they_are_aligned_to(side, chunk, size, want):
    assert pyramid_levels(5, side, chunk, size, size) == want
