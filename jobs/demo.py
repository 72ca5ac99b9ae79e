"""``gigaseg demo``: generate a small mixed archive, write its spec, run it on local Ray, print results.

The archive exercises every input path: a chunked Zarr v3 array (the large one, generated chunk by chunk
with Dask so it never sits in memory), a tiled BigTIFF, a grayscale uint16 TIFF, a PNG with alpha and a
JPEG. Pixels are a deterministic function of global coordinates (so chunking never shows), drawn to
look like land cover: smooth fields, a few "roads" and noise.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import dask.array as da
import numpy as np
import yaml

log = logging.getLogger(__name__)

DEMO_CLASSES = [
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
    """The region classes (0–3, as ``DEMO_CLASSES``) under ``land_cover``'s pixels: ``(h, w)`` uint8."""
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


def _scene_dask(size: tuple[int, int], chunk: int, seed: int) -> da.Array:
    h, w = size
    template = da.zeros((h, w, 3), dtype=np.uint8, chunks=(chunk, chunk, 3))

    def block(_, block_info=None):
        (ya, yb), (xa, xb), _c = block_info[None]["array-location"]
        return land_cover(ya, xa, yb - ya, xb - xa, seed)

    return template.map_blocks(block, dtype=np.uint8)


def make_archive(root: Path, large: int = 8192) -> list[Path]:
    """Write the demo archive under ``root/archive``; returns the image paths."""
    import tifffile
    import zarr
    from PIL import Image

    archive = root / "archive"
    (archive / "tiles").mkdir(parents=True, exist_ok=True)
    paths = []

    big = archive / "large.zarr"
    if not (big / "zarr.json").exists():
        arr = zarr.create_array(store=str(big), shape=(large, large, 3), chunks=(1024, 1024, 3), dtype="uint8",
                                dimension_names=("y", "x", "c"), overwrite=True)
        da.store(_scene_dask((large, large), 1024, seed=1), arr, lock=False)
    paths.append(big)

    tif = archive / "tiles" / "survey.tif"
    if not tif.exists():
        tifffile.imwrite(tif, land_cover(0, 0, 3000, 4096, seed=2), bigtiff=True, tile=(256, 256),
                         photometric="rgb", compression="zlib")
    paths.append(tif)

    gray = archive / "tiles" / "thermal.tif"
    if not gray.exists():
        g = land_cover(0, 0, 2048, 2048, seed=3).mean(-1).astype(np.uint16) * 257
        tifffile.imwrite(gray, g, tile=(256, 256), compression="zlib")
    paths.append(gray)

    png = archive / "overview.png"
    if not png.exists():
        rgba = np.concatenate([land_cover(0, 0, 1536, 2048, seed=4), np.full((1536, 2048, 1), 255, np.uint8)], -1)
        Image.fromarray(rgba, "RGBA").save(png)
    paths.append(png)

    jpg = archive / "aerial.jpg"
    if not jpg.exists():
        Image.fromarray(land_cover(0, 0, 2448, 2448, seed=5)).save(jpg, quality=90)
    paths.append(jpg)
    return paths


def demo_spec(root: Path) -> dict:
    return {
        "inputs": {"url": str(root / "archive")},
        "model": {"name": "fpn_resnet18", "width": 32, "classes": DEMO_CLASSES, "seed": 0},
        "tiling": {"tile": 512, "overlap": 64, "batch": 4, "blend": "gaussian"},
        "output": {"url": str(root / "masks"), "extras": ["confidence"]},
        "resources": {"workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 1, "torch_threads": 1},
        "failure": {"mode": "continue", "tile_retries": 2},
    }


def run_demo(output: str, large: int = 8192) -> int:
    from jobs.cli import EXIT_FAILED, EXIT_OK, print_table
    from jobs.runner import run_spec
    from jobs.spec import parse_spec

    root = Path(output).resolve()
    t0 = time.perf_counter()
    print(f"generating the demo archive under {root / 'archive'} (largest image {large}×{large}) ...")
    make_archive(root, large)
    spec_path = root / "demo-spec.yaml"
    spec_path.write_text(yaml.safe_dump(demo_spec(root), sort_keys=False))
    print(f"archive ready in {time.perf_counter() - t0:.0f} s; spec: {spec_path}")
    spec = parse_spec(yaml.safe_load(spec_path.read_text()), str(spec_path))
    print(f"running on a local Ray cluster: {spec.resources.workers} workers × "
          f"{spec.resources.gpus_per_worker:g} logical GPU, {os.cpu_count()} CPU cores")
    results = run_spec(spec)
    print_table(results)
    print(f"\nmasks:  {spec.output.url}/<name>.zarr/labels/segmentation/0   report: {spec.output.url}/report.json")
    print(f"read:   python -c \"import zarr; m = zarr.open_array('{spec.output.url}/large.zarr/labels/segmentation/0'); print(m.shape, m[:4, :8])\"")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK
