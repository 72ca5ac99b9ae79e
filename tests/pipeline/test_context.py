"""FCtL context windows: level and window formulas, reads against whole-image references, chunks touched.

The fixture is a real ingested Zarr v3 pyramid (``pipeline.pyramid.ingest``, 64-px chunks) of a seeded
302×418 RGB image: a gradient plus a smooth random field (bicubic through random knots 38 px apart) plus
±4 pixel noise. 302 and 418 are not multiples of 4, so level 2 has pixels straddling the image edge.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.errors import UnsupportedImageError
from pipeline.frameworks.fctl_contexts import (
    check_power_of_two,
    context_level,
    context_levels,
    context_window,
    read_context,
    read_contexts,
)
from pipeline.pyramid import downsample_mean2, ingest
from pipeline.reader import resize_image
from pipeline.sources.formats import ImageRef, open_source
from pipeline.storage import zarr_store
from pipeline.tiling import Window, chunks_touched

H, W, T, CHUNK = 302, 418, 64, 64

# Tiles (level 0, T×T): y0, x0 ≡ 0 (mod 4) are exact for ×2 and ×4 (context_window's docstring).
ALIGNED = {
    "top-left corner": Window(-8, -8, T, T),
    "right edge": Window(120, 364, T, T),
    "bottom edge": Window(244, 200, T, T),
    "bottom-right corner": Window(272, 388, T, T),
    "centre": Window(120, 176, T, T),
}
MISALIGNED = {"off-grid": Window(118, 181, T, T), "off-grid corner": Window(-10, 391, T, T)}


def smooth_image(seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: gradient + bicubic random field + small noise (see the module docstring)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    channels = []
    for c in range(3):
        knots = rng.uniform(-40, 40, (H // 38 + 2, W // 38 + 2)).astype(np.float32)
        field = np.asarray(Image.fromarray(knots, mode="F").resize((W, H), Image.Resampling.BICUBIC))
        channels.append(50 + 15 * c + 0.25 * yy + 0.2 * xx + field + rng.integers(-4, 5, (H, W)))
    return np.clip(np.rint(np.stack(channels, -1)), 0, 255).astype(np.uint8)


class CountingStore(zarr.storage.WrapperStore):
    """A read-only store wrapper that records every key read (``get``, ``get_partial_values``)."""

    def __init__(self, store, keys: list[str]):
        super().__init__(store)
        self.keys = keys

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        self.keys.extend(k for k, _ in key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)

    def with_read_only(self, read_only: bool = False):
        return CountingStore(self._store.with_read_only(read_only), self.keys)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """``(levels in memory (3, H_l, W_l), Pyramid, keys read, arrays by level through a CountingStore)``."""
    folder = tmp_path_factory.mktemp("context")
    rgb = smooth_image()
    Image.fromarray(rgb).save(folder / "scene.png")
    pyr = ingest(open_source(ImageRef(str(folder / "scene.png"), "scene", "png")), str(folder / "scene.zarr"),
                 chunk=CHUNK, min_size=32, scheduler="sync")
    levels = [np.moveaxis(rgb, -1, 0)]
    for _ in range(1, pyr.n_levels):
        levels.append(downsample_mean2(levels[-1]))
    keys: list[str] = []
    store = CountingStore(zarr_store(pyr.url, read_only=True), keys)
    arrays = {lvl: zarr.open_array(store=store, path=p, mode="r") for lvl, p in enumerate(pyr.paths)}
    assert pyr.shapes == ((302, 418), (151, 209), (76, 105), (38, 53), (19, 27))
    return levels, pyr, keys, arrays


def crop_zero_padded(level: np.ndarray, win: Window) -> np.ndarray:
    """``win`` of a ``(C, h, w)`` array in memory, zeros outside (float64)."""
    padded = np.zeros((level.shape[0], win.h, win.w))
    inner = win.clip(*level.shape[1:])
    if not inner.empty:
        padded[:, inner.y0 - win.y0 : inner.y1 - win.y0, inner.x0 - win.x0 : inner.x1 - win.x0] = (
            level[:, inner.y0 : inner.y1, inner.x0 : inner.x1]
        )
    return padded


def exact_level0_window(tile: Window, c: int) -> Window:
    """The FCtL context window at level 0, computed independently of ``context_window``:
    origin ``y0 + T/2 − c·T/2``, size ``c·T``."""
    return Window(tile.y0 + T // 2 - c * T // 2, tile.x0 + T // 2 - c * T // 2, c * T, c * T)


# ---------------------------------------------------------------- formulas


@pytest.mark.parametrize(("factor", "n_levels", "level"),
                         [(2, 5, 1), (3, 5, 1), (4, 5, 2), (1.5, 5, 0), (7.99, 5, 2), (8, 5, 3), (8, 3, 2), (16, 1, 0)])
def test_context_level_is_floor_log2_clamped(factor, n_levels, level):
    assert context_level(factor, n_levels) == level


@pytest.mark.parametrize("factor", [1, 0.5, 0, -2])
def test_factor_must_exceed_one(factor):
    with pytest.raises(ValueError, match="must be > 1.*local tile itself"):
        context_level(factor, 4)


def test_context_levels_are_distinct_and_sorted():
    assert context_levels((4, 2, 3), 5) == (1, 2)
    assert context_levels((8, 16), 3) == (2,)


def test_context_window_formula():
    # ×2, ×4 with y0 ≡ 0 (mod 4), T = 64: exact, r = T.
    assert context_window(Window(120, 176, 64, 64), 2, 1) == Window(44, 72, 64, 64)  # (120 − 32)/2
    assert context_window(Window(120, 176, 64, 64), 4, 2) == Window(6, 20, 64, 64)  # (120 − 96)/4
    assert context_window(Window(-8, -8, 64, 64), 4, 2) == Window(-26, -26, 64, 64)
    # ×3 at level 1: r = 96 level-1 px, origin (y0 − 64)/2.
    assert context_window(Window(120, 176, 64, 64), 3, 1) == Window(28, 56, 96, 96)
    # Ties round half up: (118 − 96)/4 = 5.5 → 6, (−10 − 96)/4 = −26.5 → −26; 21.25 → 21.
    assert context_window(Window(118, 181, 64, 64), 4, 2) == Window(6, 21, 64, 64)
    assert context_window(Window(-10, 0, 64, 64), 4, 2).y0 == -26
    # FCtL's 508 px tiles: ×4 is exact for y0 ≡ 2 (mod 4), half a level-2 pixel off for y0 ≡ 0.
    # y: −760/4 = −190; x: −762/4 = −190.5 → −190.
    assert context_window(Window(2, 0, 508, 508), 4, 2) == Window(-190, -190, 508, 508)
    # A clamped level resamples: ×8 read at level 2 is 128 px; the centre stays on the tile's.
    win = context_window(Window(120, 176, 64, 64), 8, 2)
    assert (win.h, (win.y0 + win.h / 2) * 4) == (128, 120 + 32)


def test_check_power_of_two_names_the_fix():
    check_power_of_two([(302, 418), (151, 209), (76, 105)], [1, 2])
    check_power_of_two([(302, 418), (151, 209), (75, 104)], [2])  # floor halving is accepted too
    with pytest.raises(UnsupportedImageError, match=r"level 1 is \(100, 139\).*ingest the image"):
        check_power_of_two([(300, 418), (100, 139)], [1])


# ---------------------------------------------------------------- reads against whole-image references


@pytest.mark.parametrize("where", [*ALIGNED, *MISALIGNED])
def test_power_of_two_contexts_equal_the_pyramid_level_crop(pyramid, where):
    """×2 and ×4 are the level-1/2 pixels under the window (origin ``⌊o₀/2^l + ½⌋``) with zeros outside,
    not resampled: exactly equal to cropping the in-memory pyramid level."""
    levels, pyr, _, arrays = pyramid
    tile = {**ALIGNED, **MISALIGNED}[where]
    got = read_contexts(arrays, pyr.shapes, pyr.axes, tile, (2, 4), T)
    assert got.shape == (2, 3, T, T) and got.dtype == np.uint8
    for i, (c, lvl) in enumerate(((2, 1), (4, 2))):
        exact = exact_level0_window(tile, c)
        origin = (int(np.floor(exact.y0 / c + 0.5)), int(np.floor(exact.x0 / c + 0.5)))
        expected = crop_zero_padded(levels[lvl], Window(*origin, T, T))
        np.testing.assert_array_equal(got[i], expected.astype(np.uint8))


@pytest.mark.parametrize("where", list(ALIGNED))
def test_factor_three_is_the_level1_window_resized(pyramid, where):
    levels, pyr, _, arrays = pyramid
    tile = ALIGNED[where]
    exact = exact_level0_window(tile, 3)
    level1 = crop_zero_padded(levels[1], Window(exact.y0 // 2, exact.x0 // 2, 96, 96)).astype(np.uint8)
    expected = resize_image(level1, T)
    np.testing.assert_array_equal(read_contexts(arrays, pyr.shapes, pyr.axes, tile, (3,), T)[0], expected)


def straddles_edge(start: int, c: int, extent: int, n: int, support: int) -> np.ndarray:
    """Per output pixel ``i`` of a ``c``-fold reduction starting at level-0 ``start``: does its footprint
    ``[start + c·(i − support), start + c·(i + 1 + support))`` hold both image and padding?"""
    lo = start + c * (np.arange(n) - support)
    hi = start + c * (np.arange(n) + 1 + support)
    return ((lo < 0) & (hi > 0)) | ((lo < extent) & (hi > extent))


@pytest.mark.parametrize("where", list(ALIGNED))
@pytest.mark.parametrize(("c", "support", "mean_tol", "max_tol"),
                         [(2, 0, 0.35, 0.5), (4, 0, 0.5, 1.0), (3, 1, 1.0, 3.0)])
def test_contexts_match_the_level0_crop_pad_resize(pyramid, where, c, support, mean_tol, max_tol):
    """Against FCtL's own recipe on the whole level-0 image: crop the c·T window, zero-pad, area-resize to T
    (a c×c box mean, in float).

    Tolerances, in grey levels, on the pixels away from the zero-pad boundary. ×2^l (level l, nothing
    resampled): the pyramid is l nested 2×2 means each rounded half up, so ``|level_l − box mean| ≤ l·½``
    (max 0.5 for ×2, 1 for ×4; the means are a fraction of that). ×3 (level 1, then PIL bilinear 96 → 64,
    whose triangle filter widens to ±1.5 level-1 px when shrinking) has the 3×3 box's centre and unit weight
    but another shape: on this smooth image (slope ≤ ~3 grey levels/px) the difference is second order plus
    differently averaged ±4 noise: measured mean ≈ 0.5, max ≈ 2.6; bounds 1 and 3.

    Excluded: output pixels whose footprint (widened by the bilinear support, ±1 output pixel, for ×3)
    holds both image and padding. There the pyramid's edge pixels average only the pixels that exist (edge
    replication, 302/4 and 418/4 are not integers), bilinear mixes zeros across one output pixel, and the box
    mixes zeros by area: differences up to half the pixel value. Counted in, they keep the mean of every
    tile below 2.5.
    """
    levels, pyr, _, arrays = pyramid
    tile = ALIGNED[where]
    exact = exact_level0_window(tile, c)
    crop = crop_zero_padded(levels[0], exact)
    reference = crop.reshape(3, T, c, T, c).mean(axis=(2, 4))
    got = read_contexts(arrays, pyr.shapes, pyr.axes, tile, (c,), T)[0].astype(np.float64)
    diff = np.abs(got - reference)
    edge = straddles_edge(exact.y0, c, H, T, support)[:, None] | straddles_edge(exact.x0, c, W, T, support)[None, :]
    assert diff[:, ~edge].mean() < mean_tol
    assert diff[:, ~edge].max() <= max_tol
    assert diff.mean() < 2.5
    if c == 2:
        assert not edge.any()  # 302 and 418 are even: the level-1 edge is a pixel edge


def test_single_context_read(pyramid):
    levels, pyr, _, arrays = pyramid
    got = read_context(arrays[2], "cyx", pyr.shapes[2], Window(-10, 90, 20, 20), 20)
    np.testing.assert_array_equal(got, crop_zero_padded(levels[2], Window(-10, 90, 20, 20)).astype(np.uint8))
    with pytest.raises(ValueError, match="square"):
        read_context(arrays[2], "cyx", pyr.shapes[2], Window(0, 0, 20, 21), 20)


# ---------------------------------------------------------------- chunks touched


@pytest.mark.parametrize("where", ["top-left corner", "bottom-right corner", "centre"])
@pytest.mark.parametrize("c", [2, 3, 4])
def test_reads_only_the_chunks_under_the_clipped_context(pyramid, where, c):
    _, pyr, keys, arrays = pyramid
    tile = ALIGNED[where]
    level = context_level(c, pyr.n_levels)
    clipped = context_window(tile, c, level).clip(*pyr.shapes[level])
    expected = sorted(f"{level}/c/0/{cy}/{cx}" for cy, cx in chunks_touched(clipped, CHUNK))
    keys.clear()
    read_contexts(arrays, pyr.shapes, pyr.axes, tile, (c,), T)  # every level is open: none other may be read
    assert sorted(keys) == expected  # each chunk once, only of this level
    if c == 2 and where == "centre":
        assert len(expected) == 4  # a 64-px window not on the chunk grid at level 1


def test_several_factors_read_their_levels_only(pyramid):
    _, pyr, keys, arrays = pyramid
    keys.clear()
    read_contexts(arrays, pyr.shapes, pyr.axes, ALIGNED["centre"], (2, 4), T)
    assert {k.split("/")[0] for k in keys} == {"1", "2"}


def test_window_outside_the_image_is_zeros_and_reads_nothing(pyramid):
    _, pyr, keys, arrays = pyramid
    keys.clear()
    got = read_contexts(arrays, pyr.shapes, pyr.axes, Window(900, -700, T, T), (2, 3, 4), T)
    assert got.shape == (3, 3, T, T) and not got.any()
    assert keys == []


def test_missing_level_and_non_square_tile_name_the_fix(pyramid):
    _, pyr, _, arrays = pyramid
    with pytest.raises(KeyError, match=r"×4 reads pyramid level 2.*holds levels \[1\].*\(1, 2\)"):
        read_contexts({1: arrays[1]}, pyr.shapes, pyr.axes, ALIGNED["centre"], (2, 4), T)
    with pytest.raises(ValueError, match="square"):
        read_contexts(arrays, pyr.shapes, pyr.axes, Window(0, 0, 64, 32), (2,), T)
