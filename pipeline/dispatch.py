"""Dispatch tile batches over a pool of GPU-pinned Ray actors with bounded in-flight work.

The driver only ever holds batch descriptions (tile indices) and small results; pixels flow from Zarr
to the actors and back to Zarr. At most ``in_flight_per_worker`` calls are queued per actor (Ray's
"limit pending tasks" pattern with ``ray.wait``), so memory stays bounded whatever the image count.
Actors restart on death (``max_restarts=-1``) and Ray resubmits the call they were running
(``max_task_retries=-1``); an exception raised by a batch is retried ``retries`` times by this loop,
then its tiles are reported as failed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import ray

from pipeline.predictor import PredictorConfig
from pipeline.worker import BatchResult, StagePlan, TileBatch, TileWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolConfig:
    workers: int = 2
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    in_flight_per_worker: int = 2
    predictor: PredictorConfig = PredictorConfig()
    audit_dir: str | None = None


@dataclass(frozen=True)
class _Call:
    batch: TileBatch
    attempt: int = 0


@dataclass(frozen=True)
class StageOutcome:
    failed: tuple[tuple[tuple[int, int], ...], ...]
    error: str | None
    retried_tiles: int


def batches(stage: StagePlan, tiles: Iterable[tuple[int, int]], size: int) -> list[TileBatch]:
    tiles = list(tiles)
    return [TileBatch(stage, tuple(tiles[i : i + size])) for i in range(0, len(tiles), size)]


def error_text(err: BaseException) -> str:
    """The user-facing line of a task error: the original exception, not Ray's wrapper traceback."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    return f"{type(err).__name__}: {err}".splitlines()[0]


class WorkerPool:
    """``workers`` actors, each requesting ``gpus_per_worker`` GPUs, each holding the model once."""

    def __init__(self, checkpoint_url: str, storage_options: dict, config: PoolConfig):
        self.config = config
        remote = ray.remote(TileWorker).options(
            max_concurrency=2,  # I/O of one batch overlaps the model call of the next (see TileWorker)
            num_gpus=config.gpus_per_worker,
            num_cpus=config.cpus_per_worker,
            max_restarts=-1,
            max_task_retries=-1,
        )
        self.actors = [
            remote.remote(checkpoint_url, storage_options, config.predictor, config.audit_dir)
            for _ in range(config.workers)
        ]

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
        """Run every batch; stop dispatching after the first batch that fails on all its attempts."""
        pending = deque(_Call(b) for b in calls)
        running: dict[ray.ObjectRef, tuple[int, _Call]] = {}
        load = [0] * len(self.actors)
        limit = self.config.in_flight_per_worker
        failed: list[tuple[tuple[int, int], ...]] = []
        first_error: str | None = None
        retried = 0
        while pending or running:
            while pending and not failed and min(load) < limit:
                idx = load.index(min(load))
                call = pending.popleft()
                running[self.actors[idx].run.remote(call.batch)] = (idx, call)
                load[idx] += 1
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                idx, call = running.pop(ref)
                load[idx] -= 1
                try:
                    result = ray.get(ref)
                except Exception as err:  # a task error: retry, then report
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
