"""A simple endless test scene: four smooth land-cover regions and straight roads, any window of it generated
from its coordinates alone (``land_cover``), with the region classes under it (``land_cover_labels``).

Older and simpler than the synthetic archive of ``pipeline.synth`` (no context classes, no thin structures):
the tests and benchmarks use it as an input whose content does not matter beyond being image-like.
"""

from __future__ import annotations

import numpy as np

LAND_COVER_CLASSES = [
    {"name": "background", "color": [0, 0, 0]},
    {"name": "field", "color": [255, 255, 0]},
    {"name": "forest", "color": [0, 160, 0]},
    {"name": "water", "color": [0, 90, 255]},
]


def _hash_noise(yy: np.ndarray, xx: np.ndarray, seed: int) -> np.ndarray:
    """Per-pixel noise in [0, 1) from integer coordinates (no RNG state: chunking cannot show)."""
    h = (yy.astype(np.uint64) * np.uint64(73856093)) ^ (xx.astype(np.uint64) * np.uint64(19349663))
    h ^= np.uint64(seed * 83492791 + 1)
    h = (h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (h & np.uint64(0xFFFF)).astype(np.float32) / 65536.0


def _regions(yy: np.ndarray, xx: np.ndarray, seed: int) -> np.ndarray:
    """Region class 0–3 of each pixel: thresholds of a sum of four seeded plane waves."""
    fy, fx = yy.astype(np.float32), xx.astype(np.float32)
    rng = np.random.default_rng(seed)
    field = np.zeros(yy.shape, np.float32)
    for _ in range(4):
        ky, kx = rng.uniform(0.0008, 0.006, 2)
        ph = rng.uniform(0, 2 * np.pi)
        field += np.sin(ky * fy + kx * fx + ph)
    return np.digitize(field, [-1.2, 0.0, 1.3])


def land_cover_labels(y0: int, x0: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """The region classes (0–3, as ``LAND_COVER_CLASSES``) under ``land_cover``'s pixels: ``(h, w)`` uint8."""
    yy, xx = np.meshgrid(np.arange(y0, y0 + h), np.arange(x0, x0 + w), indexing="ij")
    return _regions(yy, xx, seed).astype(np.uint8)


def land_cover(y0: int, x0: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)`` of the window at ``(y0, x0)`` of an endless synthetic scene."""
    yy, xx = np.meshgrid(np.arange(y0, y0 + h), np.arange(x0, x0 + w), indexing="ij")
    fy, fx = yy.astype(np.float32), xx.astype(np.float32)
    cls = _regions(yy, xx, seed)
    palette = np.array([[120, 110, 90], [200, 190, 80], [40, 110, 40], [30, 60, 140]], np.float32)
    rgb = palette[cls]
    road = (np.abs(((fx + 0.3 * fy) % 1500) - 750) < 3) | (np.abs((fy % 2100) - 1000) < 2)
    rgb[road] = (170, 170, 170)
    rgb += (_hash_noise(yy, xx, seed)[..., None] - 0.5) * 40
    return np.clip(rgb, 0, 255).astype(np.uint8)
