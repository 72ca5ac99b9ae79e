"""Memory scaling: peak memory summed over every process of a run (driver with its Dask threads, Ray's
system processes, the Ray workers) for growing images.

Target (the issue): the largest image's peak within 1.15× of the smallest's.

Each size runs in a fresh subprocess (no cache of one size helps the next). Its input, a Zarr v3 scene
generated chunk by chunk with Dask, is written before, by another subprocess, and kept in the workdir
between runs. In the measured subprocess a thread samples the driver and all its descendants: ΣRSS every
``--interval`` s and ΣPSS (which counts shared pages once, split between their sharers) every
``--pss-interval`` s, while ``jobs.runner.run_spec`` runs the job with a cheap model on an embedded
local Ray cluster.

    python -m benchmarks.memory_scaling [--quick] [--sizes 8192,16384,32768] [--workers 2] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._inputs import generate_scene, job_spec, ray_temp_dir, scene_path, scene_ready
from benchmarks._results import REPO, append_results, machine, machine_line, markdown_table
from benchmarks._sampler import TreeSampler
from benchmarks._timing import Phases, check_ok

TARGET = 1.15
ROLES = ("driver", "ray system", "ray workers")
PHASES = ("model", "ray start", "actors", "ingest", "tiles", "stage", "label pyramid", "shutdown", "other")
MIB = 2**20


def grid_tiles(size: int, args) -> int:
    from pipeline.tiling import TileGrid

    return len(TileGrid(size, size, args.tile, args.overlap, 0, 0, margin=min(64, args.overlap)))


def run_disk(size: int, args) -> float:
    """Bytes a run's outputs may hold at once, uncompressed bound: the image pyramid's coarser levels (1/3 of
    the image; level 0 is read in place) + the label pyramid (uint8, 4/3 of the image)."""
    return size * size * 3 / 3 + size * size * 4 / 3


def run_one(args) -> dict:
    """The measured run of one size (in this fresh process); returns its figures."""
    from jobs.progress import ProgressBar
    from jobs.runner import run_spec

    size = args.one
    out = args.workdir / f"out-{size}"
    spec = job_spec(scene_path(args.workdir, size).parent, out, width=args.width, precision=args.precision,
                      classes=args.classes, tile=args.tile, overlap=args.overlap, batch=args.batch,
                      workers=args.workers, threads=1)
    phases = Phases()
    try:
        with ray_temp_dir() as tmp, TreeSampler(
            interval=args.interval, pss_interval=args.pss_interval, marker=str(tmp), phase=lambda: phases.current
        ) as sampler:
            t0 = time.perf_counter()
            results = run_spec(spec, progress=ProgressBar(interval=30), events=phases)
            wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    check_ok(results)
    return {
        "size": size, "tiles": results[0].tiles_run, "seconds": wall, "phases": dict(phases.seconds),
        "peak_rss": sampler.peak_rss, "peak_pss": sampler.peak_pss, "rss_roles": sampler.peak_rss_roles,
        "pss_roles": sampler.peak_pss_roles, "rss_at": sampler.peak_rss_at, "pss_at": sampler.peak_pss_at,
        "rss_by_phase": dict(sampler.peak_rss_phase), "strays": len(sampler.strays), "samples": sampler.samples,
        "max_procs": sampler.max_procs, "other_load": sampler.other_load,
    }


def subprocess_args(args, flag: str, size: int) -> list[str]:
    keep = ["--workdir", str(args.workdir), "--width", str(args.width), "--precision", args.precision,
            "--tile", str(args.tile), "--overlap", str(args.overlap), "--batch", str(args.batch),
            "--workers", str(args.workers), "--classes", str(args.classes), "--interval", str(args.interval),
            "--pss-interval", str(args.pss_interval)]
    return [sys.executable, "-m", "benchmarks.memory_scaling", flag, str(size), *keep]


def in_fresh_process(args, flag: str, size: int) -> dict:
    """Run this module with ``flag size`` in a new interpreter; its last stdout line is a JSON result."""
    proc = subprocess.run(subprocess_args(args, flag, size), cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{flag} {size} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args, rows: list[dict], skipped: list[str]) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    base = rows[0]
    main = markdown_table(
        ["size", "MP", "tiles", "seconds", "peak ΣRSS", "peak ΣPSS", "ΣRSS ÷ smallest", "ΣPSS ÷ smallest",
         "CPU used by others"],
        [[f"{r['size']}²", f"{r['size'] ** 2 / 1e6:.0f}", r["tiles"], f"{r['seconds']:.0f}", gib(r["peak_rss"]),
          gib(r["peak_pss"]), f"{r['peak_rss'] / base['peak_rss']:.3f}", f"**{r['peak_pss'] / base['peak_pss']:.3f}**",
          f"{100 * r['other_load']:.0f} %"] for r in rows])
    roles = markdown_table(
        ["size", "peak ΣPSS during", *(f"{x} PSS" for x in ROLES), "peak ΣRSS during", *(f"{x} RSS" for x in ROLES),
         "processes", "non-descendants"],
        [[f"{r['size']}²", r["pss_at"], *(f"{r['pss_roles'].get(x, 0) / MIB:.0f} MiB" for x in ROLES), r["rss_at"],
          *(f"{r['rss_roles'].get(x, 0) / MIB:.0f} MiB" for x in ROLES), r["max_procs"], r["strays"]] for r in rows])
    phases = markdown_table(
        ["size", *(f"{p}" for p in PHASES)],
        [[f"{r['size']}²", *(f"{r['phases'].get(p, 0):.0f} s / {r['rss_by_phase'].get(p, 0) / MIB:.0f} MiB"
                            for p in PHASES)] for r in rows])
    big = rows[-1]
    ratio_pss, ratio_rss = big["peak_pss"] / base["peak_pss"], big["peak_rss"] / base["peak_rss"]
    met = "met" if max(ratio_pss, ratio_rss) <= TARGET else ("met for ΣPSS only" if ratio_pss <= TARGET else "NOT met")
    verdict = (f"Target largest ÷ smallest ≤ {TARGET}: {big['size']}² ÷ {base['size']}² = {ratio_pss:.3f} (ΣPSS), "
               f"{ratio_rss:.3f} (ΣRSS): {met}.")
    if skipped:
        verdict += " Not run: " + "; ".join(skipped) + "."
    return (f"fpn_resnet18 width {args.width}, precision {args.precision}, {args.classes} classes; tile {args.tile}, "
            f"overlap {args.overlap}, batch {args.batch}; {args.workers} workers × 1 logical GPU × 1 thread; input a "
            f"Zarr v3 scene (1024² chunks), pyramid and mask chunks 1024². Each size in a fresh process; ΣRSS sampled "
            f"every {args.interval} s, ΣPSS every {args.pss_interval} s over the driver and all its descendants.\n\n"
            f"{main}\n\nAt the peaks, by role (driver = the job's process with its Dask threads):\n\n{roles}\n\n"
            f"Seconds / peak ΣRSS per phase of `run_spec`:\n\n{phases}\n\n**{verdict}**")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_scaling", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2048² and 4096² only (about a minute)")
    p.add_argument("--sizes", default=None, help="comma-separated image sides (default 8192,16384,32768)")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.2, help="seconds between ΣRSS samples")
    p.add_argument("--pss-interval", type=float, default=1.0, help="seconds between ΣPSS samples")
    p.add_argument("--max-minutes", type=float, default=15.0,
                   help="skip a size whose run, extrapolated from the previous size, would take longer")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gigaseg-bench"), help="scene cache and outputs")
    p.add_argument("--clean", action="store_true", help="also remove the generated scenes at the end")
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--generate", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gigaseg.progress").setLevel(logging.INFO)
    if args.generate:
        seconds = generate_scene(scene_path(args.workdir, args.generate), args.generate)
        print(json.dumps({"seconds": seconds}))
        return
    if args.one:
        print(json.dumps(run_one(args)))
        return

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([2048, 4096] if args.quick else [8192, 16384, 32768])
    args.workdir.mkdir(parents=True, exist_ok=True)
    m = machine()
    print(machine_line(m))
    need = sum(s * s * 3 for s in sizes) + max(run_disk(s, args) for s in sizes)  # scenes stay, outputs go
    free = shutil.disk_usage(args.workdir).free
    print(f"disk: up to {need / 2**30:.1f} GiB needed (uncompressed bound), {free / 2**30:.1f} GiB free under {args.workdir}")
    if need > free:
        raise SystemExit(f"not enough disk under {args.workdir}: choose --workdir on a larger disk or smaller --sizes")

    rows, skipped = [], []
    for size in sizes:
        if rows:
            prev = rows[-1]
            estimate = prev["seconds"] * grid_tiles(size, args) / max(prev["tiles"], 1) / 60
            if estimate > args.max_minutes:
                skipped.append(f"{size}² (estimated {estimate:.0f} min from {prev['size']}², over --max-minutes "
                               f"{args.max_minutes:g})")
                print(f"skipping {size}²: {skipped[-1]}")
                continue
        if not scene_ready(scene_path(args.workdir, size), size):
            print(f"generating the {size}² scene ...", flush=True)
            print(f"  {in_fresh_process(args, '--generate', size)['seconds']:.0f} s")
        print(f"running {size}² ({grid_tiles(size, args)} tiles) ...", flush=True)
        rows.append(in_fresh_process(args, "--one", size))
        r = rows[-1]
        print(f"  {r['seconds']:.0f} s, peak ΣRSS {r['peak_rss'] / MIB:.0f} MiB, ΣPSS {r['peak_pss'] / MIB:.0f} MiB")

    body = report(args, rows, skipped)
    print("\n" + body)
    if not args.no_results:
        done = ", ".join(f"{r['size']}²" for r in rows)
        append_results(f"Memory scaling, {done}{' (quick)' if args.quick else ''}", body, m)
    if args.clean:
        for size in sizes:
            shutil.rmtree(scene_path(args.workdir, size).parent, ignore_errors=True)


if __name__ == "__main__":
    main()
