"""Dispatch tile batches over a pool of GPU-pinned Ray actors with bounded in-flight work.

The driver only ever holds batch descriptions (tile indices) and small results; pixels flow from Zarr
to the actors and back to Zarr. At most ``in_flight_per_worker`` calls are queued per actor (Ray's
"limit pending tasks" pattern with ``ray.wait``), so memory stays bounded whatever the image count.
Actors restart on death (``max_restarts=-1``); the calls they lose come back to this loop, which runs
them on the other actors (see ``WorkerPool.run``). An exception raised by a batch is retried
``retries`` times, then its tiles are reported as failed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import ray
from ray.exceptions import RayActorError

from pipeline.frameworks.base import Framework, StagePlan
from pipeline.plan import PoolPlan
from pipeline.storage import is_local
from pipeline.workers.predictor import DeviceConfig
from pipeline.workers.worker import BatchResult, TileBatch, TileWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Call:
    batch: TileBatch
    attempt: int = 0


@dataclass(frozen=True)
class StageOutcome:
    failed: tuple[tuple[tuple[int, int], ...], ...]
    error: str | None
    retried_tiles: int


def placement_for(urls: Iterable[str]) -> str:
    """Where actors should start: ``"driver"`` when the job's data lives in the driver's filesystem (local
    paths: the node that holds them reads them cheapest, and on a cluster without a shared filesystem it is
    the only one that can), else ``"anywhere"`` (object stores serve every node alike)."""
    return "driver" if all(is_local(u) for u in urls) else "anywhere"


def scheduling_strategy(placement: str):
    """Ray's scheduling strategy for ``placement``: a soft affinity to the driver's node (actors go elsewhere
    once its GPUs are taken), or SPREAD over the nodes."""
    if placement == "driver":
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    if placement == "anywhere":
        return "SPREAD"
    raise ValueError(f"placement must be 'driver' or 'anywhere', got {placement!r}")


def batches(stage: StagePlan, tiles: Iterable[tuple[int, int]], size: int, per_call: int | None = None) -> list[TileBatch]:
    """Calls of ``per_call`` tiles (default ``size``), each run by its worker ``size`` tiles per model batch."""
    tiles = list(tiles)
    per_call = per_call or size
    return [TileBatch(stage, tuple(tiles[i : i + per_call]), size) for i in range(0, len(tiles), per_call)]


def call_size(n_tiles: int, batch: int, workers: int, cap: int = 256, calls_per_worker: int = 4) -> int:
    """Tiles per call: ``⌈n / (workers · calls_per_worker)⌉`` rounded up to a multiple of ``batch``, within
    ``[batch, cap]`` (``cap`` rounded down to a multiple of ``batch``, at least ``batch``).

    Big calls spread the driver's per-call cost (``benchmarks/dispatch_scale.py``) so one driver feeds many
    GPUs; ``calls_per_worker`` calls per worker per stage keep the load balanced at the end of small images.
    """
    per = -(-n_tiles // max(1, workers * calls_per_worker))
    per = -(-per // batch) * batch
    return max(batch, min(per, max(batch, cap // batch * batch)))


def error_text(err: BaseException) -> str:
    """The user-facing line of a task error: the original exception, not Ray's wrapper traceback."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    return f"{type(err).__name__}: {err}".splitlines()[0]


class _Health:
    """Which actors may get work; a lost actor is probed (``info``) until Ray has restarted it."""

    PROBE_EVERY_S = 1.0

    def __init__(self, actors: list):
        self.actors = actors
        self.down: dict[int, float] = {}  # actor index → when it went down
        self._probes: dict[ray.ObjectRef, int] = {}
        self._next_probe: dict[int, float] = {}

    def up(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.down]

    def waiting(self) -> bool:
        return bool(self.down)

    def mark_down(self, idx: int) -> None:
        if idx not in self.down:
            self.down[idx] = time.monotonic()
            self._next_probe[idx] = time.monotonic()

    def probes(self) -> list[ray.ObjectRef]:
        now = time.monotonic()
        for idx, at in list(self._next_probe.items()):
            if at <= now:
                del self._next_probe[idx]
                self._probes[self.actors[idx].info.remote()] = idx
        return list(self._probes)

    def is_probe(self, ref) -> bool:
        return ref in self._probes

    def on_probe(self, ref) -> None:
        idx = self._probes.pop(ref)
        try:
            ray.get(ref)
        except Exception:  # still restarting: ask again a little later
            self._next_probe[idx] = time.monotonic() + self.PROBE_EVERY_S
            return
        log.info("worker %d is back after %.1f s", idx, time.monotonic() - self.down.pop(idx))

    def wait_timeout(self) -> float | None:
        return self.PROBE_EVERY_S if self._next_probe else None

    def check_patience(self, timeout_s: float) -> None:
        if self.down and len(self.down) == len(self.actors):
            since = min(self.down.values())
            if time.monotonic() - since > timeout_s:
                raise RuntimeError(
                    f"no worker has been available for {timeout_s:.0f} s (all {len(self.actors)} lost); "
                    "check the cluster's GPUs and nodes, then rerun the job to resume"
                )


class WorkerPool:
    """``workers`` actors, each requesting ``gpus_per_worker`` GPUs, each holding the framework's model once
    (its weights read from ``storage_options``' store)."""

    def __init__(self, framework: Framework, storage_options: dict, config: PoolPlan,
                 worker_cls: type[TileWorker] = TileWorker):
        self.config = config
        remote = ray.remote(worker_cls).options(
            max_concurrency=2,  # I/O of one batch overlaps the model call of the next (see TileWorker)
            num_gpus=config.gpus_per_worker,
            num_cpus=config.cpus_per_worker,
            max_restarts=-1,  # Ray restarts a dead actor (on another node if its node is gone) ...
            max_task_retries=0,  # ... and run() re-queues its lost calls to the other actors at once
            scheduling_strategy=scheduling_strategy(config.placement),
        )
        device = DeviceConfig(precision=config.precision, torch_threads=config.torch_threads)
        self.actors = [remote.remote(framework, storage_options, device, config.audit_dir)
                       for _ in range(config.workers)]

    def info(self, timeout: float = 30.0) -> list[dict]:
        """Where each actor runs (device, GPU ids); empty when they do not answer within ``timeout``."""
        try:
            return ray.get([a.info.remote() for a in self.actors], timeout=timeout)
        except Exception as err:  # only informative: never hide the job's own outcome behind it
            log.warning("could not ask the workers where they ran: %s", error_text(err))
            return []

    def run(
        self,
        calls: list[TileBatch],
        *,
        retries: int,
        on_result: Callable[[BatchResult], None],
    ) -> StageOutcome:
        """Run every batch; stop dispatching after the first batch that fails on all its attempts.

        Two kinds of failure are told apart. A batch that raises (bad data, a bug) is retried ``retries``
        times, then its tiles fail. A batch whose actor died (process killed, node lost) is not the
        batch's fault: it goes back to the queue for the other actors at once, without using an attempt,
        and the dead actor gets no work until a probe shows Ray has restarted it. Both count as retried
        tiles. Writes are idempotent (a tile owns its chunk), so a re-run tile rewrites the same bytes.
        """
        pending = deque(_Call(b) for b in calls)
        running: dict[ray.ObjectRef, tuple[int, _Call]] = {}
        health = _Health(self.actors)
        load = [0] * len(self.actors)
        limit = self.config.in_flight_per_worker
        failed: list[tuple[tuple[int, int], ...]] = []
        first_error: str | None = None
        retried = 0
        while pending or running:
            while pending and not failed:
                idle = [i for i in health.up() if load[i] < limit]
                if not idle:
                    break
                idx = min(idle, key=load.__getitem__)
                call = pending.popleft()
                running[self.actors[idx].run.remote(call.batch)] = (idx, call)
                load[idx] += 1
            if not running and (failed or not health.waiting()):
                break
            health.check_patience(self.config.unavailable_timeout_s)
            waiting_on = [*running, *health.probes()]
            if not waiting_on:  # every lost actor is between probes
                time.sleep(health.PROBE_EVERY_S)
                continue
            done, _ = ray.wait(waiting_on, num_returns=1, timeout=health.wait_timeout())
            for ref in done:
                if health.is_probe(ref):
                    health.on_probe(ref)
                    continue
                idx, call = running.pop(ref)
                load[idx] -= 1
                try:
                    result = ray.get(ref)
                except RayActorError as err:  # the worker died, not the batch: run it elsewhere
                    log.warning("worker %d lost batch %s (%s); re-queued", idx, call.batch.tiles, error_text(err))
                    retried += len(call.batch.tiles)
                    pending.appendleft(call)
                    health.mark_down(idx)
                    continue
                except Exception as err:  # the batch raised: retry, then report
                    text = error_text(err)
                    if call.attempt < retries:
                        log.warning("batch %s failed (%s); retrying", call.batch.tiles, text)
                        retried += len(call.batch.tiles)
                        pending.appendleft(replace(call, attempt=call.attempt + 1))
                    else:
                        failed.append(call.batch.tiles)
                        first_error = first_error or text
                    continue
                on_result(result)
        return StageOutcome(tuple(failed), first_error, retried)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
