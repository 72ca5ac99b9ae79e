"""Blocks: the geometry of the work units, and the on-device blend of a block's tiles (``BlockBlend``) against
the whole-canvas formula, whatever the block size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.blocks import block_tiles, duplication, owned_counts, owner, plan_blocks
from pipeline.tiling import TileGrid, Window, window_2d
from pipeline.plan import ArrayRef
from pipeline.workers.device_blend import BlockBlend
from pipeline.workers.worker import ChunkRows


@pytest.mark.parametrize(("h", "w", "chunk", "side"), [(203, 171, 50, 100), (1000, 700, 256, 512), (90, 60, 64, 64)])
def test_blocks_tile_the_level_with_whole_chunks(h, w, chunk, side):
    blocks = plan_blocks(h, w, chunk, side)
    cover = np.zeros((h, w), int)
    for b in blocks:
        r = b.region
        assert r.y0 % chunk == 0 and r.x0 % chunk == 0  # a block owns whole chunks: one writer each
        assert (r.h % chunk == 0 or r.y1 == h) and (r.w % chunk == 0 or r.x1 == w)
        cover[r.y0 : r.y1, r.x0 : r.x1] += 1
    assert (cover == 1).all()


def test_every_tile_has_one_owner_among_the_blocks_that_run_it():
    grid = TileGrid(700, 500, 64, 16, 8, 24, margin=8)
    side, chunk = 128, 64
    blocks = {b.index: b for b in plan_blocks(700, 500, chunk, side)}
    owned = owned_counts(grid, side, chunk)
    assert sum(owned.values()) == len(grid)
    for t in grid.indices():
        assert t in block_tiles(grid, blocks[owner(grid, t, side, chunk)])


def test_duplication_is_the_share_of_tiles_run_twice():
    grid = TileGrid(2048, 2048, 512, 128, margin=64)
    assert duplication(grid, plan_blocks(2048, 2048, 256, 4096)) == 0.0  # one block
    halves = duplication(grid, plan_blocks(2048, 2048, 256, 1024))  # 2 × 2 blocks
    assert 0 < halves < 2 * 512 / 1024 + 0.1
    assert duplication(grid, plan_blocks(2048, 2048, 256, 512)) > halves


def _brute_force(grid, data, kind):
    """Whole-canvas weighted average of float32 tile probabilities, in float64."""
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


def _blend_blocks(grid, data, kind, side, chunk, subset=None):
    """What the worker does with each block's tiles: add them row by row into ``BlockBlend``, hand on each band
    as soon as no later tile row reaches it."""
    c = data.shape[2]
    out = np.full((c, grid.height, grid.width), -1.0, np.float32)
    covered_all = np.zeros((grid.height, grid.width), bool)
    weights = torch.from_numpy(np.array(window_2d(kind, grid.tile)))
    for block in plan_blocks(grid.height, grid.width, chunk, side):
        tiles = block_tiles(grid, block, subset)
        blend = BlockBlend(c, block.region, grid.tile, torch.device("cpu"))
        rows = sorted({iy for iy, _ in tiles})
        bands = []
        for k, iy in enumerate(rows):
            for ix in sorted(ix for jy, ix in tiles if jy == iy):
                blend.add(grid.window(iy, ix), torch.from_numpy(data[iy, ix]), weights)
            final = grid.window(rows[k + 1], 0).y0 if k + 1 < len(rows) else block.region.y1
            bands += [_taken(band) for band in blend.ready(final)]
        if not rows:
            bands = [_taken(band) for band in blend.ready(block.region.y1)]
        for region, probs, covered, labels in bands:
            out[:, region.y0 : region.y1, region.x0 : region.x1] = probs
            covered_all[region.y0 : region.y1, region.x0 : region.x1] = covered
            if covered.all():  # the labels (argmax of Σ w·p, no division) are the argmax of P
                np.testing.assert_array_equal(labels, probs.argmax(0))
    return out, covered_all


def _taken(band):
    """What a sink takes from a band before the blend moves on (its rows are then zeroed for reuse)."""
    return band.region, band.probabilities().numpy(), band.covered().numpy(), band.labels("int32")


@pytest.mark.parametrize("kind", ["gaussian", "cosine", "constant"])
@pytest.mark.parametrize("offset", [0, 40])
def test_block_blend_is_the_whole_canvas_blend_for_any_block_size(kind, offset):
    grid = TileGrid(203, 171, tile=64, overlap=16, offset_y=offset, offset_x=offset // 2)
    data = np.random.default_rng(0).random((grid.ny, grid.nx, 3, 64, 64)).astype(np.float32)
    expected = _brute_force(grid, data, kind)
    one, covered = _blend_blocks(grid, data, kind, side=1024, chunk=50)
    assert covered.all()
    np.testing.assert_allclose(one, expected, rtol=1e-5, atol=1e-6)
    for side in (50, 100, 150):  # tiles are added in grid order in every block: the very same sums
        blocks, _ = _blend_blocks(grid, data, kind, side=side, chunk=50)
        np.testing.assert_array_equal(blocks, one)


def test_pixels_no_chosen_tile_covers_are_nan_and_not_covered():
    grid = TileGrid(128, 128, tile=64, overlap=16)
    data = np.random.default_rng(1).random((grid.ny, grid.nx, 2, 64, 64)).astype(np.float32)
    subset = frozenset({(0, 0)})
    probs, covered = _blend_blocks(grid, data, "gaussian", side=64, chunk=32, subset=subset)
    window = grid.window(0, 0).clip(128, 128)
    inside = np.zeros((128, 128), bool)
    inside[window.y0 : window.y1, window.x0 : window.x1] = True
    assert (covered == inside).all()
    assert np.isnan(probs[:, ~inside]).all() and not np.isnan(probs[:, inside]).any()


def test_a_band_is_handed_on_only_when_no_later_tile_reaches_it():
    blend = BlockBlend(1, Window(0, 0, 100, 10), 60, torch.device("cpu"))
    blend.add(Window(0, 0, 40, 10), torch.ones((1, 40, 10)), torch.ones((40, 10)))
    assert [b.region for b in blend.ready(30)] == [Window(0, 0, 30, 10)]  # rows 30.. still open
    assert blend.top == 30
    # the ring's end falls at row 60: the rest comes in two pieces
    assert [b.region for b in blend.ready(100)] == [Window(30, 0, 30, 10), Window(60, 0, 40, 10)]


def test_the_ring_reuses_rows_handed_on_and_refuses_a_tile_beyond_it():
    blend = BlockBlend(2, Window(0, 0, 100, 8), 50, torch.device("cpu"))  # 50 rows of ring
    probs = torch.rand((2, 40, 8))
    blend.add(Window(0, 0, 40, 8), probs, torch.ones((40, 8)))
    assert [b.region for b in blend.ready(25)] == [Window(0, 0, 25, 8)]
    blend.add(Window(30, 0, 40, 8), probs, torch.ones((40, 8)))  # rows 50..70 land where rows 0..20 were
    bands = [(b.region, b.probabilities().clone()) for b in blend.ready(100)]
    expected = torch.zeros((2, 100, 8))
    expected[:, 0:40] += probs
    expected[:, 30:70] += probs
    weights = torch.zeros((100, 8))
    weights[0:40] += 1
    weights[30:70] += 1
    assert bands[0][0].y0 == 25 and bands[-1][0].y1 == 100
    for region, p in bands:
        want = expected[:, region.y0 : region.y1] / weights[region.y0 : region.y1]
        torch.testing.assert_close(p, want, equal_nan=True)
    with pytest.raises(ValueError, match="ring"):
        BlockBlend(1, Window(0, 0, 100, 8), 30, torch.device("cpu")).add(
            Window(0, 0, 40, 8), probs[:1], torch.ones((40, 8)))


@pytest.mark.parametrize("cuts", [[0, 7, 30, 64, 100, 128, 130], [0, 64, 128, 130], [0, 1, 2, 130]])
def test_bands_are_written_as_whole_chunk_rows_once(cuts):
    chunk = 64  # a block of rows 64..194: chunk rows 64..128, 128..192, 192..194
    ref = ArrayRef("mem://out", "labels", "yx", (194, 5))
    pref = ArrayRef("mem://out", "probabilities", "cyx", (194, 5))
    truth = np.arange(130 * 5).reshape(130, 5)
    rows = ChunkRows(chunk)
    writes = []
    for a, b in zip(cuts, cuts[1:]):
        y = slice(64 + a, 64 + b)
        writes += rows.add([(ref, (y, slice(0, 5)), truth[a:b]),
                            (pref, (slice(None), y, slice(0, 5)), np.stack([truth[a:b], -truth[a:b]]))])
    rows.finish()
    labels = [(sel[0].start, sel[0].stop) for r, sel, _ in writes if r.path == "labels"]
    assert labels == [(64, 128), (128, 192), (192, 194)]  # each chunk row once, whole
    for r, sel, values in writes:
        y = sel[-2]
        want = truth[y.start - 64 : y.stop - 64]
        np.testing.assert_array_equal(values, want if r.path == "labels" else np.stack([want, -want]))


def test_rows_left_incomplete_are_an_error():
    rows = ChunkRows(50)
    rows.add([(ArrayRef("mem://o", "l", "yx", (100, 4)), (slice(0, 30), slice(0, 4)), np.zeros((30, 4)))])
    with pytest.raises(RuntimeError, match="incomplete"):
        rows.finish()
