"""Timing: the phases of a job (a ``pipeline.engine.Events`` listener given to ``run_spec``), when its tiles run
(a ``Progress`` sink), and a bare model's forward pass."""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import torch


class Phases:
    """Seconds (and CPU-seconds, with ``cpu_clock``) spent in each phase the job reports, by name; ``current`` is
    the phase the driver's main thread is in now (phases in the driver's other threads overlap it).

    Give it to ``jobs.runner.run_spec(spec, events=phases)``. ``on_batch`` sees every worker call's result."""

    def __init__(self, cpu_clock: Callable[[], float] | None = None, on_batch: Callable | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.current = "other"
        self.cpu_clock = cpu_clock  # CPU-seconds so far (e.g. ``TreeSampler.tree_cpu``), for ``cpu`` by name
        self.on_batch = on_batch
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def phase(self, name: str):
        main = threading.current_thread() is threading.main_thread()
        outer = self.current
        if main:
            self.current = name
        c0 = self.cpu_clock() if self.cpu_clock else 0.0
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[name] += time.perf_counter() - t0
                if self.cpu_clock:
                    self.cpu[name] += self.cpu_clock() - c0
                self.calls[name] += 1
            if main:
                self.current = outer

    def batch(self, result) -> None:
        if self.on_batch is not None:
            self.on_batch(result)


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


def time_forward(model, x, bf16: bool) -> float:
    """Seconds for one ``model(x)`` under inference_mode (and bf16 autocast when ``bf16``)."""
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
