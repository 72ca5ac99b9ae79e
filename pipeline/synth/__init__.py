"""A seeded, deterministic synthetic land-cover archive that has both failure modes of a resize-only model.

Images of any size (2448² like DeepGlobe, 32768² and beyond) with integer ground truth and a class table,
generated chunk by chunk: every pixel is a pure function of ``(seed, y, x)`` (``pipeline.synth_hash``), so
any chunking, window or order gives the same bytes, and memory stays flat (``synth_dask``; about 2 MP/s per
core). Geometry lives in ``pipeline.synth_scene``, writing in ``pipeline.synth_write``.

Classes (``CLASSES``, ids in order): 0 bare, 1 forest, 2 field-open, 3 field-hedged, 4 hedge, 5 road,
6 building.

**Context failure, by construction.** ``field-open`` and ``field-hedged`` (``CONTEXT_PAIR``) are painted by
one function of the region's look (a crop tint, stripes of a hashed angle/period/phase, three octaves of value
noise, pixel noise) whose parameters are hashed from the region's cell on a stream independent of its class,
so the two classes have the same colour and texture distribution in any window that does not reach a region
boundary. They differ only in their rim, ``rim_width`` px inside their own boundary: a hedge (class 4) around
a ``field-hedged`` region, a bare verge (class 0) around a ``field-open`` one. Every field region has its own
rim, so walking out of any field pixel the first thing that is neither field nor road is its own region's
rim: the class is decidable from region-scale context, never from local appearance. Regions are Voronoi
cells of a ``region_size`` grid (2048 px by default): 57 % of field pixels are over 256 px and 27 % over
500 px from any boundary, so a 512 px (resp. 1,000 px) window centred there shows field only.

**Detail failure, by construction.** Roads (class 5) are straight segments ``road_width`` = 2–6 px wide on a
jittered ``road_spacing`` lattice; buildings (class 6) are 8–20 px squares in bare regions. Downsampling a
2448² image to 512² (÷4.8, area mean) makes a road 0.4–1.3 px wide, blended with its surroundings: labelling
pixels by their nearest class colour finds roads with IoU 1.0 at full resolution and 0.32 after the 512²
round trip, and even a perfect 512² label map (area majority, upsampled) reaches only 0.55 on roads against
≥ 0.97 on the regions (seed 11; tests/pipeline/test_synth.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import dask.array as da
import numpy as np
from dask.base import tokenize

from pipeline.synth.hash import hash_u64, pixel_noise, value_noise
from pipeline.synth.scene import BARE, BUILDING, FIELD_HEDGED, FIELD_OPEN, FOREST, HEDGE, ROAD, S_LOOK, Scene, scene

Color = tuple[int, int, int]

CLASSES: tuple[tuple[str, Color], ...] = (
    ("bare", (210, 180, 140)),
    ("forest", (0, 130, 0)),
    ("field-open", (255, 255, 0)),
    ("field-hedged", (255, 150, 0)),
    ("hedge", (110, 60, 0)),
    ("road", (255, 0, 255)),
    ("building", (255, 0, 0)),
)
"""``(name, mask colour)`` per class id; the colours draw masks, the image colours are ``_BASE``."""
CONTEXT_PAIR = (FIELD_OPEN, FIELD_HEDGED)
"""Locally indistinguishable; told apart only by the rim of their region (hedge vs bare verge)."""
DETAIL_CLASSES = (ROAD, BUILDING)
"""2–6 px roads and 8–20 px buildings: gone after a whole-image downsample to a network's input size."""


_INTS = ("height", "width", "seed", "chunk", "region_size", "rim_width", "road_spacing")


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_fraction(v) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool) and 0 <= v <= 1


def _is_range(v) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and all(map(_is_int, v)) and 1 <= v[0] <= v[1]


@dataclass(frozen=True)
class SynthConfig:
    """One synthetic image: its size, seed and scene parameters (lengths in px). ``chunk`` only sets how it
    is computed and stored (dask/Zarr chunks); the pixels do not depend on it."""

    height: int = 2448
    width: int = 2448
    seed: int = 0
    chunk: int = 512
    region_size: int = 2048
    rim_width: int = 16
    road_spacing: int = 768
    road_density: float = 0.6
    road_width: tuple[int, int] = (2, 6)
    building_size: tuple[int, int] = (8, 20)
    building_density: float = 0.35

    def __post_init__(self) -> None:
        for name in ("road_width", "building_size"):
            if isinstance(getattr(self, name), list):  # read back from JSON
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = [f"{n}={getattr(self, n)!r} must be an integer" for n in _INTS if not _is_int(getattr(self, n))]
        problems += [f"{n}={getattr(self, n)!r} must be a (min, max) pair of integers with 1 ≤ min ≤ max"
                     for n in ("road_width", "building_size") if not _is_range(getattr(self, n))]
        problems += [f"{n}={getattr(self, n)!r} must be a number in 0 … 1"
                     for n in ("road_density", "building_density") if not _is_fraction(getattr(self, n))]
        if problems:
            raise ValueError("SynthConfig: " + "; ".join(problems))
        r = self.region_size
        rules = [
            (self.height >= 1 and self.width >= 1, f"size {self.height}×{self.width} must be at least 1×1 px"),
            (0 <= self.seed < 2**63, f"seed={self.seed} must be in 0 … 2⁶³−1"),
            (16 <= self.chunk <= 16384, f"chunk={self.chunk} must be in 16 … 16384 px (512 is a good default)"),
            (r >= 256, f"region_size={r} must be ≥ 256 px: regions are meant to outgrow a local window"),
            (1 <= self.rim_width <= r // 16,
             f"rim_width={self.rim_width} must be in 1 … region_size/16 = {r // 16} px"),
            (self.road_spacing >= 64, f"road_spacing={self.road_spacing} must be ≥ 64 px"),
            (self.road_width[1] <= self.road_spacing // 8,
             f"road_width max {self.road_width[1]} must be ≤ road_spacing/8 = {self.road_spacing // 8} px"),
            (self.building_size[1] <= min(64, r // 8 - 4),
             f"building_size max {self.building_size[1]} must be ≤ min(64, region_size/8 − 4) px"),
        ]  # fmt: skip
        problems = [text for ok, text in rules if not ok]
        if problems:
            raise ValueError("SynthConfig: " + "; ".join(problems))

    @property
    def building_cell(self) -> int:
        """Side of the grid cell holding at most one building (its square stays 2 px inside it)."""
        return self.building_size[1] + 12

    def with_seed(self, seed: int) -> SynthConfig:
        return replace(self, seed=seed)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _check_window(cfg: SynthConfig, y0: int, x0: int, h: int, w: int) -> None:
    if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > cfg.height or x0 + w > cfg.width:
        raise ValueError(
            f"window y {y0}…{y0 + h}, x {x0}…{x0 + w} is empty or outside the {cfg.height}×{cfg.width} image; "
            "ask for a window inside it."
        )


def label_block(cfg: SynthConfig, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Class ids of the window ``[y0, y0+h) × [x0, x0+w)``: ``(h, w)`` uint8."""
    _check_window(cfg, y0, x0, h, w)
    return scene(cfg, np.arange(y0, y0 + h)[:, None], np.arange(x0, x0 + w)[None, :]).labels


def labels_at(cfg: SynthConfig, ys, xs) -> np.ndarray:
    """Class ids at integer points ``(ys, xs)`` (broadcast together), equal to ``label_block``'s there."""
    ys, xs = np.asarray(ys, np.int64), np.asarray(xs, np.int64)
    if ys.size and (ys.min() < 0 or xs.min() < 0 or ys.max() >= cfg.height or xs.max() >= cfg.width):
        raise ValueError(f"points outside the {cfg.height}×{cfg.width} image; clip them to it first.")
    return scene(cfg, ys, xs).labels


def image_block(cfg: SynthConfig, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """RGB of the window ``[y0, y0+h) × [x0, x0+w)``: ``(3, h, w)`` uint8."""
    return image_and_labels(cfg, y0, x0, h, w)[0]


def image_and_labels(cfg: SynthConfig, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image (3, h, w) uint8, labels (h, w) uint8)`` of one window, the geometry computed once."""
    _check_window(cfg, y0, x0, h, w)
    sc = scene(cfg, np.arange(y0, y0 + h)[:, None], np.arange(x0, x0 + w)[None, :])
    return _paint(cfg, sc, y0, x0, h, w), sc.labels


# ---------------------------------------------------------------- painting

# per class: mean RGB (fields and buildings take theirs per region / per building) and the amplitudes of
# fine (6 px), medium (24 px) and coarse (96 px) value noise and of per-pixel noise, added to luminance
_BASE = np.array([(156, 128, 98), (44, 88, 42), (0, 0, 0), (0, 0, 0), (72, 82, 36), (152, 150, 146), (0, 0, 0)],
                 np.float32)
_AMPLITUDE = np.array([(10, 18, 14, 16), (44, 20, 12, 14), (6, 10, 16, 12), (6, 10, 16, 12), (40, 10, 0, 16),
                       (4, 4, 6, 10), (0, 0, 0, 10)], np.float32)
assert (_AMPLITUDE[FIELD_OPEN] == _AMPLITUDE[FIELD_HEDGED]).all()  # the context pair looks alike
_FIELD_TINTS = np.array([(182, 170, 96), (148, 168, 82), (196, 166, 112), (126, 150, 72)], np.float32)
_ROOFS = np.array([(188, 92, 72), (206, 206, 200), (128, 120, 118), (172, 124, 92)], np.float32)
_STRIPE = 26.0
_ANGLES = np.array([(math.cos(k * math.pi / 8), math.sin(k * math.pi / 8)) for k in range(8)])
_LUMA = np.array([1.0, 1.0, 0.8], np.float32)
_N_FINE, _N_MEDIUM, _N_COARSE, _N_PIXEL, _N_ROOF = 101, 102, 103, 104, 105  # apart from synth_scene's streams


def _field_looks(cfg: SynthConfig, sc: Scene) -> dict[str, np.ndarray]:
    """Per region cell: tint (K, 3), stripe direction (K, 2), period (K,), phase (K,), all class-blind."""
    h = hash_u64(cfg.seed, S_LOOK, sc.cells.gy, sc.cells.gx)

    def field(shift: int, n: int) -> np.ndarray:  # bits shift … shift + log2(n) − 1 of h, as 0 … n − 1
        return ((h >> np.uint64(shift)) & np.uint64(n - 1)).astype(np.int64)

    jitter = np.stack([field(2 + 5 * c, 32) - 16 for c in range(3)], -1).astype(np.float32) / 2
    return {"tint": _FIELD_TINTS[field(0, 4)] + jitter, "direction": _ANGLES[field(17, 8)],
            "period": 6 + field(20, 16) % 9, "phase": field(24, 65536) / 65536.0}


def _paint(cfg: SynthConfig, sc: Scene, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    labels = sc.labels
    seed = cfg.seed
    noise = (value_noise(seed, _N_FINE, y0, x0, h, w, 6), value_noise(seed, _N_MEDIUM, y0, x0, h, w, 24),
             value_noise(seed, _N_COARSE, y0, x0, h, w, 96), pixel_noise(seed, _N_PIXEL, y0, x0, h, w))
    amp = _AMPLITUDE[labels]
    luma = sum(amp[..., k] * n for k, n in enumerate(noise))
    rgb = _BASE[labels]
    fy, fx = np.nonzero((labels == FIELD_OPEN) | (labels == FIELD_HEDGED))
    if fy.size:
        look = _field_looks(cfg, sc)
        region = sc.region[fy, fx]
        rgb[fy, fx] = look["tint"][region]
        d = look["direction"][region]
        t = ((x0 + fx) * d[:, 0] + (y0 + fy) * d[:, 1]) / look["period"][region] + look["phase"][region]
        luma[fy, fx] += _STRIPE * (np.abs(2 * (t - np.floor(t)) - 1) - 0.5).astype(np.float32)
    by, bx = np.nonzero(sc.building)
    if by.size:
        cell = cfg.building_cell
        roof = hash_u64(seed, _N_ROOF, (y0 + by) // cell, (x0 + bx) // cell) % np.uint64(len(_ROOFS))
        rgb[by, bx] = _ROOFS[roof.astype(np.int64)]
    out = rgb + luma[..., None] * _LUMA
    return np.clip(out + 0.5, 0, 255).astype(np.uint8).transpose(2, 0, 1)


# ---------------------------------------------------------------- dask


def synth_dask(cfg: SynthConfig) -> tuple[da.Array, da.Array]:
    """Lazy ``(image (3, H, W) uint8, labels (H, W) uint8)`` in ``cfg.chunk`` chunks; a chunk is computed
    only when read, from its window alone (memory stays flat whatever the size). Image and labels share one
    task per chunk: store them together (``da.store([image, labels], …)``) to compute each chunk once."""

    def block(block_info=None):
        (_, _), (ya, yb), (xa, xb) = block_info[None]["array-location"]
        image, labels = image_and_labels(cfg, ya, xa, yb - ya, xb - xa)
        return np.concatenate([image, labels[None]])

    chunks = ((4,), *da.core.normalize_chunks((cfg.chunk, cfg.chunk), (cfg.height, cfg.width)))
    both = da.map_blocks(block, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8),
                         name=f"gigaseg-synth-{tokenize(cfg.to_json())}")
    return both[:3], both[3]


__all__ = ["BARE", "BUILDING", "CLASSES", "CONTEXT_PAIR", "FIELD_HEDGED", "FIELD_OPEN", "FOREST", "HEDGE", "ROAD",
           "DETAIL_CLASSES", "SynthConfig", "image_and_labels", "image_block", "label_block", "labels_at", "synth_dask"]
