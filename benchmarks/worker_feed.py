"""The block worker alone, without Ray: output MP/s, its process's CPU per output MP, and the device's busy share.

This is exactly the code a Ray actor wraps (``pipeline.workers.worker.BlockWorker``): real Zarr reads of
generated ``--size``² scenes (``(H, W, 3)`` uint8, 1024² zstd chunks), the model on the worker's device (CUDA
when present), the device blend, real label and confidence writes through the Zarr codecs. It needs no Ray,
so it runs on a GPU machine that has only torch, numpy, zarr, numcodecs and dask. The first image warms up
(cuDNN's algorithm search, allocator) and is left out of the figures.

- CPU: ``time.process_time`` of this process (every thread: reader, writer, Zarr's codec threads, the
  model's launches) per output MP, and the worker's per-phase thread CPU.
- Device busy: on CUDA, NVML's utilisation (the share of each sample period in which a kernel ran), sampled
  every 0.2 s over the timed images (``nvidia-ml-py``); on a CPU device, not applicable.

Target (the issue, on the GPU node): the GPU busy ≥ 85 % with fpn_resnet50 width 64 in bf16, the node's cores
feeding it.

    python -m benchmarks.worker_feed [--size 8192] [--images 3] [--model fpn_resnet50] [--width 64]
                                     [--precision auto] [--null] [--threads 16] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

from benchmarks._inputs import generate_scene, scene_path
from benchmarks._results import append_results, machine, machine_line, markdown_table


class DeviceBusy:
    """NVML utilisation of GPU 0 sampled in a thread while in the ``with`` block; ``mean`` in percent."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (no GPU, or nvidia-ml-py absent): nothing to sample
            self._nvml = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __enter__(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def thread_cpu() -> dict[str, float]:
    """CPU-seconds of this process's threads by kind (Linux ``/proc/self/task``; names with their trailing
    numbers folded: ``asyncio`` are Zarr's codec threads, ``zarr_io`` its event loop, ``gigaseg-read`` and
    ``gigaseg-write`` the worker's reader and writers); empty where there is no ``/proc``."""
    import os
    import re

    out: dict[str, float] = defaultdict(float)
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return {}
    names = {t.native_id: t.name for t in threading.enumerate()}  # Python's names; the OS knows only "python"
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = re.sub(r"[_-]?\d+$", "", names.get(int(tid), "native (torch, codecs' own pools)"))
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return dict(out)


def prepare(scene: Path, out_root: Path, name: str, job):
    """The image's stages and a sink writing its labels and confidence, as the engine prepares them."""
    from pipeline.frameworks.base import output_sink
    from pipeline.output.arrays import create_outputs
    from pipeline.output.layout import JobLayout
    from pipeline.pyramid import level_shapes, prepare_pyramid
    from pipeline.sources.discover import discover
    from pipeline.sources.formats import open_source

    framework, tiling = job["framework"], job["tiling"]
    (ref,) = discover(str(scene))
    source = open_source(ref)
    out = JobLayout(str(out_root)).image(name)
    pyramid = prepare_pyramid(source, out.group_url, framework.levels(len(level_shapes(source.shape_yx))),
                              chunk=tiling.image_chunk)
    stages = framework.stages(pyramid, out, tiling, job["classes"])
    outputs = create_outputs(out, label_name="segmentation", shapes=list(pyramid.shapes),
                             class_names=[f"class{i}" for i in range(job["classes"])],
                             class_colors=[(0, 0, 0)] * job["classes"], chunk=tiling.chunk,
                             extras=["confidence"], labels_dtype="uint8")
    return stages, output_sink(outputs, out), pyramid.shapes[0]


def run_image(worker, stages, sink, tiling, classes: int, cpu: dict) -> int:
    """Every block of the image's (single) stage; returns the tiles run."""
    from pipeline.blocks import block_tiles, owned_counts, plan_blocks
    from pipeline.workers.worker import BlockTask

    if len(stages) != 1:
        raise SystemExit("worker_feed runs one-stage frameworks (segment, fctl)")
    stage = stages[0]
    grid, side = stage.grid, tiling.block_side(classes)
    owned = owned_counts(grid, side, tiling.chunk)
    tiles = 0
    for block in plan_blocks(grid.height, grid.width, tiling.chunk, side):
        r = worker.run(BlockTask(stage, block, tuple(block_tiles(grid, block)), sink, owned.get(block.index, 0),
                                 tiling.batch, tiling.blend, tiling.sigma_scale, tiling.chunk))
        tiles += r.tiles_run
        for k, v in r.cpu.items():
            cpu[k] += v
    return tiles


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2048², width 8, 2 timed images (a CPU smoke run)")
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--images", type=int, default=3, help="timed images (one more warms up)")
    p.add_argument("--model", default="fpn_resnet50")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=16, help="torch threads (the CPU model's; the reader and "
                                                          "writer threads and Zarr's codec threads come on top)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--null", action="store_true", help="the null model (benchmarks._null) instead of the network")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gigaseg-bench"))
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.width, args.images, args.threads = 2048, 8, 2, 2

    import torch

    from benchmarks._null import NullFramework
    from models.checkpoint import seeded_checkpoint
    from pipeline.frameworks.segment import Segment
    from pipeline.plan import TilingPlan, WeightsRef
    from pipeline.workers.predictor import DeviceConfig
    from pipeline.workers.worker import BlockWorker

    m = machine()
    print(machine_line(m))
    args.workdir.mkdir(parents=True, exist_ok=True)
    scene = scene_path(args.workdir, args.size)
    generate_scene(scene, args.size, chunk=1024)
    weights = args.workdir / f"{args.model}-w{args.width}-c{args.classes}.safetensors"
    if not weights.exists():
        weights.write_bytes(seeded_checkpoint(args.model, args.classes, [f"class{i}" for i in range(args.classes)],
                                              seed=0, width=args.width))
    framework = Segment(WeightsRef(str(weights), ""))
    if args.null:
        framework = NullFramework(framework, args.classes)
    tiling = TilingPlan(tile=512, overlap=128, batch=args.batch)
    job = {"framework": framework, "tiling": tiling, "classes": args.classes}
    worker = BlockWorker(framework, {}, DeviceConfig(args.precision, args.threads))
    device = worker.model.device
    out_root = args.workdir / "worker-feed-out"
    shutil.rmtree(out_root, ignore_errors=True)
    cpu: dict[str, float] = defaultdict(float)
    try:
        stages, sink, _ = prepare(scene.parent, out_root, "warm-up", job)
        run_image(worker, stages, sink, tiling, args.classes, defaultdict(float))
        prepared = [prepare(scene.parent, out_root, f"scene-{i}", job) for i in range(args.images)]
        mp = sum(h * w for _, _, (h, w) in prepared) / 1e6
        with DeviceBusy() as busy:
            t0, c0, th0 = time.perf_counter(), time.process_time(), thread_cpu()
            tiles = sum(run_image(worker, st, sk, tiling, args.classes, cpu) for st, sk, _ in prepared)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, proc = time.perf_counter() - t0, time.process_time() - c0
            threads = {k: v - th0.get(k, 0.0) for k, v in thread_cpu().items()}
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    model_name = "null model" if args.null else f"{args.model} width {args.width}"
    dtype = worker.model.runner.autocast_dtype
    rows = [[model_name, f"{device}", f"{dtype or 'fp32'}", f"{args.images} × {args.size}²", f"{tiles}",
             f"{wall:.1f}", f"{mp / wall:.1f}", f"{proc / mp:.4f}",
             " ".join(f"{k} {v / mp:.4f}" for k, v in sorted(cpu.items())),
             " ".join(f"{k} {v / mp:.4f}" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v > 0),
             "n/a (CPU device)" if busy.mean is None else f"**{busy.mean:.0f} %**"]]
    table = markdown_table(["model", "device", "autocast", "images", "tiles", "wall s", "output MP/s",
                            "process CPU-s / MP", "worker thread CPU-s / MP by phase", "CPU-s / MP by thread",
                            "device busy (NVML)"], rows)
    print(table)
    if not args.no_results:
        body = (f"`python -m benchmarks.worker_feed{' --quick' if args.quick else ''}"
                f"{' --null' if args.null else ''}`: the block worker without Ray on generated {args.size}² Zarr "
                f"scenes (1024² zstd chunks), tile 512, overlap 128, batch {args.batch}, {args.classes} classes, "
                f"labels and confidence written; {args.threads} torch threads; one warm-up image left out.\n\n"
                f"{table}\n")
        append_results(f"Worker feed, {args.images} × {args.size}²", body, m)


if __name__ == "__main__":
    main()
