"""Tiny seeded archives generated in code for the integration tests (never the DeepGlobe sample)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.synth.land_cover import land_cover


def write_archive(root: Path, *, corrupt: bool = False) -> dict[str, Path]:
    """A Zarr v3 array, a tiled BigTIFF, a PNG and a JPEG (plus a corrupt PNG when asked)."""
    import tifffile
    import zarr
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    arr = zarr.create_array(store=str(root / "scene.zarr"), shape=(520, 610, 3), chunks=(256, 256, 3), dtype="uint8")
    arr[:] = land_cover(0, 0, 520, 610, seed=11)
    paths["scene"] = root / "scene.zarr"
    (root / "sub").mkdir(exist_ok=True)
    tifffile.imwrite(root / "sub" / "survey.tif", land_cover(0, 0, 300, 420, seed=12), bigtiff=True, tile=(128, 128))
    paths["sub__survey"] = root / "sub" / "survey.tif"
    Image.fromarray(land_cover(0, 0, 200, 260, seed=13)).save(root / "small.png")
    paths["small"] = root / "small.png"
    Image.fromarray(land_cover(0, 0, 230, 190, seed=14)).save(root / "photo.jpg", quality=95)
    paths["photo"] = root / "photo.jpg"
    if corrupt:
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(500))
        paths["broken"] = root / "broken.png"
    return paths


def spec_dict(inputs: str, output: str, **overrides) -> dict:
    spec = {
        "inputs": {"url": inputs},
        "model": {"name": "fpn_resnet18", "width": 8, "classes": [{"name": n} for n in ("a", "b", "c")], "seed": 3,
                  "precision": "fp32"},
        "tiling": {"tile": 128, "overlap": 32, "margin": 0, "batch": 4, "chunk": 256},
        "output": {"url": output},
        "resources": {"workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 0.5, "torch_threads": 1},
    }
    return patched(spec, **overrides)


def patched(spec: dict, **overrides) -> dict:
    """A deep copy of ``spec`` with ``section__key=value`` overrides applied."""
    import copy

    spec = copy.deepcopy(spec)
    for path, value in overrides.items():
        node = spec
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return spec
