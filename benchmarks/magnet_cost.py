"""MagNet's cost: wall time of a 3-scale MagNet run ÷ the patch-only run, same image and segmenter.

Runs, in one process on one embedded Ray cluster, interleaved: patch-only (one stage at full resolution)
and MagNet with 3 scales (stages at levels 2, 1, 0) with a seeded refiner of the reference width (64) and
a narrow one (16), and MagNet-Fast (the reference's ``--n_patches``: each refinement stage runs only the
most uncertain quarter of its tiles). Same seeded fpn_resnet18 segmenter, tile, overlap, batch and workers
for all. Each run is a fresh job (`if_exists: overwrite`), so ingest, tiles, stage blends and the label
pyramid all count.

    python -m benchmarks.magnet_cost [--size 4096] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import (
    append_results, check_ok, generate_scene, job_spec, machine, markdown_table, scene_path,
)


def _spec(inputs: Path, output: Path, args, framework: str, refiner_width: int = 64, patches: float | None = None):
    spec = job_spec(inputs, output, width=args.width, precision="auto", classes=4, tile=512, overlap=128,
                    batch=4, workers=2, threads=1)
    if framework == "segment":
        return spec
    data = spec.model_dump(mode="json")
    data["model"]["framework"] = "magnet"
    data["model"]["magnet"] = {"scales": 3, "replace": 0.75, "median": 5, "refiner_width": refiner_width,
                               "patches": patches}
    from jobs.spec import parse_spec

    return parse_spec(data, "benchmark spec")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--width", type=int, default=64, help="segmenter width (64 = the real default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2048², one repeat")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = 2048, 1
    import ray

    from jobs.runner import run_spec
    from jobs.progress import ProgressBar

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gsb-magnet-"))
    scene = scene_path(workdir, args.size)
    scene.parent.mkdir(parents=True, exist_ok=True)
    generate_scene(scene, args.size)
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="gsb-", dir="/tmp"), log_to_driver=False)
    configs = [("patch-only", "segment", 64, None), ("MagNet 3 scales, refiner width 64", "magnet", 64, None),
               ("MagNet 3 scales, refiner width 16", "magnet", 16, None),
               ("MagNet-Fast 3 scales (patches 0.25), refiner width 64", "magnet", 64, 0.25),
               ("MagNet-Fast 3 scales (patches 0.25), refiner width 16", "magnet", 16, 0.25)]
    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    tiles: dict[str, int] = {}
    loads = []
    for _ in range(args.repeats):
        for name, framework, rw, patches in configs:
            out = workdir / "out"
            spec = _spec(scene.parent, out, args, framework, rw, patches)
            t0 = time.perf_counter()
            results = run_spec(spec, progress=ProgressBar(enabled=False))
            times[name].append(time.perf_counter() - t0)
            check_ok(results)
            tiles[name] = results[0].tiles
            loads.append(os.getloadavg()[0])
            shutil.rmtree(out, ignore_errors=True)
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    ray.shutdown()
    base = min(times["patch-only"])
    rows = [(name, tiles[name], f"{min(ts):.1f}", f"{statistics.median(ts):.1f}", f"{min(ts) / base:.2f}")
            for name, ts in times.items()]
    table = markdown_table(["config", "tiles", "best s", "median s", "ratio to patch-only (best)"], rows)
    print(table)
    body = (
        f"Scene {args.size}² (Zarr v3), seeded fpn_resnet18 width {args.width}, precision auto, 4 classes, tile 512, "
        f"overlap 128, batch 4, 2 workers × 1 thread; MagNet replace 0.75, median 5; {args.repeats} interleaved "
        f"repeat(s); load average during runs {min(loads):.1f}–{max(loads):.1f}. Target: MagNet 3 scales ÷ "
        f"patch-only ≤ 1.5.\n\n{table}\n"
    )
    if not args.no_results:
        append_results(f"MagNet cost, {args.size}²", body, machine())
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
