"""How many GPUs one driver can keep busy: a null-model run through Ray and Zarr.

The workers are the pipeline's own ``TileWorker`` actors (real Zarr reads of each tile window, real writes of
each tile's probabilities to its chunk of the tile store, dispatched by ``WorkerPool.run`` with its bounded
in-flight queue) whose model costs nothing: it returns constant probabilities. The same reads and writes in
one plain process, no Ray, are the reference.

What limits a driver is its own CPU per tile: it sends batch descriptions and receives small results; pixels
never pass through it. So the figure that scales is the driver's CPU-seconds per tile (``time.process_time``
of the driver process, all its threads, Ray's core-worker threads included), and

    GPUs one driver keeps busy = GPU-seconds per tile of the model ÷ driver CPU-seconds per tile

with the GPU time per tile an assumption (stated in the table: no GPU on the machines these ran on). The
blend is not in it: on a cluster it runs on the Dask scheduler's workers, not in the driver.

The GPU time per tile is the default model's FLOPs per tile (counted here with torch's FlopCounterMode) at
an assumed effective rate (``--gpu-tflops``, 75 by default: bf16 eager PyTorch convolutions on an H100-class
GPU reach roughly that, well below the tensor cores' peak).

    python -m benchmarks.dispatch_scale [--size 8192] [--tile 512] [--per-call 8 64 256] [--gpu-tflops 75]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._inputs import generate_scene, ray_temp_dir, scene_path
from benchmarks._results import append_results, machine, markdown_table
from pipeline.workers.worker import TileWorker


class NullPredictor:
    """A model that costs nothing: constant probabilities of the right shape and dtype."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.device = "null"

    def __call__(self, stage: int, tiles: np.ndarray, inputs) -> np.ndarray:
        b, _, t, _ = tiles.shape
        return np.full((b, self.num_classes, t, t), 1.0 / self.num_classes, np.float16)


class NullWorker(TileWorker):
    """``TileWorker`` with its reads, writes and bookkeeping, and the null model."""

    def __init__(self, framework, storage_options, device=None, audit_dir=None):
        import os
        import threading

        self.model = NullPredictor(4)
        self._model_lock = threading.Lock()
        self._arrays_lock = threading.Lock()
        self.audit_dir = None
        self.name = f"null-worker-{os.getpid()}"
        self._arrays = {}


class NoIOWorker(NullWorker):
    """Answers a call at once, without reading or writing: what is left is Ray and the driver's loop."""

    def run(self, batch):
        from pipeline.workers.worker import BatchResult

        return BatchResult(tiles=batch.tiles, seconds=0.0, model_seconds=0.0, megapixels=0.0, worker=self.name)


def driver_ceiling(stage, per_call: int, workers: int, calls: int) -> dict:
    """Calls per second and driver CPU per call when workers answer at once (the driver is the bottleneck)."""
    from pipeline.plan import PoolPlan
    from pipeline.workers.dispatch import WorkerPool, batches

    pool = WorkerPool(None, {}, PoolPlan(workers=workers, gpus_per_worker=1, cpus_per_worker=0.5,
                                         in_flight_per_worker=8), worker_cls=NoIOWorker)
    try:
        pool.info(timeout=120)
        tiles = (stage.grid.indices() * (per_call * calls // len(stage.grid) + 1))[: per_call * calls]
        todo = batches(stage, tiles, 8, per_call)
        t0, c0 = time.perf_counter(), time.process_time()
        pool.run(todo, retries=0, on_result=lambda r: None)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"calls_per_s": len(todo) / seconds, "cpu_ms_per_call": 1000 * cpu / len(todo),
                "cpu_share": cpu / seconds}
    finally:
        pool.shutdown()


def plan(scene: Path, work: Path, tile: int, overlap: int, classes: int):
    import zarr

    from pipeline.frameworks.base import StagePlan
    from pipeline.output.arrays import create_tile_store
    from pipeline.plan import ArrayRef
    from pipeline.tiling import TileGrid

    arr = zarr.open_array(store=str(scene), mode="r")
    h, w = arr.shape[:2]
    grid = TileGrid(h, w, tile, overlap, margin=64)
    tiles_url = str(work / "tiles")
    create_tile_store(tiles_url, {}, (grid.ny, grid.nx, classes, tile, tile))
    return StagePlan(index=0, image=ArrayRef(str(scene), "", "yxc", (h, w)), grid=grid, tiles_url=tiles_url,
                     maps_url=str(work / "maps"), num_classes=classes)


def model_gflop(tile: int) -> float:
    """GFLOP of the default model (fpn_resnet18, width 64, 7 classes) on one ``tile``² tile."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import ModelConfig, build_model

    model = build_model(ModelConfig(name="fpn_resnet18", num_classes=7)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, tile, tile))
    return counter.get_total_flops() / 1e9


def plain_process(stage, batch: int, per_call: int) -> dict:
    """The same reads and writes in one process, no Ray: tiles/s."""
    worker = NullWorker(None, {})
    from pipeline.workers.dispatch import batches

    calls = batches(stage, stage.grid.indices(), batch, per_call)
    t0, c0 = time.perf_counter(), time.process_time()
    for call in calls:
        worker.run(call)
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "tiles": len(stage.grid)}


def through_ray(stage, batch: int, per_call: int, workers: int) -> dict:
    from pipeline.plan import PoolPlan
    from pipeline.workers.dispatch import WorkerPool, batches

    pool = WorkerPool(None, {}, PoolPlan(workers=workers, gpus_per_worker=1, cpus_per_worker=0.5,
                                         in_flight_per_worker=2), worker_cls=NullWorker)
    try:
        pool.info(timeout=120)  # actors up before the clock starts
        calls = batches(stage, stage.grid.indices(), batch, per_call)
        done = []
        t0, c0 = time.perf_counter(), time.process_time()
        outcome = pool.run(calls, retries=0, on_result=done.append)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert not outcome.failed, outcome.error
        return {"seconds": seconds, "cpu": cpu, "tiles": sum(len(r.tiles) for r in done), "calls": len(calls)}
    finally:
        pool.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--per-call", type=int, nargs="+", default=[8, 64, 256], help="tiles per worker call")
    p.add_argument("--ceiling-calls", type=int, default=2000, help="calls of the driver-ceiling run")
    p.add_argument("--batch", type=int, default=8, help="tiles per model batch inside a call")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpu-tflops", type=float, default=75.0,
                   help="assumed effective TFLOP/s of one GPU on the default model (bf16)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gigaseg-bench")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    import ray

    m = machine()
    gflop = model_gflop(args.tile)
    gpu_ms = gflop / args.gpu_tflops  # GFLOP / (TFLOP/s) = ms
    scene = scene_path(args.workdir, args.size)
    generate_scene(scene, args.size, chunk=512)
    rows = []
    with ray_temp_dir() as tmp:
        ray.init(address="local", num_cpus=2, num_gpus=args.workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, _temp_dir=str(tmp))
        try:
            for per_call in args.per_call:
                work = Path(tempfile.mkdtemp(prefix="gsd-"))
                try:
                    stage = plan(scene, work, args.tile, args.overlap, 4)
                    plain = plain_process(stage, args.batch, per_call)
                    shutil.rmtree(work / "tiles")
                    stage = plan(scene, work, args.tile, args.overlap, 4)
                    rayed = through_ray(stage, args.batch, per_call, args.workers)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                n = rayed["tiles"]
                driver_ms = 1000 * rayed["cpu"] / n
                rows.append([per_call, n, rayed["calls"], f"{plain['tiles'] / plain['seconds']:.1f}",
                             f"{n / rayed['seconds']:.1f}",
                             f"{(n / rayed['seconds']) / (plain['tiles'] / plain['seconds']):.2f}",
                             f"{1000 * driver_ms:.0f}"])
                print(rows[-1], flush=True)
            ceiling_rows = []
            work = Path(tempfile.mkdtemp(prefix="gsd-"))
            try:
                stage = plan(scene, work, args.tile, args.overlap, 4)
                for per_call in args.per_call:
                    c = driver_ceiling(stage, per_call, args.workers, args.ceiling_calls)
                    core_calls = 1000 / c["cpu_ms_per_call"]  # calls/s of one driver core
                    tiles_per_s = core_calls * per_call
                    ceiling_rows.append([per_call, args.ceiling_calls, f"{c['calls_per_s']:.0f}",
                                         f"{c['cpu_share']:.2f}", f"{c['cpu_ms_per_call']:.2f}", f"{core_calls:.0f}",
                                         f"{tiles_per_s:.0f}", f"{tiles_per_s * gpu_ms / 1000:.0f}"])
                    print(ceiling_rows[-1], flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            ray.shutdown()
    table = markdown_table(
        ["tiles per call", "tiles", "calls", "plain process tiles/s", f"Ray + Zarr tiles/s ({args.workers} null workers)",
         "Ray ÷ plain", "driver CPU µs / tile (whole run)"], rows)
    ceiling = markdown_table(
        ["tiles per call", "calls", "calls/s measured", "driver CPU share", "driver CPU ms / call",
         "calls/s one driver core sustains", "tiles/s one driver dispatches", f"GPUs kept busy at {gpu_ms:.2f} GPU-ms/tile"],
        ceiling_rows)
    table = (f"{table}\n\nThe driver's ceiling: workers answer each call at once (no I/O), so what is left is Ray and "
             f"the dispatch loop; one driver core sustains 1000 ÷ (driver CPU ms per call) calls/s:\n\n{ceiling}")
    print(table)
    if not args.no_record:
        body = (f"{args.size}² Zarr scene (512² chunks), tile {args.tile}, overlap {args.overlap}, model batch "
                f"{args.batch} inside each call; null model (constant probabilities) in the pipeline's TileWorker; "
                f"both runs read every tile window and write every tile's float16 probabilities to its own chunk, "
                f"locally. GPU time per tile assumed: fpn_resnet18 (width 64) is {gflop:.1f} GFLOP per {args.tile}² "
                f"tile (counted), at an assumed {args.gpu_tflops:g} effective TFLOP/s (bf16, H100-class; no GPU "
                f"here to measure it) → {gpu_ms:.2f} ms. Driver CPU counts every thread of the driver process "
                f"(Ray's included) over the whole run, so it is an upper bound: part of it is per second, not per "
                f"call. GPUs per driver = tiles/s one driver core dispatches × GPU s per tile. Target: ≥ 100.\n\n{table}\n")
        append_results("Dispatch scale (null model)", body, m)


if __name__ == "__main__":
    main()
