"""Framework cost runs (``magnet_cost``, ``fctl_cost``): configurations timed side by side, interleaved."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from benchmarks._timing import check_ok
from jobs.progress import ProgressBar
from jobs.runner import run_spec
from pipeline.workers.ray_cluster import ray_temp_dir


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
    runs = CostRuns({name: [] for name in specs}, {}, [])
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             _temp_dir=ray_temp_dir("gsb-"), log_to_driver=False)
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
