"""Dispatch blocks over a pool of GPU-pinned Ray actors with bounded in-flight work.

The driver only ever holds block descriptions and small results; pixels flow from Zarr to the actors and back
to Zarr. At most ``in_flight_per_worker`` calls are queued per actor (Ray's "limit pending tasks" pattern with
``ray.wait``), so memory stays bounded whatever the image count. The calls come from a ``CallSource`` that may
grow while the pool runs (the engine adds an image's next stage, or the next image, as they become ready), so
the workers go from one image to the next without draining. Actors restart on death (``max_restarts=-1``); the
calls they lose come back to this loop, which runs them on the other actors (see ``WorkerPool.run``). A call
that raises is retried ``retries`` times, then reported as failed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError

from pipeline.frameworks.base import Framework
from pipeline.plan import PoolPlan
from pipeline.storage import is_local
from pipeline.workers.predictor import DeviceConfig
from pipeline.workers.worker import BlockResult, BlockTask, BlockWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """One call: ``task`` for a worker, ``tag`` for the caller (which image and stage it belongs to)."""

    task: BlockTask
    tag: Any = None
    attempt: int = 0


class CallSource(Protocol):
    """Where the pool takes its calls from, in the order they should run; thread-safe (the engine adds calls
    from its own threads while the pool runs)."""

    def next(self) -> Call | None:
        """A call to run now, or None (none ready yet, or none any more)."""

    def exhausted(self) -> bool:
        """Whether no call will come any more."""

    def wait(self, timeout: float) -> None:
        """Block until a call may be ready, or ``timeout`` seconds."""


class CallList:
    """A ``CallSource`` of a fixed list of calls."""

    def __init__(self, calls) -> None:
        self.calls = deque(calls)

    def next(self) -> Call | None:
        return self.calls.popleft() if self.calls else None

    def exhausted(self) -> bool:
        return not self.calls

    def wait(self, timeout: float) -> None:
        pass


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


#: glibc malloc settings of the worker processes: fewer arenas keep the buffers several threads allocate and free
#: together (with ``release_memory`` after each block). A fixed ``MALLOC_MMAP_THRESHOLD_`` (1 or 8 MiB, tried)
#: returned chunk rows to the system and kept memory flatter (memory_scaling 32768² ÷ 8192², 2 workers: 1.15–1.19
#: against 1.30), but it also mmaps the model's own activations anew for every batch: the model ran 35 % slower
#: inside the workers (4 × 8192², width-16 model: 144 s against 105 s), so it is left to glibc
#: (benchmarks/RESULTS.md, 2026-12-07).
WORKER_MALLOC = {"MALLOC_ARENA_MAX": "4"}


class WorkerPool:
    """``workers`` actors, each requesting ``gpus_per_worker`` GPUs, each holding the framework's model once
    (its weights read from ``storage_options``' store)."""

    def __init__(self, framework: Framework, storage_options: dict, config: PoolPlan,
                 worker_cls: type[BlockWorker] = BlockWorker):
        self.config = config
        remote = ray.remote(worker_cls).options(
            max_concurrency=2,  # with in_flight_per_worker 2, one block's writes overlap the next's model work
            num_gpus=config.gpus_per_worker,
            num_cpus=config.cpus_per_worker,
            max_restarts=-1,  # Ray restarts a dead actor (on another node if its node is gone) ...
            max_task_retries=0,  # ... and run() re-queues its lost calls to the other actors at once
            scheduling_strategy=scheduling_strategy(config.placement),
            runtime_env={"env_vars": dict(WORKER_MALLOC)},
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
        calls: CallSource,
        *,
        retries: int,
        on_result: Callable[[Call, BlockResult], None],
        on_failure: Callable[[Call, str], None] = lambda call, error: None,
        on_retry: Callable[[Call], None] = lambda call: None,
    ) -> None:
        """Run every call ``calls`` gives until it is exhausted and nothing runs.

        Two kinds of failure are told apart. A call that raises (bad data, a bug) is retried ``retries`` times,
        then ``on_failure`` reports it. A call whose actor died (process killed, node lost) is not the call's
        fault: it goes back to the front of the queue for the other actors at once, without using an attempt,
        and the dead actor gets no work until a probe shows Ray has restarted it. ``on_retry`` sees both. Writes
        are idempotent (a block owns its chunks), so a re-run block rewrites the same bytes.
        """
        again: deque[Call] = deque()  # calls to run again before any new one
        running: dict[ray.ObjectRef, tuple[int, Call]] = {}
        health = _Health(self.actors)
        load = [0] * len(self.actors)
        limit = self.config.in_flight_per_worker
        while True:
            while True:
                idle = [i for i in health.up() if load[i] < limit]
                if not idle:
                    break
                call = again.popleft() if again else calls.next()
                if call is None:
                    break
                idx = min(idle, key=load.__getitem__)
                running[self.actors[idx].run.remote(call.task)] = (idx, call)
                load[idx] += 1
            if not running and not again and not health.waiting() and calls.exhausted():
                break
            health.check_patience(self.config.unavailable_timeout_s)
            waiting_on = [*running, *health.probes()]
            if not waiting_on:  # nothing runs: wait for the caller's next calls, or a lost actor's next probe
                calls.wait(min(health.PROBE_EVERY_S, 0.05))
                continue
            idle_now = any(load[i] < limit for i in health.up())
            timeout = 0.05 if idle_now and not calls.exhausted() else health.wait_timeout()
            done, _ = ray.wait(waiting_on, num_returns=1, timeout=timeout)
            for ref in done:
                if health.is_probe(ref):
                    health.on_probe(ref)
                    continue
                idx, call = running.pop(ref)
                load[idx] -= 1
                try:
                    result = ray.get(ref)
                except RayActorError as err:  # the worker died, not the call: run it elsewhere
                    log.warning("worker %d lost block %s (%s); re-queued", idx, call.task.block.index,
                                error_text(err))
                    on_retry(call)
                    again.appendleft(call)
                    health.mark_down(idx)
                    continue
                except Exception as err:  # the call raised: retry, then report
                    text = error_text(err)
                    if call.attempt < retries:
                        log.warning("block %s failed (%s); retrying", call.task.block.index, text)
                        on_retry(call)
                        again.appendleft(replace(call, attempt=call.attempt + 1))
                    else:
                        on_failure(call, text)
                    continue
                on_result(call, result)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
