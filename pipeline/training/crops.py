"""Random multi-scale training crops read from image and label pyramids, the way MagNet and FCtL train.

A crop of ``crop`` output pixels at scale ``s`` covers ``crop · s`` level-0 pixels per side. It is read
from pyramid level

    l = clamp(⌊log2 s⌋, 0, n_levels − 1)            (pyramid_level)

as a window of ``r = max(1, round(crop · s / 2^l))`` level-l pixels (window_size) and resized ``r → crop``,
bilinear for the image and nearest for the mask; when ``s = 2^l`` then ``r = crop`` and nothing is
resampled. With ``E`` the level-l extent of an axis, the window origin is uniform over the integers of

    [0, E − r]     if r ≤ E        (the window lies inside the image)
    [E − r, 0]     if r > E        (the window covers the whole axis and reaches past both ends)

(origin_bounds). Past the image the image is mirrored (``pipeline.reader.read_window``, "reflect") and
the mask is ``ignore_index``, so padding never counts in the loss. Flips and 90° rotations are applied
identically to image and mask. The sampler's draws depend only on ``(seed, rank, epoch)``: each
data-parallel worker gets its own stream, and a resumed run redraws an epoch exactly.

MagNet's refiner pairs (a fine crop with its coarse view) are ``pipeline.crops_refiner``; FCtL's samples
(a level-0 crop with its context views and their labels) are ``pipeline.crops_fctl``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.reader import read_region, read_window, resize_image
from pipeline.tiling import Window


def pyramid_level(scale: float, n_levels: int) -> int:
    """``l = clamp(⌊log2 scale⌋, 0, n_levels − 1)``: the finest level no finer than the scale needs."""
    if scale <= 0:
        raise ValueError(f"crop scale must be > 0, got {scale}")
    return min(max(math.floor(math.log2(scale) + 1e-9), 0), n_levels - 1)


def window_size(crop: int, scale: float, level: int) -> int:
    """``r = max(1, round(crop · scale / 2^level))`` level-``level`` pixels per side."""
    return max(1, round(crop * scale / 2**level))


def origin_bounds(extent: int, size: int) -> tuple[int, int]:
    """Inclusive origin range ``[0, E − r]`` if ``r ≤ E`` else ``[E − r, 0]`` (see the module doc)."""
    return (0, extent - size) if size <= extent else (extent - size, 0)


def window_at(shape_yx: tuple[int, int], size: int, u: tuple[float, float]) -> Window:
    """The ``size²`` window whose origin is at fraction ``u ∈ [0, 1)²`` of ``origin_bounds`` per axis:
    ``y0 = lo + ⌊u_y · (hi − lo + 1)⌋``."""
    origin = []
    for extent, frac in zip(shape_yx, u, strict=True):
        lo, hi = origin_bounds(extent, size)
        origin.append(lo + min(int(frac * (hi - lo + 1)), hi - lo))
    return Window(origin[0], origin[1], size, size)


def resize_nearest(mask: np.ndarray, out: int) -> np.ndarray:
    """``(r, r)`` → ``(out, out)`` by nearest neighbour: ``out[i, j] = mask[⌊(i + ½)·r/out⌋, ⌊(j + ½)·r/out⌋]``."""
    if mask.shape == (out, out):
        return mask
    iy = np.minimum(((np.arange(out) + 0.5) * mask.shape[0] / out).astype(np.int64), mask.shape[0] - 1)
    ix = np.minimum(((np.arange(out) + 0.5) * mask.shape[1] / out).astype(np.int64), mask.shape[1] - 1)
    return mask[iy[:, None], ix[None, :]]


def augment(
    image: np.ndarray, mask: np.ndarray, flip_y: bool, flip_x: bool, rot90: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flip (vertical, then horizontal) and rotate by ``rot90 · 90°`` counter-clockwise; image ``(3, h, w)``
    and mask ``(h, w)`` get the same transform."""
    if flip_y:
        image, mask = image[:, ::-1], mask[::-1]
    if flip_x:
        image, mask = image[:, :, ::-1], mask[:, ::-1]
    if rot90 % 4:
        image, mask = np.rot90(image, rot90, axes=(1, 2)), np.rot90(mask, rot90, axes=(0, 1))
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def read_crop(dataset, name: str, level: int, window: Window, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(3, crop, crop)`` uint8 and mask ``(crop, crop)`` of ``window`` at ``level`` of sample ``name``.

    ``dataset`` is a ``pipeline.training.datasets.TrainingDataset`` (anything with ``shapes``, ``image_level``,
    ``mask_level`` and ``info.ignore_index``).
    """
    shape = dataset.shapes(name)[level]
    image = read_window(dataset.image_level(name, level), "cyx", shape, window, pad="reflect")
    mask = read_mask_window(dataset.mask_level(name, level), shape, window, dataset.info.ignore_index)
    return resize_image(image, crop), resize_nearest(mask, crop)


def read_mask_window(labels, shape_yx: tuple[int, int], window: Window, ignore_index: int) -> np.ndarray:
    """Class ids ``(window.h, window.w)`` of a ``(H, W)`` label level, ``ignore_index`` past the image."""
    inner = window.clip(*shape_yx)
    mask = np.full((window.h, window.w), ignore_index, dtype=labels.dtype)
    if not inner.empty:
        mask[inner.y0 - window.y0 : inner.y1 - window.y0, inner.x0 - window.x0 : inner.x1 - window.x0] = (
            read_region(labels, "yx", inner)[0]
        )
    return mask


def validation_windows(
    shapes: Sequence[tuple[int, int]], crop: int, scale: float
) -> list[tuple[int, Window]]:
    """``(level, window)`` tiles covering a whole image at ``scale``: windows of ``r`` level-l pixels at
    origins ``0, r, 2r, …`` per axis (the last ones padded past the image, where the mask is ignored)."""
    level = pyramid_level(scale, len(shapes))
    r = window_size(crop, scale, level)
    h, w = shapes[level]
    return [(level, Window(y, x, r, r)) for y in range(0, h, r) for x in range(0, w, r)]


@dataclass(frozen=True)
class CropConfig:
    """Crop side in output pixels, the scales drawn uniformly, batch size and augmentations."""

    size: int
    scales: tuple[float, ...] = (1.0,)
    batch_size: int = 8
    flips: bool = True
    rot90: bool = True

    def __post_init__(self) -> None:
        if self.size < 1 or self.batch_size < 1 or not self.scales or min(self.scales) <= 0:
            raise ValueError(f"bad CropConfig {self}: size, batch_size ≥ 1 and scales > 0 are required")


@dataclass(frozen=True)
class CropDraw:
    """One random crop: where to read it and how to augment it."""

    name: str
    scale: float
    level: int
    window: Window
    flip_y: bool = False
    flip_x: bool = False
    rot90: int = 0


class CropSampler:
    """Seeded batches of random crops over ``names`` of a dataset (images drawn uniformly)."""

    def __init__(self, dataset, names: Sequence[str], config: CropConfig, seed: int = 0, rank: int = 0) -> None:
        if not names:
            raise ValueError("CropSampler needs at least one image name")
        self.dataset, self.names, self.config = dataset, list(names), config
        self.seed, self.rank = seed, rank

    def rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, epoch])

    def draw(self, rng: np.random.Generator) -> CropDraw:
        c = self.config
        name = self.names[int(rng.integers(len(self.names)))]
        scale = float(c.scales[int(rng.integers(len(c.scales)))])
        shapes = self.dataset.shapes(name)
        level = pyramid_level(scale, len(shapes))
        window = window_at(shapes[level], window_size(c.size, scale, level), tuple(rng.random(2)))
        flip_y, flip_x = (bool(v) for v in rng.integers(0, 2, 2)) if c.flips else (False, False)
        k = int(rng.integers(4)) if c.rot90 else 0
        return CropDraw(name, scale, level, window, flip_y, flip_x, k)

    def read(self, d: CropDraw) -> tuple[np.ndarray, np.ndarray]:
        image, mask = read_crop(self.dataset, d.name, d.level, d.window, self.config.size)
        return augment(image, mask, d.flip_y, d.flip_x, d.rot90)

    def batches(self, epoch: int, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``n`` batches: images ``(B, 3, crop, crop)`` uint8 and masks ``(B, crop, crop)``."""
        rng = self.rng(epoch)
        for _ in range(n):
            crops = [self.read(self.draw(rng)) for _ in range(self.config.batch_size)]
            yield np.stack([i for i, _ in crops]), np.stack([m for _, m in crops])


__all__ = [
    "CropConfig", "CropDraw", "CropSampler", "augment", "origin_bounds", "pyramid_level", "read_crop",
    "read_mask_window", "resize_nearest", "validation_windows", "window_at", "window_size",
]

