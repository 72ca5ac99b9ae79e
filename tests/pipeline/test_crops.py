"""Multi-scale crops: level choice and scale formula, padding, augmentation consistency, seeded sampling."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.tiling import Window
from pipeline.training.crops import (
    CropConfig,
    CropSampler,
    augment,
    origin_bounds,
    pyramid_level,
    read_crop,
    resize_nearest,
    validation_windows,
    window_at,
    window_size,
)

IGNORE = 255


class FakeDataset:
    """In-memory pyramid whose image is ``10 · mask`` on every channel at every level (ids 0..9), so
    image/mask agreement can be checked exactly wherever nothing is resampled or padded."""

    def __init__(self, masks_by_name: dict[str, list[np.ndarray]]):
        self.masks = masks_by_name
        self.info = SimpleNamespace(ignore_index=IGNORE)

    def shapes(self, name):
        return tuple(m.shape for m in self.masks[name])

    def image_level(self, name, level):
        return np.repeat((self.masks[name][level] * 10).astype(np.uint8)[None], 3, axis=0)

    def mask_level(self, name, level):
        return self.masks[name][level]


def random_pyramid(rng, h, w, levels=3):
    out = [rng.integers(0, 10, (h, w)).astype(np.uint8)]
    for _ in range(levels - 1):  # any consistent-size levels do: the crops only read them
        h, w = (h + 1) // 2, (w + 1) // 2
        out.append(rng.integers(0, 10, (h, w)).astype(np.uint8))
    return out


@pytest.mark.parametrize(
    ("scale", "n_levels", "level"),
    [(1, 4, 0), (1.5, 4, 0), (2, 4, 1), (3, 4, 1), (4, 4, 2), (7.9, 4, 2), (8, 4, 3), (16, 3, 2), (0.5, 3, 0)],
)
def test_pyramid_level_is_floor_log2_clamped(scale, n_levels, level):
    assert pyramid_level(scale, n_levels) == level


def test_window_size_formula():
    assert window_size(64, 1, 0) == 64
    assert window_size(64, 2, 1) == 64  # power of two: no resampling
    assert window_size(64, 4, 2) == 64
    assert window_size(64, 3, 1) == 96  # 64·3 = 192 level-0 px = 96 level-1 px
    assert window_size(64, 16, 2) == 256  # level clamped: 64·16 / 4
    assert window_size(64, 0.5, 0) == 32


def test_origin_bounds_and_window_at():
    assert origin_bounds(100, 30) == (0, 70)
    assert origin_bounds(20, 30) == (-10, 0)  # window larger than the image covers it
    assert window_at((100, 20), 30, (0.0, 0.0)) == Window(0, -10, 30, 30)
    assert window_at((100, 20), 30, (0.999999, 0.999999)) == Window(70, 0, 30, 30)
    ys = {window_at((100, 100), 30, (u, 0.0)).y0 for u in np.linspace(0, 0.9999, 1000)}
    assert ys == set(range(71))  # every origin reachable


def test_power_of_two_scale_reads_the_level_unresampled():
    rng = np.random.default_rng(0)
    ds = FakeDataset({"a": random_pyramid(rng, 200, 180)})
    w = Window(10, 20, 32, 32)
    image, mask = read_crop(ds, "a", 1, w, 32)
    np.testing.assert_array_equal(mask, ds.masks["a"][1][10:42, 20:52])
    np.testing.assert_array_equal(image[0], mask * 10)


def test_non_power_of_two_scale_resizes_nearest_for_masks():
    rng = np.random.default_rng(1)
    ds = FakeDataset({"a": random_pyramid(rng, 200, 180)})
    r = window_size(32, 3, 1)  # 48 level-1 px → 32
    image, mask = read_crop(ds, "a", 1, Window(0, 0, r, r), 32)
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    idx = np.floor((np.arange(32) + 0.5) * 48 / 32).astype(int)
    np.testing.assert_array_equal(mask, ds.masks["a"][1][idx][:, idx])
    assert set(np.unique(mask)) <= set(np.unique(ds.masks["a"][1]))  # nearest never invents ids


def test_resize_nearest_formula():
    m = np.arange(9).reshape(3, 3)
    np.testing.assert_array_equal(resize_nearest(m, 6), np.repeat(np.repeat(m, 2, 0), 2, 1))
    np.testing.assert_array_equal(resize_nearest(np.arange(16).reshape(4, 4), 2), [[5, 7], [13, 15]])


def test_padding_mirrors_the_image_and_ignores_the_mask():
    rng = np.random.default_rng(2)
    ds = FakeDataset({"a": random_pyramid(rng, 20, 24, levels=1)})
    w = Window(-6, -4, 32, 32)  # reaches past every side
    image, mask = read_crop(ds, "a", 0, w, 32)
    inside = (slice(6, 26), slice(4, 28))
    np.testing.assert_array_equal(mask[inside], ds.masks["a"][0])
    outside = np.ones((32, 32), bool)
    outside[inside] = False
    assert (mask[outside] == IGNORE).all()
    padded = np.pad(ds.masks["a"][0] * 10, ((6, 6), (4, 4)), mode="reflect")
    np.testing.assert_array_equal(image[1], padded)


@pytest.mark.parametrize(("flip_y", "flip_x", "k"), list(itertools.product([False, True], [False, True], range(4))))
def test_augment_moves_image_and_mask_together(flip_y, flip_x, k):
    rng = np.random.default_rng(3)
    mask = rng.integers(0, 10, (16, 16)).astype(np.uint8)
    image = np.stack([mask * 10, mask * 10 + 1, mask * 10 + 2])
    ai, am = augment(image, mask, flip_y, flip_x, k)
    for c in range(3):
        np.testing.assert_array_equal(ai[c], am * 10 + c)
    expected = mask[::-1] if flip_y else mask
    expected = expected[:, ::-1] if flip_x else expected
    np.testing.assert_array_equal(am, np.rot90(expected, k))
    assert ai.flags.c_contiguous and am.flags.c_contiguous


def make_sampler(seed=0, rank=0, scales=(1, 2, 4), **kw):
    rng = np.random.default_rng(42)
    ds = FakeDataset({"a": random_pyramid(rng, 300, 260, 4), "b": random_pyramid(rng, 40, 50, 3)})
    return CropSampler(ds, ["a", "b"], CropConfig(32, tuple(scales), batch_size=5, **kw), seed=seed, rank=rank)


def test_sampler_is_deterministic_per_seed_rank_and_epoch():
    def take(sampler, epoch):
        return list(sampler.batches(epoch, 3))

    a = take(make_sampler(), 1)
    b = take(make_sampler(), 1)
    for (ia, ma), (ib, mb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    assert ia.shape == (5, 3, 32, 32) and ia.dtype == np.uint8 and ma.shape == (5, 32, 32)
    for other in (take(make_sampler(rank=1), 1), take(make_sampler(), 2), take(make_sampler(seed=1), 1)):
        assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, other))


def test_sampler_draws_cover_names_scales_and_augmentations():
    s = make_sampler()
    rng = s.rng(0)
    draws = [s.draw(rng) for _ in range(400)]
    assert {d.name for d in draws} == {"a", "b"}
    assert {(d.scale, d.level) for d in draws if d.name == "a"} == {(1, 0), (2, 1), (4, 2)}
    assert {d.rot90 for d in draws} == {0, 1, 2, 3} and {d.flip_x for d in draws} == {False, True}
    assert all(d.window.h == 32 for d in draws)  # power-of-two scales read crop-sized windows
    plain = make_sampler(flips=False, rot90=False)
    assert all((d.flip_x, d.flip_y, d.rot90) == (False, False, 0) for d in (plain.draw(plain.rng(0)) for _ in range(50)))


def test_sampled_crops_keep_image_and_mask_aligned():
    s = make_sampler(scales=(1, 2))
    for images, masks in s.batches(0, 4):
        for image, mask in zip(images, masks, strict=True):
            valid = mask != IGNORE
            np.testing.assert_array_equal(image[0][valid], mask[valid] * 10)


def test_validation_windows_tile_the_level():
    shapes = [(100, 70), (50, 35), (25, 18)]
    wins = validation_windows(shapes, 16, 2)
    assert {lvl for lvl, _ in wins} == {1}
    covered = np.zeros((64, 48), int)
    for _, w in wins:
        covered[w.y0 : w.y1, w.x0 : w.x1] += 1
    assert (covered[:50, :35] == 1).all() and len(wins) == 4 * 3
    assert validation_windows(shapes, 16, 3)[1][1] == Window(0, 24, 24, 24)
