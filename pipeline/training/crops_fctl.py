"""FCtL training samples: a level-0 crop with its context views and their labels, aligned, augmented together.

For a local crop ``W`` (``T × T`` level-0 pixels, drawn as ``pipeline.training.crops.window_at`` draws a scale-1 crop)
the context at factor ``c`` is the ``c·T`` window centred on ``W`` read from pyramid level
``context_level(c)`` exactly as a worker reads it for a tile (``pipeline.frameworks.fctl_contexts.read_contexts``: zeros past
the image), and its labels are the same window of the label level (``ignore_index`` past the image). One flip
or rotation transforms all of them (``transform_views``), so the contexts stay centred on the crop.

Stage 2 of FCtL's training (the context segmenters) learns ``(context image, context labels)`` pairs;
stage 3 (the fused model) learns ``(crop, contexts) → crop labels`` (``jobs.train_fctl``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.frameworks.fctl_contexts import context_level, context_levels, context_window, read_contexts
from pipeline.tiling import Window
from pipeline.training.crops import CropConfig, read_crop, read_mask_window, resize_nearest, window_at


def transform_views(a: np.ndarray, flip_y: bool, flip_x: bool, rot90: int) -> np.ndarray:
    """``augment``'s transform on the last two axes of any stack (``(…, h, w)``): flip y, flip x, then rotate
    by ``rot90 · 90°`` counter-clockwise. Contexts are centred on their tile (to within ``context_window``'s
    rounding), so the same flip or rotation about each view's centre keeps them centred on the transformed tile."""
    if flip_y:
        a = a[..., ::-1, :]
    if flip_x:
        a = a[..., ::-1]
    if rot90 % 4:
        a = np.rot90(a, rot90, axes=(-2, -1))
    return np.ascontiguousarray(a)


def read_fctl_contexts(dataset, name: str, window: Window, factors: Sequence[float], size: int) -> np.ndarray:
    """Contexts ``(n_ctx, 3, size, size)`` uint8 of the level-0 ``window`` of sample ``name``, exactly as a
    worker reads them for a tile (``pipeline.frameworks.fctl_contexts.read_contexts``: zeros past the image)."""
    shapes = dataset.shapes(name)
    arrays = {lvl: dataset.image_level(name, lvl) for lvl in context_levels(factors, len(shapes))}
    return read_contexts(arrays, shapes, "cyx", window, factors, size)


def read_context_masks(dataset, name: str, window: Window, factors: Sequence[float], size: int) -> np.ndarray:
    """The contexts' own labels ``(n_ctx, size, size)``: per factor ``c``, the label level
    ``l = context_level(c)`` (``mode_2x2`` of level 0) over the same ``context_window`` as the context image,
    ``ignore_index`` past the image, resized ``r → size`` by ``resize_nearest``; the targets of FCtL's context
    encoders (stage 2), pixel-aligned with the context images."""
    shapes = dataset.shapes(name)
    out = []
    for c in factors:
        level = context_level(c, len(shapes))
        win = context_window(window, c, level)
        mask = read_mask_window(dataset.mask_level(name, level), shapes[level], win, dataset.info.ignore_index)
        out.append(resize_nearest(mask, size))
    return np.stack(out)


@dataclass(frozen=True)
class FctlDraw:
    """One FCtL sample: the local ``window`` at level 0 (its contexts follow from it) and the augmentation."""

    name: str
    window: Window
    flip_y: bool = False
    flip_x: bool = False
    rot90: int = 0


class FctlSampler:
    """Seeded FCtL batches over ``names``: a local crop of ``config.size``² level-0 pixels (image uniform,
    window uniform as ``window_at``; mirrored image and ignored mask past the image, as ``read_crop``) with its
    contexts at ``factors`` (``read_fctl_contexts``), one flip/rot90 applied to all of them. Draws depend only
    on ``(seed, rank, epoch)``.

    ``batches`` yields ``(images (B, 3, T, T) uint8, contexts (B, n_ctx, 3, T, T) uint8, masks (B, T, T))``,
    plus ``context_masks (B, n_ctx, T, T)`` (``read_context_masks``) when ``context_targets``.
    """

    def __init__(self, dataset, names: Sequence[str], config: CropConfig, factors: Sequence[float], seed: int = 0,
                 rank: int = 0, context_targets: bool = False) -> None:
        if not names or not factors:
            raise ValueError("FctlSampler needs at least one image name and one context factor")
        if tuple(config.scales) != (1.0,):
            raise ValueError(
                f"FctlSampler reads local crops at full resolution, but config.scales = {config.scales}; use "
                "CropConfig(scales=(1.0,)) and give the coarser views as context factors"
            )
        for c in factors:
            context_level(c, 1)  # raises on a factor ≤ 1
        self.dataset, self.names, self.config = dataset, list(names), config
        self.factors = tuple(float(c) for c in factors)
        self.seed, self.rank, self.context_targets = seed, rank, context_targets

    def rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, epoch])

    def draw(self, rng: np.random.Generator) -> FctlDraw:
        c = self.config
        name = self.names[int(rng.integers(len(self.names)))]
        window = window_at(self.dataset.shapes(name)[0], c.size, tuple(rng.random(2)))
        flip_y, flip_x = (bool(v) for v in rng.integers(0, 2, 2)) if c.flips else (False, False)
        k = int(rng.integers(4)) if c.rot90 else 0
        return FctlDraw(name, window, flip_y, flip_x, k)

    def read(self, d: FctlDraw) -> tuple[np.ndarray, ...]:
        """``(image, contexts, mask)`` (and ``context_masks``) of one draw, augmented."""
        size = self.config.size
        image, mask = read_crop(self.dataset, d.name, 0, d.window, size)
        views = [image, read_fctl_contexts(self.dataset, d.name, d.window, self.factors, size), mask]
        if self.context_targets:
            views.append(read_context_masks(self.dataset, d.name, d.window, self.factors, size))
        return tuple(transform_views(v, d.flip_y, d.flip_x, d.rot90) for v in views)

    def batches(self, epoch: int, n: int) -> Iterator[tuple[np.ndarray, ...]]:
        """``n`` batches of ``config.batch_size`` samples (see the class docstring)."""
        rng = self.rng(epoch)
        for _ in range(n):
            samples = [self.read(self.draw(rng)) for _ in range(self.config.batch_size)]
            yield tuple(np.stack(parts) for parts in zip(*samples, strict=True))


__all__ = ["FctlDraw", "FctlSampler", "read_context_masks", "read_fctl_contexts", "transform_views"]
