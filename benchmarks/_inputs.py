"""Benchmark inputs: the generated scene, archives of it, the benchmark's job spec, a temp dir per run."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from jobs.spec import parse_spec
from pipeline.synth.land_cover import land_cover
from pipeline.workers.ray_cluster import ray_temp_dir as new_ray_temp_dir

SCENE_SEED = 1


def scene_path(workdir: Path, size: int) -> Path:
    """Where the generated ``size``² scene lives: alone in its own folder, which is the job's input URL."""
    return workdir / "inputs" / f"scene-{size}" / "scene.zarr"


def archive_path(workdir: Path, size: int, images: int) -> Path:
    """An archive of ``images`` copies of the ``size``² scene (``scene_path``), hard-linked (``archive``)."""
    return workdir / "inputs" / f"archive-{size}x{images}"


def archive(scene: Path, folder: Path, images: int) -> Path:
    """``folder`` holding ``scene-000.zarr`` … : ``images`` copies of ``scene`` whose files are hard links
    (no extra disk, and the same bytes to read as ``images`` separate files). Returns ``folder``."""
    for i in range(images):
        dst = folder / f"scene-{i:03d}.zarr"
        if not dst.exists():
            tmp = folder / f".partial-{i:03d}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(scene, tmp, copy_function=os.link)
            tmp.rename(dst)
    return folder


def scene_ready(path: Path, size: int) -> bool:
    try:
        attrs = zarr.open_array(store=str(path), mode="r").attrs.asdict()
    except (FileNotFoundError, ValueError, KeyError):
        return False
    return attrs.get("benchmark_scene") == {"size": size, "seed": SCENE_SEED, "complete": True}


def generate_scene(path: Path, size: int, chunk: int = 1024) -> float:
    """Write the ``size``² RGB land-cover scene as Zarr v3 ``(H, W, 3)`` uint8, chunk by chunk with Dask.

    The image never sits in memory whole; a complete earlier one is reused. Returns the seconds spent.
    """
    if scene_ready(path, size):
        return 0.0
    t0 = time.perf_counter()
    arr = zarr.create_array(store=str(path), shape=(size, size, 3), chunks=(chunk, chunk, 3), dtype="uint8",
                            dimension_names=("y", "x", "c"), overwrite=True)

    def block(_, block_info=None):
        (y0, y1), (x0, x1), _c = block_info[None]["array-location"]
        return land_cover(y0, x0, y1 - y0, x1 - x0, SCENE_SEED)

    template = da.zeros((size, size, 3), dtype=np.uint8, chunks=(chunk, chunk, 3))
    da.store(template.map_blocks(block, dtype=np.uint8), arr, lock=False)
    arr.attrs["benchmark_scene"] = {"size": size, "seed": SCENE_SEED, "complete": True}
    return time.perf_counter() - t0


def job_spec(inputs: Path, output: Path, *, width: int, precision: str, classes: int, tile: int, overlap: int,
             batch: int, workers: int, threads: int, chunk: int = 1024, failure: str = "fail_fast"):
    """The benchmark's job: seeded ``fpn_resnet18``, ``workers`` actors × 1 logical GPU × ``threads``.

    ``failure`` is the spec's ``failure.mode``: ``fail_fast`` (a benchmark stops at once when something is
    wrong) runs images one at a time; ``continue`` (the users' default) overlaps neighbouring images."""
    return parse_spec({
        "inputs": {"url": str(inputs)},
        "model": {"name": "fpn_resnet18", "width": width, "classes": [{"name": f"class{i}"} for i in range(classes)],
                  "seed": 0, "precision": precision},
        "tiling": {"tile": tile, "overlap": overlap, "batch": batch, "chunk": chunk},
        "output": {"url": str(output), "if_exists": "overwrite"},
        "resources": {"workers": workers, "gpus_per_worker": 1, "cpus_per_worker": threads, "torch_threads": threads},
        "cluster": {"local_gpus": workers},
        "failure": {"mode": failure, "tile_retries": 0},
    }, "benchmark spec")


@contextlib.contextmanager
def ray_temp_dir():
    """Give the run (and so the pipeline's Ray session dir) a temp dir of its own, removed afterwards
    (``pipeline.workers.ray_cluster.ray_temp_dir``: short enough for Ray's socket paths)."""
    tmp = Path(new_ray_temp_dir("gsb-"))
    before, tempfile.tempdir = tempfile.tempdir, str(tmp)
    try:
        yield tmp
    finally:
        tempfile.tempdir = before
        shutil.rmtree(tmp, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
