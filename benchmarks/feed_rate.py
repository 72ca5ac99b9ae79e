"""Feed rate: the CPU a job spends per output megapixel outside the model, with a null model in the real workers.

Whether a node's cores keep its GPUs busy depends on the CPU work per pixel outside the network (reading,
decoding, copies, the blend's bookkeeping, encoding, writes, the driver, Ray), which on a CPU machine the model's
own cost hides. Here the network is replaced by a per-pixel map costing almost nothing (``benchmarks._null``), and
everything else runs as ``gigaseg run`` runs it: an embedded Ray cluster, the block workers, Zarr reads and writes,
the label pyramid, the report.

- The archive: ``--images`` hard-linked copies of a generated ``--size``² Zarr scene (``(H, W, 3)`` uint8, 1024²
  zstd chunks), ``--classes`` classes, confidence on.
- CPU: the process tree's CPU-seconds (driver, Ray's workers, Ray's own processes), sampled; the workers' own
  per-phase thread CPU (decode, host→device, blend, sink, encode+write) from their block results; the null
  model's own CPU is left out of "outside the model".
- Steady state: a 1-image and an N-image job; CPU per MP is ``(CPU_N − CPU_1) / (MP_N − MP_1)``, and what a job
  pays once (Ray start, actor start, model load) is ``CPU_1 − MP_1 · that``, reported on its own line.
- The feed ceiling of a 16-core node is ``16 / (CPU-s per MP)`` output MP/s, next to the GPU's model throughput:
  an estimate from the model's FLOPs (``--gpu-tflops`` effective), unless measured on a GPU.

Targets (the issue): ≤ 0.02 CPU-s per output MP for ``segment``, ≤ 0.05 for MagNet (3 scales) and FCtL ([2, 4]),
judged on the host side: the CPU outside the model less the workers' device ops (``DEVICE_PHASES``: the blend's
tensor work, which a GPU does on a GPU node and this machine's CPU does here), both reported.

    python -m benchmarks.feed_rate [--quick] [--size 8192] [--images 4] [--frameworks segment,magnet,fctl]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from benchmarks._inputs import archive, archive_path, generate_scene, ray_temp_dir, scene_path
from benchmarks._null import NullFramework
from benchmarks._results import REPO, append_results, machine, machine_line, markdown_table
from benchmarks._sampler import TreeSampler
from benchmarks._timing import Phases, check_ok
from jobs.plan import job_plan, resolve_model
from jobs.progress import ProgressBar
from jobs.runner import run_plan
from jobs.spec import parse_spec

TARGETS = {"segment": 0.02, "magnet": 0.05, "fctl": 0.05}
WORKER_PHASES = ("read", "h2d", "inputs", "blend", "sink", "write")
#: The worker phases that are tensor work on the model's device (the tiles' other inputs made from what was read:
#: MagNet's upsampling, FCtL's context windows; the running sums; labels, confidence and maps from them): on a GPU
#: node the GPU does them and the host only launches kernels (and, for ``inputs``, copies the map rows or context
#: rows read into pinned memory: a fraction of the image row's bytes); here the device is the CPU.
DEVICE_PHASES = ("inputs", "blend", "sink")
NODE_CORES = 16


def spec_for(inputs: Path, output: Path, framework: str, args):
    model = {"name": "fpn_resnet18", "width": 8, "classes": [{"name": f"class{i}"} for i in range(args.classes)],
             "seed": 0, "precision": "fp32", "framework": framework}
    if framework == "magnet":
        model["magnet"] = {"scales": 3}
    if framework == "fctl":
        model["fctl"] = {"contexts": [2, 4]}
    return parse_spec({
        "inputs": {"url": str(inputs)},
        "model": model,
        "tiling": {"tile": args.tile, "overlap": args.overlap, "batch": args.batch, "chunk": 1024},
        "output": {"url": str(output), "if_exists": "overwrite", "extras": ["confidence"]},
        "resources": {"workers": args.workers, "gpus_per_worker": 1, "cpus_per_worker": 1, "torch_threads": 1},
        "cluster": {"local_gpus": args.workers},
        "failure": {"mode": "continue", "tile_retries": 0},
    }, "feed-rate spec")


def one_run(inputs: Path, framework: str, args) -> dict:
    """One job over ``inputs`` with the null model: wall, tree CPU by role, workers' CPU by phase, output MP."""
    out = args.workdir / f"out-{framework}"
    spec = spec_for(inputs, out, framework, args)
    plan = job_plan(spec, resolve_model(spec))
    plan = replace(plan, framework=NullFramework(plan.framework, args.classes))
    worker_cpu: dict[str, float] = defaultdict(float)
    blocks = []

    def on_block(result) -> None:
        blocks.append(result)
        for k, v in result.cpu.items():
            worker_cpu[k] += v

    try:
        with ray_temp_dir() as tmp:
            sampler = TreeSampler(interval=0.5, marker=str(tmp))
            phases = Phases(cpu_clock=lambda: time.process_time(), on_batch=on_block)
            with sampler:
                t0 = time.perf_counter()
                results = run_plan(spec, plan, progress=ProgressBar(enabled=False), events=phases)
                wall = time.perf_counter() - t0
            roles = sampler.cpu_by_role()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    check_ok(results)
    mp = sum(r.shape[0] * r.shape[1] for r in results) / 1e6
    return {"framework": framework, "images": len(results), "wall": wall, "mp": mp, "tree": sampler.own_cpu,
            "roles": roles, "worker": dict(worker_cpu), "driver_phases": dict(phases.cpu),
            "tiles": sum(r.tiles for r in results), "tiles_run": sum(b.tiles_run for b in blocks), "blocks": len(blocks),
            "other_load": sampler.other_load}


def marginal(small: dict, large: dict, value) -> float:
    """Per output MP, the difference of ``value`` between the N-image and the 1-image run."""
    return (value(large) - value(small)) / (large["mp"] - small["mp"])


def model_gflop_per_mp(tile: int, overlap: int) -> float:
    """GFLOP per output MP of the default model (fpn_resnet18, width 64, 7 classes) at this tiling."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import ModelConfig, build_model

    model = build_model(ModelConfig(name="fpn_resnet18", num_classes=7)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, tile, tile))
    tiles_per_mp = 1e6 / (tile - overlap) ** 2
    return counter.get_total_flops() / 1e9 * tiles_per_mp


def report(runs: dict[str, tuple[dict, dict]], args) -> str:
    gflop = model_gflop_per_mp(args.tile, args.overlap)
    gpu_mps = args.gpu_tflops * 1e3 / gflop
    rows, phase_rows = [], []
    for fw, (small, large) in runs.items():
        per_mp = marginal(small, large, lambda r: r["tree"])
        model = marginal(small, large, lambda r: r["worker"].get("model", 0.0))
        outside = per_mp - model
        device = marginal(small, large, lambda r: sum(r["worker"].get(k, 0.0) for k in DEVICE_PHASES))
        host = outside - device
        startup = small["tree"] - small["mp"] * per_mp
        ceiling = NODE_CORES / host if host > 0 else float("inf")
        verdict = "met" if host <= TARGETS[fw] else f"not met ({host / TARGETS[fw]:.1f}× the target)"
        rows.append([fw, f"{large['images']} × {args.size}²", f"{large['mp']:.0f}", f"{large['wall']:.1f}",
                     f"{per_mp:.4f}", f"{model:.4f}", f"{outside:.4f}", f"{device:.4f}", f"**{host:.4f}**",
                     f"{TARGETS[fw]}", verdict, f"{startup:.1f}", f"{ceiling:.0f}", f"{min(1.0, ceiling / gpu_mps):.0%}"])
        cells = [fw]
        for role in ("driver", "ray workers", "ray system"):
            cells.append(f"{marginal(small, large, lambda r, k=role: r['roles'].get(k, 0.0)):.4f}")
        for phase in WORKER_PHASES:
            cells.append(f"{marginal(small, large, lambda r, k=phase: r['worker'].get(k, 0.0)):.4f}")
        in_phases = marginal(small, large, lambda r: sum(r["worker"].get(k, 0.0) for k in (*WORKER_PHASES, "model")))
        cells.append(f"{marginal(small, large, lambda r: r['roles'].get('ray workers', 0.0)) - in_phases:.4f}")
        for phase in ("ingest", "stage", "label pyramid"):
            cells.append(f"{marginal(small, large, lambda r, k=phase: r['driver_phases'].get(k, 0.0)):.4f}")
        dup = large["tiles_run"] / max(1, large["tiles"]) - 1  # tiles on block edges run once per block
        cells.append(f"{large['blocks']} ({dup:.0%} tiles twice)")
        phase_rows.append(cells)
    table = markdown_table(
        ["framework", "archive", "output MP", "wall s", "CPU-s / MP (tree)", "null model", "outside the model",
         "device ops (here on the CPU)", "host side", "target", "", "start-up CPU-s", f"{NODE_CORES}-core feed MP/s",
         "GPU busy at that feed"], rows)
    phases = markdown_table(
        ["framework", "driver", "Ray workers", "Ray system", "decode", "host→device", "inputs", "blend", "sink",
         "write (caller)",
         "workers, other threads", "ingest", "stage merge", "label pyramid", "blocks"], phase_rows)
    return (f"{table}\n\n''Outside the model'' is the process tree's CPU less the null model's; ''device ops'' are the "
            f"worker phases that are tensor work on the model's device ({', '.join(DEVICE_PHASES)}: the running sums, "
            f"the labels and extras taken from them), which on a GPU node run on the GPU (their kernel launches are "
            f"not measured here); ''host side'' is the rest (decode, copies, encode and writes, driver, Ray), what a "
            f"GPU node's cores must do: the feed ceiling and the verdict are on it.\n\nCPU-s per output MP by process and phase (steady state: {runs[next(iter(runs))][1]['images']}"
            f"-image minus 1-image job; worker phases are the workers' own thread CPU, driver phases its process CPU "
            f"while they ran; ''Ray workers'' includes the worker phases and the null model; worker phases are the CPU of the "
            f"thread that runs them, so Zarr's codec threads (chunk decode and encode) and Ray's threads in the workers "
            f"are under ''workers, other threads''):\n\n{phases}\n\n"
            f"GPU model throughput (estimate, not measured): fpn_resnet18 width 64 costs {gflop:.0f} GFLOP per output "
            f"MP at tile {args.tile}, overlap {args.overlap}; at {args.gpu_tflops:.0f} effective TFLOP/s that is "
            f"{gpu_mps:.0f} output MP/s. {args.workers} worker(s) × 1 thread, {args.classes} classes, confidence on.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 × 2048² (a couple of minutes)")
    p.add_argument("--size", type=int, default=None, help="scene side (default 8192; 2048 with --quick)")
    p.add_argument("--images", type=int, default=None, help="images of the large run (default 4; 2 with --quick)")
    p.add_argument("--frameworks", default="segment,magnet,fctl")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gpu-tflops", type=float, default=200.0, help="effective TFLOP/s of the GPU estimate")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gigaseg-bench"))
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    args.size = args.size or (2048 if args.quick else 8192)
    args.images = args.images or (2 if args.quick else 4)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    args.workdir.mkdir(parents=True, exist_ok=True)
    m = machine()
    print(machine_line(m))
    scene = scene_path(args.workdir, args.size)
    gen = generate_scene(scene, args.size, chunk=1024)
    print(f"scene {scene}: {'generated in %.0f s' % gen if gen else 'cached'}")
    one = scene.parent
    many = archive(scene, archive_path(args.workdir, args.size, args.images), args.images)
    runs = {}
    for fw in args.frameworks.split(","):
        small, large = one_run(one, fw, args), one_run(many, fw, args)
        for r in (small, large):
            print(f"{fw}: {r['images']} image(s), {r['mp']:.0f} MP, {r['wall']:.1f} s, tree {r['tree']:.1f} CPU-s "
                  f"(others used {100 * r['other_load']:.0f} % CPU)", flush=True)
        runs[fw] = (small, large)
    body = report(runs, args)
    print("\n" + body)
    if not args.no_results:
        append_results(f"Feed rate (null model), {args.images} × {args.size}²{' (quick)' if args.quick else ''}",
                       body, m)


if __name__ == "__main__":
    main()
