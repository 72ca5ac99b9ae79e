"""One job: discover images, ingest pyramids, run every stage's tiles on the worker pool, blend, write masks.

Images run one after another through one long-lived pool of actors (the model is loaded once per actor
for the whole job). The framework (``JobPlan.framework``) says which stages an image has and how each
stage's blend becomes its result; the engine runs them whatever the framework. An image that fails
(unreadable, unsupported, a tile failing on every retry) is reported and the job goes on, unless
``fail_fast``; what other images wrote is never touched.

The engine reports its phases to an ``Events`` listener (``events.phase(name)`` around each): ``ingest``,
``tiles``, ``stage map``, ``blend``, ``label pyramid``; benchmarks time them there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ContextManager, Protocol

import zarr

from models.errors import GigasegError
from pipeline import blend, stages
from pipeline.frameworks.base import StagePlan
from pipeline.output.arrays import create_outputs, create_tile_store, finished_tiles
from pipeline.output.layout import ImageOutput
from pipeline.output.state import check_resumable, mark, read_state, safe_remove_work
from pipeline.plan import JobPlan
from pipeline.pyramid import Pyramid, ingest, pyramid_in_place
from pipeline.sources.discover import ImageRef, discover
from pipeline.sources.formats import open_source
from pipeline.storage import AuditStore, zarr_store
from pipeline.workers.dispatch import WorkerPool, batches, call_size
from pipeline.workers.worker import BatchResult

log = logging.getLogger(__name__)


@dataclass
class ImageResult:
    name: str
    url: str
    status: str  # ok | failed | skipped
    shape: tuple[int, int] | None = None
    tiles: int = 0
    tiles_run: int = 0
    tiles_retried: int = 0
    seconds: float = 0.0
    megapixels_per_s: float = 0.0
    error: str | None = None


class Progress(Protocol):
    def start_image(self, name: str, total_tiles: int, done_tiles: int) -> None: ...
    def advance(self, tiles: int, megapixels: float) -> None: ...
    def end_image(self, result: ImageResult) -> None: ...


class Events(Protocol):
    """Listens to the job: ``with events.phase("ingest"): …`` around each phase (several may overlap: the
    driver ingests, blends and dispatches in threads of its own), and ``batch(result)`` for each worker call
    that returns (its ``BatchResult``: the worker's own seconds, model seconds, tiles)."""

    def phase(self, name: str) -> ContextManager: ...

    def batch(self, result: BatchResult) -> None: ...


class NoEvents:
    def phase(self, name: str) -> ContextManager:
        return contextlib.nullcontext()

    def batch(self, result: BatchResult) -> None:
        pass


def list_images(plan: JobPlan) -> list[ImageRef]:
    return discover(plan.inputs.url, plan.inputs.patterns, plan.inputs.storage_options)


def run_job(
    plan: JobPlan,
    refs: list[ImageRef],
    pool: WorkerPool | Callable[[], WorkerPool],
    progress: Progress,
    on_image: Callable[[ImageResult], None] = lambda r: None,
    on_tiles_done: Callable[[], None] = lambda: None,
    *,
    scheduler: Any = "threads",
    events: Events = NoEvents(),
) -> list[ImageResult]:
    """Run every image through prepare → tiles → finish, overlapping the stages of neighbours.

    While image k's tiles run on the workers, image k+1 is prepared (opened, ingested), image k−1 is
    blended, and image k's finished bands are blended (``blend.BandBlend``), each in one driver thread, so
    the driver's CPU work hides behind the workers' (on a GPU cluster it would otherwise leave the GPUs
    idle). Results are reported in input order. With ``fail_fast`` images run one at a time, so nothing
    starts after the first failure. ``scheduler`` runs the Dask graphs (``"threads"`` or a
    ``distributed.Client``).

    ``pool`` may be a function that starts the pool: it is called once the first image's preparation is
    under way, so starting the cluster overlaps it (if it raises, the error surfaces once that preparation
    ends). ``on_tiles_done`` is called once no tile is left to run, before the last blends are waited for,
    so the caller can release the workers meanwhile.
    """
    job = JobSteps(plan, scheduler, events)
    results: list[ImageResult] = []
    stop = False
    fail_fast = plan.failure.fail_fast

    def emit(result: ImageResult) -> None:
        nonlocal stop
        results.append(result)
        progress.end_image(result)
        on_image(result)
        if result.status == "failed" and fail_fast:
            log.error("failure.mode=fail_fast: stopping after %s", result.name)
            stop = True

    upcoming = deque(refs)
    finishing: deque[Future] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="gigaseg-prepare") as prep, \
            ThreadPoolExecutor(1, thread_name_prefix="gigaseg-finish") as fin, \
            ThreadPoolExecutor(1, thread_name_prefix="gigaseg-bands", initializer=_background_priority) as bands:
        next_work = prep.submit(job.prepare_image, upcoming.popleft()) if upcoming else None
        if callable(pool):
            pool = pool()
        while next_work is not None and not stop:
            work = next_work.result()
            overlap = not fail_fast
            next_work = prep.submit(job.prepare_image, upcoming.popleft()) if upcoming and overlap else None
            if work.result.status == "ok":
                job.run_tiles(work, pool, progress, bands)
            finishing.append(fin.submit(job.finish_image, work))
            while finishing and (finishing[0].done() or not overlap):
                emit(finishing.popleft().result())
            if next_work is None and upcoming and not stop:
                next_work = prep.submit(job.prepare_image, upcoming.popleft())
        on_tiles_done()
        while finishing:
            emit(finishing.popleft().result())
        if next_work is not None:
            next_work.result()  # prepared but not run: resumable later
    return results


def _background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: nice 19 for this thread and the threads it starts).

    The bands blended while tiles run then use only CPU the workers leave idle, and never slow a worker
    sharing the machine (this driver's node, or a laptop). Elsewhere a no-op.
    """
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError as err:  # not permitted in some sandboxes: run at normal priority
            log.debug("could not lower the band blend's priority: %s", err)


@dataclass
class _Work:
    """One image on its way through the stages; ``result.status`` turns "failed" at the first error."""

    ref: ImageRef
    result: ImageResult
    t0: float
    out: ImageOutput | None = None
    pyramid: Pyramid | None = None
    stages: list[StagePlan] = field(default_factory=list)
    megapixels: float = 0.0
    run_seconds: float = 0.0
    selected: dict[int, tuple | None] = field(default_factory=dict)  # the tiles each stage ran (None: all)
    arrays: dict[str, Any] | None = None  # the masks and extras, once created
    bands: blend.BandBlend | None = None  # the last stage's blend, band by band as its tiles run

    def fail(self, err: Exception) -> None:
        """One bad image never stops the others; the report says why."""
        self.result.status = "failed"
        self.result.error = (
            str(err) if isinstance(err, GigasegError) else f"{type(err).__name__}: {err}".splitlines()[0]
        )
        log.error("%s: %s", self.ref.url, self.result.error)
        log.debug("traceback for %s", self.ref.url, exc_info=True)


class JobSteps:
    """The per-image steps of one job: its plan, where its Dask graphs run, who listens to its phases."""

    def __init__(self, plan: JobPlan, scheduler: Any, events: Events) -> None:
        self.plan, self.scheduler, self.events = plan, scheduler, events

    def prepare_image(self, ref: ImageRef) -> _Work:
        """Resume check, pyramid (ingest or in place), the framework's stages."""
        plan = self.plan
        work = _Work(ref, ImageResult(name=ref.name, url=ref.url, status="ok"), time.perf_counter())
        result = work.result
        try:
            work.out = out = plan.output.layout.image(ref.name)
            if check_resumable(out, plan.fingerprint, plan.output.if_exists) == "complete":
                state = read_state(out) or {}
                result.status = "skipped"
                result.shape = tuple(state.get("shape", ())) or None
                result.tiles = int(state.get("tiles", 0))
                return work
            with self.events.phase("ingest"):
                work.pyramid = pyramid = self._pyramid(ref, out)
            h, w = pyramid.shapes[0]
            result.shape = (h, w)
            work.stages = plan.framework.stages(pyramid, out, plan.tiling, plan.num_classes)
            result.tiles = sum(len(st.grid) for st in work.stages)
            mark(out, fingerprint=plan.fingerprint, complete=False, shape=[h, w], tiles=result.tiles,
                 source=ref.url, in_place=pyramid.in_place)
        except Exception as err:
            work.fail(err)
        return work

    def _pyramid(self, ref: ImageRef, out: ImageOutput) -> Pyramid:
        inputs = self.plan.inputs
        source = open_source(ref, inputs.storage_options, inputs.value_range)
        if source.has_pyramid:
            return pyramid_in_place(source)
        return ingest(source, out.group_url, chunk=self.plan.tiling.image_chunk,
                      storage_options=self.plan.output.storage_options, scheduler=self.scheduler)

    def run_tiles(self, work: _Work, pool: WorkerPool, progress: Progress, band_executor=None) -> None:
        """Run every stage's unfinished tiles on the pool, each stage's result stored before the next (a
        barrier: a stage may read the previous one's map). The last stage is blended band by band as its
        tiles finish when its result is its own blend (``Framework.streams_last_stage``) and
        ``band_executor`` is given; ``finish_image`` blends what is left."""
        fw = self.plan.framework
        try:
            last = len(work.stages) - 1
            for s, stage in enumerate(work.stages):
                if s < last and stages.stage_map_complete(stage):
                    continue
                work.selected[s] = fw.selected_tiles(work.stages, s, self.scheduler)
                if work.selected[s] is not None:  # planned with every tile: count the ones that run
                    work.result.tiles -= len(stage.grid) - len(work.selected[s])
                streams = s == last and fw.streams_last_stage and band_executor is not None
                self._run_stage(work, pool, progress, stage, work.selected[s], band_executor if streams else None)
                if s < last:
                    with self.events.phase("stage map"):
                        stages.store_stage_map(self.plan, work.out, work.stages, s, work.selected[s], self.scheduler)
        except Exception as err:
            work.fail(err)

    def _run_stage(self, work: _Work, pool: WorkerPool, progress: Progress, stage: StagePlan, tiles=None,
                   band_executor=None) -> None:
        """Run the stage's unfinished tiles (of ``tiles``, the framework's choice; None: every tile)."""
        plan, grid, so = self.plan, stage.grid, stage.storage_options
        create_tile_store(stage.tiles_url, so, (grid.ny, grid.nx, stage.num_classes, grid.tile, grid.tile))
        done = finished_tiles(stage.tiles_url, so)
        wanted = grid.indices() if tiles is None else list(tiles)
        todo = [t for t in wanted if t not in done]
        n = len(work.stages)
        label = work.ref.name if n == 1 else f"{work.ref.name} [stage {stage.index + 1}/{n}]"
        progress.start_image(label, len(wanted), len(wanted) - len(todo))
        if band_executor is not None:
            work.bands = blend.BandBlend(stages.blend_plan(plan.tiling, stage, tiles), self._targets(work),
                                         self.scheduler, band_executor, done, events=self.events)

        def on_result(r: BatchResult) -> None:
            self.events.batch(r)
            work.megapixels += r.megapixels
            progress.advance(len(r.tiles), r.megapixels)
            if work.bands is not None:
                work.bands.tiles_done(r.tiles)

        t0 = time.perf_counter()
        per_call = plan.tiling.tiles_per_call or call_size(len(todo), plan.tiling.batch, pool.config.workers)
        with self.events.phase("tiles"):
            outcome = pool.run(batches(stage, todo, plan.tiling.batch, per_call), retries=plan.failure.tile_retries,
                               on_result=on_result)
        work.run_seconds += time.perf_counter() - t0
        work.result.tiles_run += len(todo)
        work.result.tiles_retried += outcome.retried_tiles
        if outcome.failed:
            n = sum(len(b) for b in outcome.failed)
            raise GigasegError(f"{n} tile(s) failed after {plan.failure.tile_retries} retries: {outcome.error}")

    def finish_image(self, work: _Work) -> ImageResult:
        """Blend, label pyramid, completion mark; the work area goes once the mask is complete."""
        result = work.result
        try:
            if result.status == "ok":
                self._blend(work)
                mark(work.out, complete=True)
                safe_remove_work(work.out)
                result.megapixels_per_s = work.megapixels / work.run_seconds if work.megapixels else 0.0
            elif work.bands is not None:
                work.bands.settle()
        except Exception as err:
            work.fail(err)
            if work.bands is not None:
                work.bands.settle()
        result.seconds = time.perf_counter() - work.t0
        return result

    def _targets(self, work: _Work) -> dict[str, zarr.Array]:
        """Create the masks and extras (recreated: no stale chunks of an interrupted blend survive); the
        level-0 arrays the blend writes."""
        plan, out = self.plan, work.out
        arrays = create_outputs(
            out,
            label_name=plan.output.label_name,
            shapes=list(work.pyramid.shapes),
            class_names=list(plan.classes.names),
            class_colors=list(plan.classes.colors),
            chunk=plan.tiling.chunk,
            extras=list(plan.output.extras),
            labels_dtype=blend.labels_dtype(plan.num_classes),
        )
        if plan.pool.audit_dir:
            arrays = {k: _audited(out, v, plan.pool.audit_dir) for k, v in arrays.items()}
        work.arrays = arrays
        targets = {"labels": arrays["labels"][0]}
        targets.update({k: arrays[k] for k in ("confidence", "probabilities") if k in arrays})
        return targets

    def _blend(self, work: _Work) -> None:
        """The last stage's result into the masks, extras and label pyramid."""
        n = self.plan.num_classes
        with self.events.phase("blend"):
            if work.bands is not None:
                work.bands.finish()
            else:
                targets = self._targets(work)
                last = len(work.stages) - 1
                probs = stages.stage_result(self.plan, work.out, work.stages, last, work.selected.get(last),
                                            self.scheduler)
                blend.store_outputs(probs, targets, n, self.scheduler)
        labels = work.arrays["labels"]
        with self.events.phase("label pyramid"):
            for level in range(1, len(labels)):
                blend.downsample_labels(labels[level - 1], labels[level], n, self.scheduler)


def _audited(out: ImageOutput, arrays, audit_dir: str):
    """The same arrays opened through an ``AuditStore`` that logs each chunk key the blend writes."""
    store = AuditStore(zarr_store(out.group_url, out.storage_options), os.path.join(audit_dir, "blend.log"),
                       "blend", out.group_url)
    if isinstance(arrays, list):
        return [zarr.open_array(store=store, path=a.path, mode="r+") for a in arrays]
    return zarr.open_array(store=store, path=arrays.path, mode="r+")


__all__ = ["Events", "ImageResult", "NoEvents", "Progress", "list_images", "run_job"]
