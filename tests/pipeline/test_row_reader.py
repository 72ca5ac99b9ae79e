"""Row windows read down a level equal the windows read alone; the device upsampling equals the host's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.frameworks.fctl import Contexts
from pipeline.frameworks.fctl_contexts import read_contexts
from pipeline.plan import ArrayRef
from pipeline.reader import read_window, upsample2x_window
from pipeline.row_reader import LevelRows, chunk_rows, image_rows, upsample2x_rows, upsample_source
from pipeline.tiling import TileGrid, Window
from pipeline.workers.predictor import DeviceConfig, DeviceRunner
from models.info import IMAGENET_NORMALIZATION


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


@pytest.mark.parametrize("pad", ["reflect", "constant"])
@pytest.mark.parametrize(("h", "w", "tile", "step", "x0", "x1"), [(100, 90, 32, 24, -8, 100), (37, 41, 16, 7, 3, 30),
                                                                   (64, 64, 64, 48, -20, 84)])
def test_rows_down_the_level_equal_each_window_read_alone(pad, h, w, tile, step, x0, x1):
    image = _image(h, w)
    reads = []

    def read(win):
        reads.append(win)
        return image[:, win.y0 : win.y1, win.x0 : win.x1]

    rows = LevelRows(read, (h, w), 10, x0, x1, pad)
    for y0 in range(-tile // 2, h, step):
        got = rows.rows(y0, y0 + tile)
        np.testing.assert_array_equal(got, read_window(image, "cyx", (h, w), Window(y0, x0, tile, x1 - x0), pad=pad))
    decoded = sum(win.h for win in reads)
    assert decoded <= h + 10, "each chunk row decoded once"


def test_image_rows_read_a_zarr_level_in_whole_chunk_rows(tmp_path):
    image = _image(70, 50, 1)
    arr = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=image.shape, chunks=(3, 16, 16), dtype="uint8")
    arr[:] = image
    assert chunk_rows(arr, "cyx") == 16
    rows = image_rows(arr, "cyx", (70, 50), -5, 55)
    np.testing.assert_array_equal(rows.rows(60, 80), read_window(image, "cyx", (70, 50), Window(60, -5, 20, 60)))


@pytest.mark.parametrize(("fine", "window"), [((100, 80), Window(-12, -12, 40, 104)), ((33, 47), Window(20, 5, 30, 30)),
                                              ((64, 64), Window(0, 0, 64, 64))])
def test_device_upsampling_is_the_hosts_bit_for_bit(fine, window):
    coarse = ((fine[0] + 1) // 2, (fine[1] + 1) // 2)
    m = np.random.default_rng(2).random((4, *coarse)).astype(np.float16)
    want = upsample2x_window(m, coarse, fine, window)
    r0, r1 = upsample_source((window.y0, window.y1), fine[0], coarse[0])
    c0, c1 = upsample_source((window.x0, window.x1), fine[1], coarse[1])
    got = upsample2x_rows(torch.from_numpy(m[:, r0:r1, c0:c1]), (r0, c0), coarse, fine, window)
    np.testing.assert_array_equal(got.numpy(), want)


def test_context_rows_equal_each_tiles_contexts(tmp_path):
    from pipeline.pyramid import downsample_mean2

    level0 = _image(160, 136, 3)
    levels = [level0]
    for _ in range(2):
        levels.append(downsample_mean2(levels[-1]))
    refs = []
    for lv, a in enumerate(levels):
        arr = zarr.create_array(store=str(tmp_path / f"{lv}.zarr"), shape=a.shape, chunks=(3, 24, 24), dtype="uint8")
        arr[:] = a
        refs.append(ArrayRef(str(tmp_path / f"{lv}.zarr"), "", "cyx", a.shape[1:]))
    factors = (2.0, 3.0, 4.0)
    grid = TileGrid(160, 136, 32, 8, margin=4)
    runner = DeviceRunner(DeviceConfig("fp32", 1, device="cpu"), IMAGENET_NORMALIZATION)
    opened = {r.group_url: zarr.open_array(r.group_url, mode="r") for r in refs}
    x_lo, x_hi = grid.window(0, 0).x0, grid.window(0, grid.nx - 1).x1
    reader = Contexts(factors, tuple(refs)).open_rows(lambda ref: opened[ref.group_url], refs[0], 32, x_lo, x_hi)
    shapes = [a.shape[1:] for a in levels]
    for iy in range(grid.ny):
        windows = [grid.window(iy, ix) for ix in range(grid.nx)]
        got = reader.to_device(reader.read(windows), windows, runner).numpy()
        for k, w in enumerate(windows):
            want = read_contexts({lv: levels[lv] for lv in (1, 2)}, shapes, "cyx", w, factors, 32)
            np.testing.assert_array_equal(got[k], want)
