"""MagNet's formulas on maps (Huynh et al., CVPR 2021; github VinAIResearch/MagNet, ``magnet/model/refinement.py``,
``test.py``): the configuration, the image-wide threshold, MagNet-Fast's choice of tiles, and the whole algorithm
on whole arrays as the reference for tests. The per-pixel work of a stage runs on the workers
(``pipeline.frameworks.magnet_blocks``).

Stage ``s`` runs at pyramid level ``L_s = scales − 1 − s`` (coarse to fine; level 0 last). Stage 0 is plain
tiled segmentation; its blended probabilities are the map ``Y₀``. A stage-s tile reads its image window at
``L_s`` and the stage-(s−1) map over the same footprint, upsampled ×2 (``reader.upsample2x_window``), and
gives ``R = softmax(refiner(softmax(segmenter(x)), Y_up))``. Then, never holding a whole map:

1. ``R`` = blend of the tiles; ``E = certainty(R) · uncertainty(Y_up)``, as float16;
2. ``E`` median-filtered (``k × k``, edges replicated): ``E_med``, float16; a histogram of its exact values;
3. the image-wide top-k becomes one threshold every pixel can apply: ``t`` = the largest value with
   ``count(E_med ≥ t) ≥ k`` (``models.magnet.topk_threshold``), read off the summed histograms exactly
   (``threshold_from_histogram``);
4. ``Y_s = where(E_med ≥ t, R, Y_up)``: the next stage's map, or the final probabilities.

MagNet-Fast (the reference's ``--n_patches``; ``MagnetConfig.patches``): a refinement stage runs only the
``n`` tiles whose footprint is most uncertain in the previous stage's map (mean of ``1 − (top1 − top2)``,
``tile_uncertainty``); pixels no chosen tile covers keep ``Y_up`` (``E = 0`` there), and the count replaced
shrinks by the share of tiles run, as in the reference.

``whole_image`` runs the same algorithm on whole arrays (for images small enough), which the tiled run
matches except within the reach of tile-border effects (see tests/pipeline/test_magnet.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from models import magnet as mg
from pipeline.reader import is_half, read_window, upsample2x_window
from pipeline.tiling import Window

F16_BINS = 1 << 16


@dataclass(frozen=True)
class MagnetConfig:
    # n: n stages at pyramid levels n − 1 … 0; or the fractions of the image's size of each stage, coarse to fine,
    # strictly increasing, the last 1 (``pipeline.frameworks.magnet_scales``)
    scales: int | tuple[float, ...] = 3
    replace: float = 0.75  # ≤ 1: fraction of each stage's pixels; > 1: a pixel count per stage
    median: int = 5  # median filter side, in pixels of the stage's level
    patches: float | None = None  # MagNet-Fast: ≤ 1 a fraction, > 1 a count of tiles refined per stage
    # the reference's procedure where it is a choice (``pipeline.frameworks.magnet_reference``); these defaults are
    # gigaseg's: the median at the stage's resolution, edges replicated; the coarse map's exact window; stage 0
    # tiled; MagNet-Fast's most uncertain tiles
    median_view: str | tuple[int, int] = "stage"  # "stage", "tile" or a (h, w) view
    median_padding: str = "edge"  # "edge" or "zero"
    crop: str = "exact"  # "exact" or "roi_align"
    stage0: str = "tiled"  # "tiled" or "whole"
    patch_choice: str = "most_uncertain"  # or "least_uncertain"

    def __post_init__(self) -> None:
        if isinstance(self.scales, (list, tuple)):
            f = tuple(float(v) for v in self.scales)
            object.__setattr__(self, "scales", f)
            if len(f) < 2 or not all(0 < a < b for a, b in pairwise(f)) or f[-1] != 1.0:
                raise ValueError(f"scales as fractions of the image's size must be ≥ 2 strictly increasing values in "
                                 f"(0, 1], the last 1, e.g. [0.25, 0.6, 1.0]; got {list(f)}")
        elif self.scales < 2:
            raise ValueError(f"MagNet needs at least 2 scales, got {self.scales}")
        if self.replace <= 0:
            raise ValueError(f"replace must be a positive fraction or count, got {self.replace}")
        if self.median < 1 or self.median % 2 == 0:
            raise ValueError(f"median filter size must be odd and ≥ 1, got {self.median}")
        if self.patches is not None and self.patches <= 0:
            raise ValueError(f"patches must be a positive fraction or count of tiles, got {self.patches}")

    @property
    def n_stages(self) -> int:
        return self.scales if isinstance(self.scales, int) else len(self.scales)

    def levels(self) -> tuple[int, ...]:
        """The pyramid level of each stage: ``n − 1 … 0``, or for fractions the coarsest level at least as fine,
        ``⌊−log₂ f⌋`` (a pyramid of enough levels; ``magnet_scales.stage_scales`` says what a given one gives)."""
        if isinstance(self.scales, int):
            return tuple(range(self.scales - 1, -1, -1))
        out = []
        for f in self.scales:
            level = 0
            while f * 2.0 ** (level + 1) <= 1.0:
                level += 1
            out.append(level)
        return tuple(out)

    def count(self, h: int, w: int, share: float = 1.0) -> int:
        """Pixels replaced in an ``h × w`` stage of which ``share`` of the tiles ran (1 unless MagNet-Fast):
        ``round(replace · h · w · share)`` for a fraction, ``min(replace, h · w · share)`` for a count."""
        n = h * w * share
        return int(min(n, round(self.replace * n)) if self.replace <= 1 else min(n, int(self.replace)))

    def tile_count(self, n_tiles: int) -> int:
        """Tiles a refinement stage runs: all, or ``max(1, round(patches · n))`` / ``min(n, patches)``."""
        if self.patches is None:
            return n_tiles
        k = round(self.patches * n_tiles) if self.patches <= 1 else int(self.patches)
        return max(1, min(n_tiles, k))


def _certainty_np(p: np.ndarray) -> np.ndarray:
    top = np.partition(p, p.shape[0] - 2, axis=0)[-2:]
    return top[1] - top[0]


def error_block(refined: np.ndarray, previous_up: np.ndarray) -> np.ndarray:
    """``E = certainty(R) · (1 − certainty(Y_up))`` for ``(C, h, w)`` blocks → ``(h, w)`` float32."""
    return _certainty_np(refined) * (1.0 - _certainty_np(previous_up))


def histogram(e: np.ndarray) -> np.ndarray:
    """Counts of exact float16 values (non-negative float16 sort like their uint16 bit patterns): ``(2^16,)``."""
    return np.bincount(e.astype(np.float16).view(np.uint16).ravel(), minlength=F16_BINS)


def threshold_from_histogram(hist: np.ndarray, k: int) -> float:
    """The largest float16 ``t`` with ``count(E ≥ t) ≥ k``: ``topk_threshold`` read off a histogram."""
    if k <= 0:
        return float("inf")
    above = np.cumsum(hist[::-1])[::-1]  # above[b] = count of values with bit pattern ≥ b
    b = int(np.nonzero(above >= k)[0].max())
    return float(np.array([b], np.uint16).view(np.float16)[0])


def footprint(window: Window, fine_shape: tuple[int, int], coarse_shape: tuple[int, int] | None = None) -> Window:
    """A stage-s tile window's footprint on the stage-(s−1) map of ``coarse_shape`` (default: half of
    ``fine_shape``, a pyramid level): the window clipped to the image, then ``[⌊y0/2⌋, ⌈y1/2⌉)`` on an axis where
    the map is half the stage (``reader.is_half``), else ``[⌊y0·h/H⌋, ⌈y1·h/H⌉)`` (``h``: the map's size, ``H``
    the stage's); the same for x."""
    c = window.clip(*fine_shape)
    coarse = coarse_shape or ((fine_shape[0] + 1) // 2, (fine_shape[1] + 1) // 2)

    def axis(a: int, b: int, fine: int, size: int) -> tuple[int, int]:
        if is_half(size, fine):
            return a // 2, -(-b // 2)
        return a * size // fine, min(size, -(-b * size // fine))

    (y0, y1), (x0, x1) = axis(c.y0, c.y1, fine_shape[0], coarse[0]), axis(c.x0, c.x1, fine_shape[1], coarse[1])
    return Window(y0, x0, y1 - y0, x1 - x0)


def mean_uncertainty(block: np.ndarray) -> float:
    """Mean of ``1 − (top1 − top2)`` over a ``(C, h, w)`` block of probabilities."""
    return float((1.0 - _certainty_np(block.astype(np.float32))).mean())


def tile_uncertainty(previous, grid, scheduler: Any = "threads",
                     coarse_shape: tuple[int, int] | None = None) -> np.ndarray:
    """``(ny, nx)`` mean uncertainty of the previous stage's map ``(C, H/2, W/2)`` (or ``coarse_shape``) over each
    tile's ``footprint``: one Dask task per row of tiles, each reading only its footprints."""
    import dask

    fine = (grid.height, grid.width)

    def row(iy: int) -> np.ndarray:
        out = np.empty(grid.nx, np.float64)
        for ix in range(grid.nx):
            f = footprint(grid.window(iy, ix), fine, coarse_shape)
            out[ix] = mean_uncertainty(np.asarray(previous[:, f.y0 : f.y1, f.x0 : f.x1]))
        return out

    rows = dask.compute(*[dask.delayed(row)(iy) for iy in range(grid.ny)], scheduler=scheduler)
    return np.stack(rows)


def select_tiles(scores: np.ndarray, n: int) -> tuple[tuple[int, int], ...]:
    """The ``n`` tiles of highest score (ties: lower index first), in grid order."""
    flat = scores.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:n]
    nx = scores.shape[1]
    return tuple((int(i) // nx, int(i) % nx) for i in sorted(order))


# ---------------------------------------------------------------- the same algorithm on whole arrays


def _mirrored_input(image: np.ndarray, margin: int, multiple: int, mean, std) -> tuple[torch.Tensor, int, int]:
    """A whole ``(3, H, W)`` image mirrored by ``margin`` px (and on to a multiple of the network's stride),
    normalised: ``(1, 3, PH, PW)``, with ``PH`` and ``PW``."""
    h, w = image.shape[1:]
    ph = -(-(h + 2 * margin) // multiple) * multiple
    pw = -(-(w + 2 * margin) // multiple) * multiple
    x = read_window(image, "cyx", (h, w), Window(-margin, -margin, ph, pw))
    return (torch.from_numpy(x).float()[None] - mean) / std, ph, pw


@torch.inference_mode()
def whole_image(
    levels: list[np.ndarray], segmenter, refiner, cfg: MagnetConfig, *, margin: int, normalization, grids=None
) -> np.ndarray:
    """MagNet on whole arrays: ``levels[l]`` is the ``(3, H_l, W_l)`` uint8 pyramid; returns the final
    ``(C, H₀, W₀)`` float16 probabilities. Networks see each level mirrored by ``margin`` px, as tiles do;
    maps are stored as float16 between steps, as the tiled pipeline stores them.

    MagNet-Fast (``cfg.patches``) needs ``grids`` (the tile grid of each stage): a stage's ``R`` then counts
    only inside the chosen tiles' windows (elsewhere ``Y_up`` stays, ``E = 0``)."""
    mean = torch.tensor(normalization.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(normalization.std).view(1, -1, 1, 1) * 255
    if not isinstance(cfg.scales, int):
        raise TypeError("whole_image runs MagNet on pyramid levels: give scales as a count")
    mult = segmenter.input_multiple
    y = None
    for s, level in enumerate(cfg.levels()):
        img = levels[level]
        h, w = img.shape[1:]
        x, ph, pw = _mirrored_input(img, margin, mult, mean, std)
        a, b, c, d = margin, margin + h, margin, margin + w
        fine = torch.softmax(segmenter(x).float(), dim=1)
        if s == 0:
            y = fine[0, :, a:b, c:d].numpy().astype(np.float16)
            continue
        prev = y.astype(np.float32)
        up = upsample2x_window(prev, prev.shape[1:], (h, w), Window(-margin, -margin, ph, pw))
        r = torch.softmax(refiner(fine, torch.from_numpy(up)[None]).float(), dim=1)[0, :, a:b, c:d].numpy()
        up = up[:, a:b, c:d]
        covered, share = np.ones((h, w), bool), 1.0
        if cfg.patches is not None and cfg.tile_count(len(grids[s])) < len(grids[s]):
            grid = grids[s]
            scores = np.array([[mean_uncertainty(prev[:, f.y0 : f.y1, f.x0 : f.x1])
                                for f in (footprint(grid.window(iy, ix), (h, w)) for ix in range(grid.nx))]
                               for iy in range(grid.ny)])
            chosen = select_tiles(scores, cfg.tile_count(len(grid)))
            covered = np.zeros((h, w), bool)
            for iy, ix in chosen:
                win = grid.window(iy, ix).clip(h, w)
                covered[win.y0 : win.y1, win.x0 : win.x1] = True
            share = len(chosen) / len(grid)
            r = np.where(covered[None], r, up)
        # as the tiled run: E from the blend's float32 R, the merge from R as stored (float16)
        e = np.where(covered, error_block(r, up), 0.0).astype(np.float16).astype(np.float32)
        r = r.astype(np.float16).astype(np.float32)
        e = mg.median_filter(e, cfg.median).astype(np.float16).astype(np.float32)
        t = mg.topk_threshold(e, cfg.count(h, w, share))
        y = np.where((e >= t)[None], r, up).astype(np.float16)
    return y
