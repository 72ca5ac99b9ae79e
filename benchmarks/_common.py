"""What both benchmarks share: the machine line, the results file, the generated scene, the job spec and
phase timing of a ``run_spec`` call (wrappers put around pipeline functions for the duration of a run).
``TreeSampler`` (memory and CPU of the run's process tree) lives in ``benchmarks._sampler``.
"""

from __future__ import annotations

import argparse

import contextlib
import datetime
import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")
REPO = Path(__file__).resolve().parent.parent
SCENE_SEED = 1


# ---------------------------------------------------------------- machine and results file


def machine() -> dict[str, Any]:
    """CPU model, logical cores, RAM and library versions of this machine."""
    cpu = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    ram = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 2**20
    import ray
    import torch

    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram, 1), "avx512_bf16": "avx512_bf16" in flags,
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
    }


def machine_line(m: dict[str, Any]) -> str:
    bf16 = ", avx512_bf16" if m["avx512_bf16"] else ""
    return (f"{m['cpu']}{bf16}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}, "
            f"torch {m['torch']}, ray {m['ray']}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with padded columns, readable on a terminal too."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def command_line() -> str:
    return " ".join([f"python -m benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


def append_results(title: str, body: str, m: dict[str, Any]) -> None:
    """Append one section (title, date, command, machine, body) to ``benchmarks/RESULTS.md``."""
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by `python -m benchmarks.<name>`; newest last. "
                           "Absolute figures are noisy on shared machines: compare ratios within one section.\n")
    with RESULTS.open("a") as f:
        f.write(f"\n## {title} — {date}\n\n`{command_line()}`  \nMachine: {machine_line(m)}\n\n{body.strip()}\n")
    print(f"\nappended to {RESULTS}")


# ---------------------------------------------------------------- inputs and specs


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
    import zarr

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
    import dask.array as da
    import numpy as np
    import zarr

    from jobs.demo import land_cover

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
    from jobs.spec import parse_spec

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
    """Give the run (and so the pipeline's Ray session dir) a temp dir of its own, removed afterwards.

    It sits directly in the system temp dir: Ray's socket paths under it must stay within 107 bytes.
    """
    tmp = Path(tempfile.mkdtemp(prefix="gsb-"))
    before, tempfile.tempdir = tempfile.tempdir, str(tmp)
    try:
        yield tmp
    finally:
        tempfile.tempdir = before
        shutil.rmtree(tmp, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ---------------------------------------------------------------- timing a run


class Phases:
    """Seconds spent in wrapped functions, by label; ``current`` names the phase running now."""

    def __init__(self, cpu_clock: Callable[[], float] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.current = "other"
        self.cpu_clock = cpu_clock  # CPU-seconds so far (e.g. ``TreeSampler.tree_cpu``), for ``cpu`` by label

    @contextlib.contextmanager
    def wrap(self, owner: Any, name: str, label: str, adapt: Callable | None = None):
        """Replace ``owner.name`` by a timed wrapper while the block runs; ``adapt(args, kwargs)`` may
        rewrite the call's arguments (to observe callbacks)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if adapt is not None:
                args, kwargs = adapt(args, kwargs)
            outer, self.current = self.current, label
            c0 = self.cpu_clock() if self.cpu_clock else 0.0
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                if self.cpu_clock:
                    self.cpu[label] += self.cpu_clock() - c0
                self.calls[label] += 1
                self.current = outer

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, original)

    @contextlib.contextmanager
    def around_run_spec(self, on_batch: Callable | None = None):
        """Time the phases of ``jobs.runner.run_spec``: model, Ray start, actors, ingest, tiles, blend, shutdown.

        ``on_batch(BatchResult)`` sees every batch result the pool reports.
        """
        import ray

        import jobs.runner as runner
        import pipeline.blend as blend
        import pipeline.engine as engine
        from pipeline.dispatch import WorkerPool

        def observe(args, kwargs):
            if on_batch is not None:
                inner = kwargs["on_result"]
                kwargs = {**kwargs, "on_result": lambda r: (on_batch(r), inner(r))}
            return args, kwargs

        with contextlib.ExitStack() as stack:
            for owner, name, label, adapt in [
                (runner, "resolve_model", "model", None),
                (runner, "start_ray", "ray start", None),
                (WorkerPool, "__init__", "actors", None),
                (WorkerPool, "info", "actors", None),
                (engine, "_prepare_pyramid", "ingest", None),
                (WorkerPool, "run", "tiles", observe),
                (blend, "store_outputs", "blend", None),
                (blend, "downsample_labels", "label pyramid", None),
                (WorkerPool, "shutdown", "shutdown", None),
                (ray, "shutdown", "shutdown", None),
            ]:
                stack.enter_context(self.wrap(owner, name, label, adapt))
            yield self


class TileClock:
    """A ``pipeline.engine.Progress`` that records when the tile phase starts (the first image's first
    tiles are dispatched) and when tiles finish; over an archive the tile phase spans every image."""

    def __init__(self) -> None:
        self.t_start = self.t_first = self.t_last = self.t_end = None
        self.first_tiles = self.tiles = 0
        self.megapixels = 0.0

    def start_image(self, name: str, total_tiles: int, done_tiles: int) -> None:
        if self.t_start is None:
            self.t_start = time.perf_counter()

    def advance(self, tiles: int, megapixels: float) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first, self.first_tiles = now, tiles
        self.t_last = now
        self.tiles += tiles
        self.megapixels += megapixels

    def end_image(self, result) -> None:
        self.t_end = time.perf_counter()

    @property
    def tile_seconds(self) -> float:
        """The tile phase: the first image's dispatch → the last tile."""
        return self.t_last - self.t_start


def check_ok(results) -> None:
    bad = [r for r in results if r.status != "ok"]
    if bad or not results:
        raise SystemExit(f"the benchmark job did not succeed: {[(r.name, r.status, r.error) for r in bad]}")



# ---------------------------------------------------------------- timing a bare model


def time_forward(model, x, bf16: bool) -> float:
    """Seconds for one ``model(x)`` under inference_mode (and bf16 autocast when ``bf16``)."""
    import torch

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0


def model_timing_args(description: str) -> argparse.Namespace:
    """The options both bare-model benchmarks take: --quick, --warmup, --batches, --budget, --batch;
    adds ``tile``, and fills the defaults of ``warmup`` and ``batches``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="256² tiles, 1 warm-up and 1 timed batch")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up batches (default 1)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches = rounds (default 6)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which rounds stop")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    args.tile = 256 if args.quick else 512
    args.warmup = args.warmup if args.warmup is not None else 1
    args.batches = args.batches if args.batches is not None else (1 if args.quick else 6)
    return args


# ---------------------------------------------------------------- framework cost runs (magnet_cost, fctl_cost)


def cost_arguments(description: str) -> argparse.Namespace:
    """The options of a framework-cost benchmark: scene size, segmenter width, repeats, --quick, workdir."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--width", type=int, default=64, help="segmenter width (64 = the real default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2048², one repeat")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = 2048, 1
    return args


@dataclass
class CostRuns:
    """Wall seconds per config over interleaved repeats, its tile count, and the load average seen."""

    times: dict[str, list[float]]
    tiles: dict[str, int]
    loads: list[float]

    def rows(self, base: str = "patch-only") -> list[list]:
        """``[name, tiles, best s, median s, best ÷ base's best]`` per config."""
        ref = min(self.times[base])
        return [[name, self.tiles[name], f"{min(ts):.1f}", f"{statistics.median(ts):.1f}", f"{min(ts) / ref:.2f}"]
                for name, ts in self.times.items()]


def interleaved_runs(specs: dict[str, Callable[[Path], Any]], repeats: int, out: Path, keep_last: bool = False) -> CostRuns:
    """Each ``specs[name](out)`` job, fresh (its output removed after it unless the last and ``keep_last``), in
    turn, ``repeats`` times, on an embedded Ray cluster of 2 CPUs and 2 logical GPUs started here."""
    import ray

    from jobs.progress import ProgressBar
    from jobs.runner import run_spec

    runs = CostRuns({name: [] for name in specs}, {}, [])
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="gsb-", dir="/tmp"), log_to_driver=False)
    try:
        for r in range(repeats):
            for i, (name, make) in enumerate(specs.items()):
                t0 = time.perf_counter()
                results = run_spec(make(out), progress=ProgressBar(enabled=False))
                runs.times[name].append(time.perf_counter() - t0)
                check_ok(results)
                runs.tiles[name] = results[0].tiles
                runs.loads.append(os.getloadavg()[0])
                if not (keep_last and r == repeats - 1 and i == len(specs) - 1):
                    shutil.rmtree(out, ignore_errors=True)
                print(f"{name}: {runs.times[name][-1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    return runs
