import numpy as np
import pytest
import zarr

from pipeline.blend import BlendPlan, blended_probabilities, downsample_labels, mode_2x2, store_blend
from pipeline.output import create_tile_store
from pipeline.tiling import TileGrid, window_2d


def _fill_tiles(tmp_path, grid, c, seed=0):
    url = str(tmp_path / "tiles")
    arr = create_tile_store(url, {}, (grid.ny, grid.nx, c, grid.tile, grid.tile))
    rng = np.random.default_rng(seed)
    data = rng.random((grid.ny, grid.nx, c, grid.tile, grid.tile)).astype(np.float16)
    for iy, ix in grid.indices():
        arr[iy, ix] = data[iy, ix]
    return url, data


def _brute_force(grid, data, kind):
    """Whole-canvas weighted average: the formula the chunked blend must reproduce."""
    c = data.shape[2]
    pad = grid.tile
    acc = np.zeros((c, grid.height + 2 * pad, grid.width + 2 * pad))
    ws = np.zeros((grid.height + 2 * pad, grid.width + 2 * pad))
    w = window_2d(kind, grid.tile).astype(np.float64)
    for iy, ix in grid.indices():
        win = grid.window(iy, ix)
        y, x = win.y0 + pad, win.x0 + pad
        acc[:, y : y + grid.tile, x : x + grid.tile] += data[iy, ix].astype(np.float64) * w
        ws[y : y + grid.tile, x : x + grid.tile] += w
    return (acc / np.maximum(ws, 1e-12))[:, pad : pad + grid.height, pad : pad + grid.width]


@pytest.mark.parametrize("kind", ["gaussian", "cosine", "constant"])
@pytest.mark.parametrize("offset", [0, 40])
def test_chunked_blend_equals_whole_canvas(tmp_path, kind, offset):
    grid = TileGrid(203, 171, tile=64, overlap=16, offset_y=offset, offset_x=offset // 2)
    url, data = _fill_tiles(tmp_path, grid, c=3)
    plan = BlendPlan(grid=grid, tiles_url=url, num_classes=3, window=kind, chunk=50)
    got = blended_probabilities(plan).compute(scheduler="threads")
    assert got.shape == (3, 203, 171)
    np.testing.assert_allclose(got, _brute_force(grid, data, kind), rtol=1e-5, atol=1e-6)


def test_store_outputs_argmax_confidence_probabilities(tmp_path):
    grid = TileGrid(130, 97, tile=64, overlap=32)
    url, data = _fill_tiles(tmp_path, grid, c=4, seed=3)
    expected = _brute_force(grid, data, "gaussian")
    root = zarr.open_group(str(tmp_path / "out"), mode="w")
    targets = {
        "labels": root.create_array("labels", shape=(130, 97), chunks=(40, 40), dtype="uint8"),
        "confidence": root.create_array("conf", shape=(130, 97), chunks=(40, 40), dtype="float32"),
        "probabilities": root.create_array("probs", shape=(4, 130, 97), chunks=(4, 40, 40), dtype="float16"),
    }
    store_blend(BlendPlan(grid=grid, tiles_url=url, num_classes=4, chunk=40), targets)
    labels = targets["labels"][:]
    agree = (labels == expected.argmax(0)).mean()
    assert agree > 0.999  # float32 vs float64 sums may flip exact ties only
    np.testing.assert_allclose(targets["confidence"][:], expected.max(0), rtol=1e-5)
    np.testing.assert_allclose(targets["probabilities"][:], expected, atol=2e-3)


def test_missing_tile_is_a_clear_error(tmp_path):
    grid = TileGrid(100, 100, tile=64, overlap=16)
    url = str(tmp_path / "tiles")
    store = create_tile_store(url, {}, (grid.ny, grid.nx, 2, 64, 64))
    store[0, 0] = np.full((2, 64, 64), 0.5, np.float16)
    plan = BlendPlan(grid=grid, tiles_url=url, num_classes=2, chunk=50)
    target = zarr.open_array(str(tmp_path / "labels"), mode="w", shape=(100, 100), chunks=(50, 50), dtype="uint8")
    with pytest.raises(RuntimeError, match=r"3 tile\(s\) .* missing.*rerun"):
        store_blend(plan, {"labels": target})


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
