"""Batched tile reads (``read_windows``): bit-identical to reading each window alone, fewer chunk reads."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.reader import index_slices, read_window, read_windows, reflect_index, row_runs, take_slices
from pipeline.tiling import TileGrid, Window
from tests.pipeline.test_context import CountingStore


def _array(shape_yx, chunks, dtype, seed=0):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    data = (rng.integers(0, int(info.max) + 1, (*shape_yx, 3)) if info else rng.random((*shape_yx, 3))).astype(dtype)
    arr = zarr.create_array(store=zarr.storage.MemoryStore(), shape=data.shape, chunks=(*chunks, 3), dtype=dtype)
    arr[:] = data
    return arr


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 90), w=st.integers(1, 90), tile=st.sampled_from([8, 16, 24]), overlap=st.integers(0, 7),
    chunk=st.sampled_from([5, 16, 32]), pad=st.sampled_from(["reflect", "constant"]),
    dtype=st.sampled_from(["uint8", "uint16", "float32"]), data=st.data(),
)
def test_read_windows_equals_each_window_alone(h, w, tile, overlap, chunk, pad, dtype, data):
    arr = _array((h, w), (chunk, chunk), np.dtype(dtype))
    grid = TileGrid(h, w, tile, overlap)
    indices = list(grid.indices())
    picked = data.draw(st.lists(st.sampled_from(indices), min_size=1, max_size=12))  # any order, repeats, gaps
    windows = [grid.window(iy, ix) for iy, ix in picked]
    value_range = (0.0, 1.0) if dtype == "float32" else None
    got = read_windows(arr, "yxc", (h, w), windows, pad=pad, value_range=value_range)
    want = np.stack([read_window(arr, "yxc", (h, w), win, pad=pad, value_range=value_range) for win in windows])
    assert got.dtype == np.uint8 and got.shape == (len(windows), 3, tile, tile)
    assert np.array_equal(got, want)


def test_row_runs_join_only_touching_windows_of_one_row():
    ws = [Window(0, 40, 8, 8), Window(0, 0, 8, 8), Window(0, 6, 8, 8), Window(6, 0, 8, 8), Window(0, 14, 8, 8)]
    assert sorted(map(sorted, row_runs(ws))) == [[0], [1, 2, 4], [3]]


def test_side_by_side_tiles_read_each_chunk_once():
    """A row of 8 tiles of 32 px with overlap 8 over 32² chunks: one by one, chunks under overlaps are read
    by two tiles each; as a run, each chunk once."""
    keys: list[str] = []
    base = _array((64, 256), (32, 32), np.dtype("uint8"))
    arr = zarr.open_array(store=CountingStore(base.store, keys), mode="r")
    keys.clear()  # the metadata reads of opening
    grid = TileGrid(64, 256, 32, 8)
    windows = [grid.window(0, ix) for ix in range(8)]
    for win in windows:
        read_window(arr, "yxc", (64, 256), win)
    alone = list(keys)
    keys.clear()
    read_windows(arr, "yxc", (64, 256), windows)
    assert len(keys) == len(set(keys)) == len(set(alone)) < len(alone)


def test_windows_of_different_sizes_are_refused():
    arr = _array((16, 16), (8, 8), np.dtype("uint8"))
    with pytest.raises(ValueError, match="one size"):
        read_windows(arr, "yxc", (16, 16), [Window(0, 0, 4, 4), Window(0, 0, 8, 8)])


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 40), start=st.integers(-120, 120), length=st.integers(1, 130))
def test_mirrored_indices_taken_as_slices_equal_the_gather(size, start, length):
    a = np.arange(2 * size * 3).reshape(2, size, 3)
    index = reflect_index(start, length, size)
    slices = index_slices(index)
    assert len(slices) <= 2 + 2 * (length // max(1, size - 1) + 1)  # runs, not elements
    np.testing.assert_array_equal(take_slices(a, slices, 1), a[:, index])
