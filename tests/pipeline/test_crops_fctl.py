"""FCtL training samples: local crop + contexts + labels, aligned, augmented together, seeded.

The dataset is imported for real (``pipeline.training.dataset_import.import_pairs``, index masks, 32-px chunks) from PNGs
whose image is one flat colour per class, classes in 16-px blocks on the level-0 grid. Every 2×2 and 4×4
block of levels 1 and 2 then lies in one class block, so their image pixels are exactly their class colour
(2×2 means of one colour) and their labels that class (``mode_2x2``): a ×2 or ×4 context and its target
must agree pixel for pixel, whatever the crop's position and augmentation.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.frameworks.fctl_contexts import context_level, context_window, read_contexts
from pipeline.tiling import Window
from pipeline.training.crops import CropConfig, augment, read_crop, resize_nearest
from pipeline.training.crops_fctl import (
    FctlDraw,
    FctlSampler,
    read_context_masks,
    read_fctl_contexts,
    transform_views,
)
from pipeline.training.dataset_import import import_pairs
from pipeline.training.datasets import TrainingDataset

IGNORE = 255
COLORS = np.array([(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)], np.uint8)
SIZES = {"s0": (150, 130), "s1": (70, 90)}
T = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """``(TrainingDataset, class ids per name)``."""
    root = tmp_path_factory.mktemp("fctl")
    rng = np.random.default_rng(0)
    truth = {}
    for name, (h, w) in SIZES.items():
        ids = np.repeat(np.repeat(rng.integers(0, 4, (h // 16 + 1, w // 16 + 1)), 16, 0), 16, 1)[:h, :w]
        ids = ids.astype(np.uint8)
        Image.fromarray(COLORS[ids]).save(root / f"{name}_sat.png")
        Image.fromarray(ids, mode="L").save(root / f"{name}_mask.png")
        truth[name] = ids
    import_pairs(str(root), str(root / "ds"), image_pattern="{id}_sat.png", mask_pattern="{id}_mask.png",
                 classes=["a", "b", "c", "d"], mask_kind="index", chunk=32, min_size=16)
    ds = TrainingDataset(str(root / "ds"))
    assert ds.shapes("s0") == ((150, 130), (75, 65), (38, 33), (19, 17), (10, 9))
    return ds, truth


def sampler(ds, factors=(2, 4), **kw):
    opts = {k: kw.pop(k) for k in ("flips", "rot90") if k in kw}
    return FctlSampler(ds, ["s0", "s1"], CropConfig(T, batch_size=4, **opts), factors, **kw)


@pytest.mark.parametrize(("flip_y", "flip_x", "k"), list(itertools.product([False, True], [False, True], range(4))))
def test_transform_views_is_augment_on_any_stack(flip_y, flip_x, k):
    rng = np.random.default_rng(1)
    image, mask = rng.integers(0, 255, (3, 8, 8), dtype=np.uint8), rng.integers(0, 9, (8, 8))
    ai, am = augment(image, mask, flip_y, flip_x, k)
    np.testing.assert_array_equal(transform_views(image, flip_y, flip_x, k), ai)
    np.testing.assert_array_equal(transform_views(mask, flip_y, flip_x, k), am)
    stack = rng.integers(0, 255, (2, 3, 8, 8), dtype=np.uint8)
    out = transform_views(stack, flip_y, flip_x, k)
    assert out.flags.c_contiguous
    for i in range(2):
        np.testing.assert_array_equal(out[i], augment(stack[i], mask, flip_y, flip_x, k)[0])


def test_batches_have_the_documented_shapes_and_are_seeded(dataset):
    ds, _ = dataset

    def take(s, epoch):
        return list(s.batches(epoch, 2))

    a = take(sampler(ds), 1)
    images, contexts, masks = a[0]
    assert images.shape == (4, 3, T, T) and images.dtype == np.uint8
    assert contexts.shape == (4, 2, 3, T, T) and contexts.dtype == np.uint8
    assert masks.shape == (4, T, T)
    for x, y in zip(a, take(sampler(ds), 1), strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)
    for other in (take(sampler(ds, rank=1), 1), take(sampler(ds), 2), take(sampler(ds, seed=1), 1)):
        assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, other))
    with_targets = next(sampler(ds, factors=(2, 3, 4), context_targets=True).batches(0, 1))
    assert [p.shape for p in with_targets] == [(4, 3, T, T), (4, 3, 3, T, T), (4, T, T), (4, 3, T, T)]


def test_a_sample_is_the_direct_reads_transformed(dataset):
    """Local crop as ``read_crop`` at level 0 (mirrored image, ignored mask past the image), contexts as a
    worker reads them for that tile (``read_contexts``), one flip/rotation for all."""
    ds, _ = dataset
    s = sampler(ds, factors=(2, 3, 4), context_targets=True)
    d = FctlDraw("s1", Window(50, -10, T, T), flip_y=True, flip_x=False, rot90=3)
    image, contexts, mask, context_masks = s.read(d)
    local, local_mask = augment(*read_crop(ds, "s1", 0, d.window, T), True, False, 3)
    np.testing.assert_array_equal(image, local)
    np.testing.assert_array_equal(mask, local_mask)
    shapes = ds.shapes("s1")
    arrays = {lvl: ds.image_level("s1", lvl) for lvl in range(len(shapes))}
    direct = read_contexts(arrays, shapes, "cyx", d.window, (2, 3, 4), T)
    np.testing.assert_array_equal(contexts, transform_views(direct, True, False, 3))
    np.testing.assert_array_equal(read_fctl_contexts(ds, "s1", d.window, (2, 3, 4), T), direct)
    np.testing.assert_array_equal(context_masks, transform_views(read_context_masks(ds, "s1", d.window, (2, 3, 4), T),
                                                                 True, False, 3))


def test_contexts_and_their_targets_agree_pixel_for_pixel(dataset):
    """×2/×4 (unresampled) contexts are their target's class colours inside the image and zeros outside,
    where the target is ``ignore_index``; the local crop likewise where its mask is valid. Any augmentation
    applied to one view and not the other, or a context read off its window, breaks this."""
    ds, _ = dataset
    s = sampler(ds, factors=(2, 4), context_targets=True)
    for images, contexts, masks, context_masks in s.batches(0, 4):
        for image, ctx, mask, cmask in zip(images, contexts, masks, context_masks, strict=True):
            valid = mask != IGNORE
            np.testing.assert_array_equal(np.moveaxis(image, 0, -1)[valid], COLORS[mask[valid]])
            for view, labels in zip(ctx, cmask, strict=True):
                hwc, inside = np.moveaxis(view, 0, -1), labels != IGNORE
                np.testing.assert_array_equal(hwc[inside], COLORS[labels[inside]])
                assert not hwc[~inside].any()


def test_contexts_stay_centred_on_the_augmented_local_crop(dataset):
    """The middle half of the ×2 target is the local crop at half resolution: its labels match the local
    mask's every other pixel (up to the 1-px phase at 16-px class-block edges) after any flip/rotation.
    Rotating the context by another quarter turn than the local crop drops the agreement a lot."""
    ds, _ = dataset
    s = sampler(ds, factors=(2,), context_targets=True)
    agree, wrong = [], []
    for _, _, masks, context_masks in s.batches(3, 6):
        for mask, cmask in zip(masks, context_masks[:, 0], strict=True):
            centre, half = cmask[T // 4 : 3 * T // 4, T // 4 : 3 * T // 4], mask[::2, ::2]
            valid = (centre != IGNORE) & (half != IGNORE)
            agree.append((centre == half)[valid].mean())
            wrong.append((np.rot90(centre) == half)[valid].mean())
    assert np.mean(agree) > 0.85 and min(agree) > 0.7
    assert np.mean(wrong) < np.mean(agree) - 0.2


def test_context_targets_are_the_label_level_under_the_context_window(dataset):
    """Per factor: label level l (``mode_2x2`` pyramid) over ``context_window``, ``ignore_index`` outside,
    nearest-resized to T. For ×3 that is close to FCtL's level-0 recipe (the 3·T window of level-0 labels,
    nearest-resized: output pixel i takes level-0 pixel o₀ + 3i + 1), not equal: level 1 holds 2×2 modes."""
    ds, truth = dataset
    window = Window(-6, 100, T, T)  # past the top and right of s0
    got = read_context_masks(ds, "s0", window, (2, 3, 4), T)
    shapes = ds.shapes("s0")
    for i, c in enumerate((2, 3, 4)):
        lvl = context_level(c, len(shapes))
        win = context_window(window, c, lvl)
        labels = np.asarray(ds.mask_level("s0", lvl)[:])
        padded = np.full((win.h, win.w), IGNORE, np.uint8)
        inner = win.clip(*shapes[lvl])
        padded[inner.y0 - win.y0 : inner.y1 - win.y0, inner.x0 - win.x0 : inner.x1 - win.x0] = (
            labels[inner.y0 : inner.y1, inner.x0 : inner.x1]
        )
        np.testing.assert_array_equal(got[i], resize_nearest(padded, T))
    o0 = (window.y0 + T // 2 - 3 * T // 2, window.x0 + T // 2 - 3 * T // 2)
    rows, cols = o0[0] + 3 * np.arange(T) + 1, o0[1] + 3 * np.arange(T) + 1
    inside = (rows[:, None] >= 0) & (rows[:, None] < 150) & (cols[None, :] >= 0) & (cols[None, :] < 130)
    level0 = np.full((T, T), IGNORE, np.uint8)
    level0[inside] = truth["s0"][np.clip(rows, 0, 149)[:, None], np.clip(cols, 0, 129)[None, :]][inside]
    assert (got[1] == level0).mean() > 0.9


def test_bad_configurations_name_the_fix(dataset):
    ds, _ = dataset
    with pytest.raises(ValueError, match=r"scales = \(1.0, 2.0\).*scales=\(1.0,\)"):
        FctlSampler(ds, ["s0"], CropConfig(T, scales=(1.0, 2.0)), (2, 4))
    with pytest.raises(ValueError, match="must be > 1"):
        FctlSampler(ds, ["s0"], CropConfig(T), (1, 2))
    with pytest.raises(ValueError, match="at least one image name and one context factor"):
        FctlSampler(ds, ["s0"], CropConfig(T), ())


def test_context_and_crops_import_in_either_order():
    """pipeline.frameworks.fctl_contexts and pipeline.training.crops_fctl share pipeline.reader; any import order works."""
    root = Path(__file__).resolve().parents[2]
    for first in ("pipeline.frameworks.fctl_contexts", "pipeline.training.crops", "pipeline.training.crops_fctl"):
        code = f"import {first}; from pipeline.training.crops_fctl import FctlSampler; from pipeline.frameworks.fctl_contexts import read_contexts"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
