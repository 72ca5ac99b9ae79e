import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.tiling import TileGrid, Window, chunk_windows, chunks_touched, window_1d, window_2d


@st.composite
def grids(draw):
    tile = draw(st.sampled_from([32, 64, 96, 128]))
    overlap = draw(st.integers(0, tile - 1))
    step = tile - overlap
    return TileGrid(
        height=draw(st.integers(1, 700)), width=draw(st.integers(1, 700)), tile=tile, overlap=overlap,
        offset_y=draw(st.integers(0, step - 1)), offset_x=draw(st.integers(0, step - 1)),
        margin=draw(st.integers(0, overlap)),
    )


@settings(max_examples=150, deadline=None)
@given(grids())
def test_tiles_cover_every_pixel_and_none_is_useless(grid):
    cover = np.zeros((grid.height, grid.width), np.int32)
    for iy, ix in grid.indices():
        w = grid.window(iy, ix).clip(grid.height, grid.width)
        assert not w.empty, "a tile that touches no pixel would be wasted work"
        cover[w.y0 : w.y1, w.x0 : w.x1] += 1
    assert cover.min() >= 1
    first, last = grid.window(0, 0), grid.window(grid.ny - 1, grid.nx - 1)
    assert first.y0 <= -grid.margin and first.x0 <= -grid.margin
    assert last.y1 >= grid.height + grid.margin and last.x1 >= grid.width + grid.margin


@settings(max_examples=150, deadline=None)
@given(grids(), st.integers(0, 699), st.integers(0, 699), st.integers(1, 300), st.integers(1, 300))
def test_tiles_overlapping_matches_brute_force(grid, y0, x0, h, w):
    region = Window(y0, x0, h, w)
    brute = {t for t in grid.indices() if not grid.window(*t).intersect(region).empty}
    assert set(grid.tiles_overlapping(region)) == brute


@settings(max_examples=100, deadline=None)
@given(grids(), st.sampled_from([32, 100, 256]))
def test_no_chunk_is_written_by_two_tasks(grid, chunk):
    """Tile tasks own one tile-store chunk each; blend tasks own disjoint output chunks."""
    tile_chunks = [(iy, ix, 0, 0, 0) for iy, ix in grid.indices()]  # chunk grid (1, 1, C, T, T)
    assert len(set(tile_chunks)) == len(tile_chunks)
    owners: dict[tuple[int, int], int] = {}
    for task, region in enumerate(chunk_windows(grid.height, grid.width, chunk)):
        for key in chunks_touched(region, chunk):
            assert key not in owners, f"output chunk {key} written by blend tasks {owners[key]} and {task}"
            owners[key] = task
    n_chunks = -(-grid.height // chunk) * -(-grid.width // chunk)
    assert len(owners) == n_chunks


def test_grid_formula_example():
    g = TileGrid(1024, 1000, tile=512, overlap=128)
    assert (g.step, g.ny, g.nx) == (384, 3, 3)
    assert g.window(2, 1) == Window(768, 384, 512, 512)
    shifted = TileGrid(1024, 1000, tile=512, overlap=128, offset_y=256, offset_x=256)
    assert shifted.window(0, 0) == Window(-256, -256, 512, 512)
    margined = TileGrid(1024, 1000, tile=512, overlap=128, margin=64)
    assert margined.window(0, 0) == Window(-64, -64, 512, 512) and (margined.ny, margined.nx) == (3, 3)


@pytest.mark.parametrize("bad", [dict(overlap=512), dict(overlap=-1), dict(offset_y=384), dict(height=0), dict(margin=129)])
def test_grid_rejects_bad_geometry(bad):
    args = dict(height=100, width=100, tile=512, overlap=128) | bad
    with pytest.raises(ValueError):
        TileGrid(**args)


def test_windows():
    g = window_1d("gaussian", 512)
    assert g.max() == pytest.approx(1.0) and g.min() >= 1e-3
    assert np.allclose(g, g[::-1])
    assert g[0] == pytest.approx(max(np.exp(-(255.5**2) / (2 * 64.0**2)), 1e-3))
    assert g[100] == pytest.approx(np.exp(-(155.5**2) / (2 * 64.0**2)), rel=1e-4)  # peak renormalised to 1
    c = window_1d("cosine", 64)
    summed = c[:32] + c[32:]  # two copies at 50 % overlap
    assert np.allclose(summed, 1.0, atol=2e-3)  # constant up to the 1e-3 floor
    assert np.all(window_1d("constant", 7) == 1)
    w2 = window_2d("gaussian", 64)
    assert w2.shape == (64, 64) and not w2.flags.writeable
    with pytest.raises(ValueError, match="valid"):
        window_1d("box", 8)
