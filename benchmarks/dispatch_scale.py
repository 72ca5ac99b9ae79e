"""How many GPUs one driver can keep busy: the driver's CPU per call, with workers that answer at once.

A driver sends each worker call (one block: ``pipeline.blocks``) as a small description (the block, its tile
indices, the sink's array references) and receives a small result; pixels never pass through it. What limits it
is its own CPU per call, so the workers here are Ray actors that answer every ``BlockTask`` at once without
reading, running or writing anything (``InstantWorker``), and ``WorkerPool.run`` (the pipeline's dispatcher, its
bounded in-flight queue and result handling) drives them. The calls are the engine's own: the blocks and tiles
of a ``--size``² level at each ``tiles_per_call`` (``TilingPlan.block_side``), and the default block side.

    GPUs one driver keeps busy = tiles/s one driver core dispatches × GPU-seconds per tile

GPU time per tile is the default model's FLOPs per tile (counted with torch's FlopCounterMode) at an assumed
effective rate (``--gpu-tflops``, 200 by default: bf16 convolutions on an H200-class GPU). What the driver does per
image besides dispatching (markers, the label pyramid) is in ``benchmarks.feed_rate``'s driver column.

    python -m benchmarks.dispatch_scale [--size 32768] [--tiles-per-call 16 64 256] [--gpu-tflops 200]
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks._inputs import ray_temp_dir
from benchmarks._results import append_results, machine, markdown_table
from pipeline.workers.worker import BlockResult


class InstantWorker:
    """A worker actor that answers a ``BlockTask`` at once: what is left is Ray and the driver's dispatch loop."""

    def __init__(self, framework, storage_options, device=None, audit_dir=None) -> None:
        self.name = f"instant-{os.getpid()}"

    def info(self) -> dict:
        return {"worker": self.name, "device": "none", "gpu_ids": [], "node": None}

    def run(self, task) -> BlockResult:
        return BlockResult(task.stage.index, task.block.index, len(task.tiles), task.owned, 0.0, 0.0, 0.0, self.name)


def calls_for(size: int, tiling, classes: int):
    """The engine's calls for one ``size``² level (virtual: nothing is read)."""
    from pipeline.blocks import block_tiles, owned_counts, plan_blocks
    from pipeline.frameworks.base import StagePlan
    from pipeline.plan import ArrayRef
    from pipeline.tiling import TileGrid
    from pipeline.workers.dispatch import Call
    from pipeline.workers.sinks import OutputSink
    from pipeline.workers.worker import BlockTask

    grid = TileGrid(size, size, tiling.tile, tiling.overlap, margin=tiling.margin)
    out = "s3://bucket/out/scene.zarr"
    stage = StagePlan(0, ArrayRef("s3://bucket/in/scene.zarr", "", "yxc", (size, size)), grid, f"{out}/maps", classes)
    sink = OutputSink(ArrayRef(out, "labels/0", "yx", (size, size)), "uint8",
                      ArrayRef(out, "confidence", "yx", (size, size)))
    side = tiling.block_side(classes)
    owned = owned_counts(grid, side, tiling.chunk)
    return [Call(BlockTask(stage, b, tuple(block_tiles(grid, b)), sink, owned.get(b.index, 0), tiling.batch,
                           tiling.blend, tiling.sigma_scale, tiling.chunk), ("scene", 0))
            for b in plan_blocks(size, size, tiling.chunk, side)], len(grid), side


def driver_ceiling(calls, workers: int, repeat: int) -> dict:
    """Calls/s and the driver's CPU per call when the workers answer at once."""
    from pipeline.plan import PoolPlan
    from pipeline.workers.dispatch import CallList, WorkerPool

    pool = WorkerPool(None, {}, PoolPlan(workers=workers, gpus_per_worker=1, cpus_per_worker=0.5,
                                         in_flight_per_worker=2), worker_cls=InstantWorker)
    try:
        pool.info(timeout=120)  # actors up before the clock starts
        todo = calls * repeat
        answered = []
        t0, c0 = time.perf_counter(), time.process_time()
        pool.run(CallList(todo), retries=0, on_result=lambda call, result: answered.append(result.tiles_run),
                 on_failure=lambda call, error: (_ for _ in ()).throw(RuntimeError(error)))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"calls": len(todo), "tiles": sum(answered), "seconds": seconds, "cpu": cpu}
    finally:
        pool.shutdown()


def model_gflop(tile: int) -> float:
    """GFLOP of the default model (fpn_resnet18, width 64, 7 classes) on one ``tile``² tile."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import ModelConfig, build_model

    model = build_model(ModelConfig(name="fpn_resnet18", num_classes=7)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, tile, tile))
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32768, help="side of the (virtual) level the calls cover")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--tiles-per-call", type=int, nargs="+", default=[16, 64, 256],
                   help="block sizes to measure besides the default")
    p.add_argument("--min-calls", type=int, default=2000, help="calls per measurement (the level's, repeated)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpu-tflops", type=float, default=200.0,
                   help="assumed effective TFLOP/s of one GPU on the default model (bf16)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    import ray

    from pipeline.plan import TilingPlan

    m = machine()
    gflop = model_gflop(args.tile)
    gpu_ms = gflop / args.gpu_tflops  # GFLOP / (TFLOP/s) = ms
    rows = []
    with ray_temp_dir() as tmp:
        ray.init(address="local", num_cpus=2, num_gpus=args.workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, _temp_dir=str(tmp))
        try:
            for per_call in [*args.tiles_per_call, None]:
                tiling = TilingPlan(tile=args.tile, overlap=args.overlap, tiles_per_call=per_call)
                calls, n_tiles, side = calls_for(args.size, tiling, args.classes)
                repeat = max(1, -(-args.min_calls // len(calls)))
                r = driver_ceiling(calls, args.workers, repeat)
                ms_call = 1000 * r["cpu"] / r["calls"]
                tiles_per_call = r["tiles"] / r["calls"]
                tiles_per_core_s = 1000 / ms_call * tiles_per_call
                rows.append([f"{per_call}" if per_call else "default", f"{side[0]}×{side[1]}", f"{len(calls)}",
                             f"{tiles_per_call:.0f}", f"{r['calls']}", f"{r['calls'] / r['seconds']:.0f}",
                             f"{ms_call:.2f}", f"{tiles_per_core_s:.0f}",
                             f"**{tiles_per_core_s * gpu_ms / 1000:.0f}**"])
                print(rows[-1], flush=True)
        finally:
            ray.shutdown()
    table = markdown_table(
        ["tiles_per_call", "block side", f"blocks in {args.size}²", "tiles per call (edges included)", "calls timed",
         "calls/s", "driver CPU ms / call", "tiles/s one driver core dispatches",
         f"GPUs kept busy at {gpu_ms:.2f} GPU-ms/tile"], rows)
    print(table)
    if not args.no_record:
        body = (f"The engine's calls for a virtual {args.size}² level: tile {args.tile}, overlap {args.overlap}, "
                f"{args.classes} classes, an `OutputSink` with confidence; {args.workers} `InstantWorker` actors "
                f"answer each call at once; `WorkerPool.run` dispatches. Driver CPU = `time.process_time` of the "
                f"driver process (all its threads, Ray's core worker included) ÷ calls. GPU time per tile assumed: "
                f"fpn_resnet18 (width 64) is {gflop:.1f} GFLOP per {args.tile}² tile (counted), at an assumed "
                f"{args.gpu_tflops:g} effective TFLOP/s (no GPU here to measure it) → {gpu_ms:.2f} ms.\n\n{table}\n")
        append_results("Dispatch scale (driver ceiling)", body, m)


if __name__ == "__main__":
    main()
