import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.blend import (
    BlendPlan,
    _TileSource,
    argmax_classes,
    blend_region,
    blended_probabilities,
    chunk_uses,
    downsample_labels,
    mode_2x2,
    store_blend,
)
from pipeline.output.arrays import create_tile_store
from pipeline.tiling import TileGrid, Window, window_2d


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


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9), levels=st.integers(1, 4), seed=st.integers(0, 99))
def test_argmax_classes_is_numpy_argmax_ties_included(c, h, w, levels, seed):
    """Few distinct values, so ties between classes are common: the lower class wins, as in NumPy."""
    probs = np.random.default_rng(seed).integers(0, levels, (c, h, w)).astype(np.float32) / levels
    got = argmax_classes(probs, np.uint8)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, probs.argmax(0))


class _CountingArray:
    """A tile store that counts the tiles read from it."""

    def __init__(self, arr):
        self.arr, self.reads = arr, 0

    def __getitem__(self, key):
        self.reads += 1
        return self.arr[key]


@pytest.mark.parametrize("cache_bytes", [1 << 30, 3 * 4 * 64 * 64 * 2, 0])
def test_tile_cache_reads_each_tile_once_when_it_fits_and_stays_bounded(tmp_path, cache_bytes):
    grid = TileGrid(203, 171, tile=64, overlap=16)
    url, data = _fill_tiles(tmp_path, grid, c=4)
    plan = BlendPlan(grid=grid, tiles_url=url, num_classes=4, chunk=50)
    uses = chunk_uses(grid, plan.chunk)
    assert sum(uses.values()) > len(grid)  # tiles straddle chunks, or the cache would have nothing to do
    source = _TileSource(url, None, uses, cache_bytes=cache_bytes)
    counter = source._array = _CountingArray(source.array)
    peak = 0
    whole = np.zeros((4, 203, 171), np.float32)
    for y in range(0, 203, 50):
        for x in range(0, 171, 50):
            region = Window(y, x, min(50, 203 - y), min(50, 171 - x))
            whole[:, y : y + region.h, x : x + region.w] = blend_region(plan, source, region)
            peak = max(peak, source._cached)
    np.testing.assert_allclose(whole, _brute_force(grid, data, "gaussian"), rtol=1e-5, atol=1e-6)
    assert peak <= cache_bytes
    assert source._cached == 0  # every tile left once its last chunk read it
    if cache_bytes >= data.nbytes:
        assert counter.reads == len(grid)
    elif cache_bytes == 0:
        assert counter.reads == sum(uses.values())
    else:  # three tiles fit: fewer reads than without a cache, more than with an unbounded one
        assert len(grid) < counter.reads < sum(uses.values())


def test_chunk_uses_counts_the_chunks_each_tile_overlaps():
    grid = TileGrid(203, 171, tile=64, overlap=16)
    uses = chunk_uses(grid, 50)
    for iy, ix in grid.indices():
        win = grid.window(iy, ix)
        mask = np.zeros((203, 171), bool)
        mask[max(win.y0, 0) : win.y0 + win.h, max(win.x0, 0) : win.x0 + win.w] = True
        chunks = {(y // 50, x // 50) for y, x in zip(*np.nonzero(mask))}
        assert uses[iy, ix] == len(chunks)
