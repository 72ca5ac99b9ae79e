"""MagNet's refiner training pairs, read from image and label pyramids (crops: ``pipeline.crops``).

MagNet's refiner trains on pairs (``RefinerSampler``): a ``crop``² window at a fine level L (read as is)
and a coarse view of ``crop``² pixels at level L + 1 that holds the window's footprint. The refiner sees
the ×2 bilinear upsampling (align_corners=False) of the segmenter's probabilities on the coarse view over
the crop, exactly as ``pipeline.reader.upsample2x_window`` computes the previous stage's map for a tile
(``upsample_taps``), so training and inference feed the refiner the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.reader import read_window, reflect_index, upsample_index
from pipeline.tiling import Window
from pipeline.training.crops import CropConfig, augment, origin_bounds, read_crop, validation_windows, window_at


def upsample_taps(
    start: int, length: int, fine_size: int, coarse_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel ``start … start+length−1`` of a level-L axis (``fine_size`` pixels; positions past it mirrored,
    ``i = reflect_index(…)``): the level-(L+1) source pixels ``i0, i1`` and weight ``λ`` of the ×2 bilinear
    upsampling, value ``(1 − λ)·src[i0] + λ·src[i1]`` with ``u = max(0, (i + ½)/2 − ½)``, ``i0 = ⌊u⌋``,
    ``i1 = min(i0 + 1, coarse_size − 1)``, ``λ = u − i0`` (``reader.upsample_index``, as ``upsample2x_window``)."""
    i = reflect_index(start, length, fine_size)
    lo = int(i.min())
    i0, i1, lam = upsample_index(lo, int(i.max()) - lo + 1, coarse_size)
    return i0[i - lo], i1[i - lo], lam[i - lo]


def coarse_footprint(window: Window, fine_shape: tuple[int, int], coarse_shape: tuple[int, int]) -> Window:
    """The level-(L+1) pixels the ×2 upsampling of level-L ``window`` reads: ``[min i0, max i1 + 1)`` per axis
    (``upsample_taps``); always inside the coarse image."""
    y0, y1, _ = upsample_taps(window.y0, window.h, fine_shape[0], coarse_shape[0])
    x0, x1, _ = upsample_taps(window.x0, window.w, fine_shape[1], coarse_shape[1])
    top, left = int(y0.min()), int(x0.min())
    return Window(top, left, int(y1.max()) + 1 - top, int(x1.max()) + 1 - left)


def coarse_window_at(footprint: Window, coarse_shape: tuple[int, int], size: int, u: tuple[float, float]) -> Window:
    """A ``size²`` coarse view holding ``footprint``: per axis, with ``[lo, hi] = origin_bounds(E, size)`` and
    the footprint ``[a, b)``, the origin is at fraction ``u`` of the integers of ``[max(lo, b − size), min(hi, a)]``
    (inside the image where it fits; the whole axis, mirrored past both ends, when ``E ≤ size``)."""
    origin = []
    for extent, a, b, frac in zip(coarse_shape, (footprint.y0, footprint.x0), (footprint.y1, footprint.x1), u,
                                  strict=True):
        lo, hi = origin_bounds(extent, size)
        lo, hi = max(lo, b - size), min(hi, a)
        if lo > hi:
            raise ValueError(f"a coarse view of {size} px cannot hold a footprint of {b - a} px; use a larger crop")
        origin.append(lo + min(int(frac * (hi - lo + 1)), hi - lo))
    return Window(origin[0], origin[1], size, size)


@dataclass(frozen=True)
class RefinerDraw:
    """One refiner pair: the fine crop ``window`` at ``level``, the ``coarse`` view at ``level + 1``, augmentation."""

    name: str
    level: int
    window: Window
    coarse: Window
    flip_y: bool = False
    flip_x: bool = False
    rot90: int = 0


def refiner_draw(name: str, shapes: Sequence[tuple[int, int]], level: int, window: Window, size: int,
                 u: tuple[float, float] = (0.5, 0.5), flip_y: bool = False, flip_x: bool = False,
                 rot90: int = 0) -> RefinerDraw:
    """The pair of ``window`` at ``level``: its coarse view placed by ``coarse_window_at`` at fraction ``u``."""
    if level + 1 >= len(shapes):
        raise ValueError(f"{name!r} has {len(shapes)} pyramid level(s): no level {level + 1} to pair level {level} "
                         "with; import it with a smaller min_size or leave it out of refiner training")
    fp = coarse_footprint(window, shapes[level], shapes[level + 1])
    return RefinerDraw(name, level, window, coarse_window_at(fp, shapes[level + 1], size, u), flip_y, flip_x, rot90)


@dataclass(frozen=True)
class RefinerBatch:
    """Pairs as arrays: ``fine (B, 3, c, c)`` uint8 and ``masks (B, c, c)``, both augmented; ``coarse
    (B, 3, S, S)`` uint8, not augmented; ``rows``/``cols (B, 2, c)`` int64 = (i0, i1) of ``upsample_taps``
    relative to the coarse view, ``row_weights``/``col_weights (B, c)`` float32 = λ; ``flips (B, 2)`` bool
    (y, x) and ``rot90 (B,)``: the augmentation the upsampled coarse map must get too."""

    fine: np.ndarray
    masks: np.ndarray
    coarse: np.ndarray
    rows: np.ndarray
    row_weights: np.ndarray
    cols: np.ndarray
    col_weights: np.ndarray
    flips: np.ndarray
    rot90: np.ndarray


def read_pairs(dataset, draws: Sequence[RefinerDraw], crop: int) -> RefinerBatch:
    """Read the fine crops, masks and coarse views of ``draws`` (fine windows of ``crop``² level-L pixels)."""
    fine, masks, coarse, rows, row_w, cols, col_w = [], [], [], [], [], [], []
    for d in draws:
        shapes = dataset.shapes(d.name)
        image, mask = read_crop(dataset, d.name, d.level, d.window, crop)
        image, mask = augment(image, mask, d.flip_y, d.flip_x, d.rot90)
        fine.append(image)
        masks.append(mask)
        coarse.append(read_window(dataset.image_level(d.name, d.level + 1), "cyx", shapes[d.level + 1], d.coarse))
        fy, cy = shapes[d.level][0], shapes[d.level + 1][0]
        fx, cx = shapes[d.level][1], shapes[d.level + 1][1]
        i0, i1, lam = upsample_taps(d.window.y0, d.window.h, fy, cy)
        rows.append(np.stack([i0, i1]) - d.coarse.y0)
        row_w.append(lam)
        i0, i1, lam = upsample_taps(d.window.x0, d.window.w, fx, cx)
        cols.append(np.stack([i0, i1]) - d.coarse.x0)
        col_w.append(lam)
    return RefinerBatch(
        np.stack(fine), np.stack(masks), np.stack(coarse), np.stack(rows), np.stack(row_w), np.stack(cols),
        np.stack(col_w), np.array([(d.flip_y, d.flip_x) for d in draws], bool).reshape(-1, 2),
        np.array([d.rot90 for d in draws], np.int64),
    )


def refiner_validation_draws(name: str, shapes: Sequence[tuple[int, int]], crop: int,
                             levels: Sequence[int]) -> list[RefinerDraw]:
    """Pairs covering a whole image at each fine level (``validation_windows`` at scale ``2^L``), coarse
    views centred, no augmentation; levels without a coarser one in this image are skipped."""
    return [refiner_draw(name, shapes, level, w, crop) for lvl in levels if lvl + 1 < len(shapes)
            for level, w in validation_windows(shapes, crop, 2.0**lvl)]


class RefinerSampler:
    """Seeded batches of refiner pairs over ``names``: image uniform, fine level uniform over ``levels``
    (clamped to the image's second-coarsest level), crop window and coarse view uniform (``window_at``,
    ``coarse_window_at``), flips and rot90 as ``config`` says. Draws depend only on ``(seed, rank, epoch)``."""

    def __init__(self, dataset, names: Sequence[str], config: CropConfig, levels: Sequence[int], seed: int = 0,
                 rank: int = 0) -> None:
        if not names or not levels:
            raise ValueError("RefinerSampler needs at least one image name and one fine level")
        self.dataset, self.names, self.config, self.levels = dataset, list(names), config, list(levels)
        self.seed, self.rank = seed, rank

    def draw(self, rng: np.random.Generator) -> RefinerDraw:
        c = self.config
        name = self.names[int(rng.integers(len(self.names)))]
        shapes = self.dataset.shapes(name)
        level = min(self.levels[int(rng.integers(len(self.levels)))], max(len(shapes) - 2, 0))
        window = window_at(shapes[level], c.size, tuple(rng.random(2)))
        u = tuple(rng.random(2))
        flip_y, flip_x = (bool(v) for v in rng.integers(0, 2, 2)) if c.flips else (False, False)
        k = int(rng.integers(4)) if c.rot90 else 0
        return refiner_draw(name, shapes, level, window, c.size, u, flip_y, flip_x, k)

    def batches(self, epoch: int, n: int) -> Iterator[RefinerBatch]:
        """``n`` batches of ``config.batch_size`` pairs."""
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        for _ in range(n):
            yield read_pairs(self.dataset, [self.draw(rng) for _ in range(self.config.batch_size)], self.config.size)
