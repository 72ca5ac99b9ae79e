"""One job: discover images, read (or ingest) their pyramids, run every stage's blocks on the worker pool, write
masks; several images at a time, so the workers go from one to the next without waiting.

Each image goes through its framework's stages (``JobPlan.framework``). A stage is cut into blocks
(``pipeline.blocks``); each block is one worker call that runs its tiles, blends them on the device and writes
its chunks, finished (``pipeline.workers.worker``). Once every block of a stage is in, the framework finishes the
stage on the driver (MagNet merges its refinement, with Dask); after the last stage the label pyramid is built
(Dask) and the image is marked complete. An image that fails (unreadable, unsupported, a block failing on every
retry) is reported and the job goes on, unless ``fail_fast``; what other images wrote is never touched.

Resume: every block done leaves a marker (``ImageOutput.block_url``), every stage done another
(``stage_done_url``); a rerun skips what they name and recomputes the rest (blocks rewrite whole chunks).

The engine reports its phases to an ``Events`` listener (``events.phase(name)`` around each): ``ingest``,
``tiles`` (the pool's run, all images), ``stage`` (a stage's finish on the driver), ``label pyramid``; and every
block's result (``events.batch``).
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, ContextManager, Protocol

import zarr

from models.errors import GigasegError
from pipeline import blend
from pipeline.blocks import block_tiles, owned_counts, plan_blocks
from pipeline.frameworks.base import StagePlan
from pipeline.output.arrays import OutputArrays, create_outputs, open_outputs
from pipeline.output.layout import ImageOutput
from pipeline.output.nodata import Nodata, nodata_label
from pipeline.output.state import (
    blocks_done,
    check_resumable,
    mark,
    mark_block,
    mark_stage,
    read_state,
    safe_remove_work,
    stage_done,
)
from pipeline.plan import JobPlan
from pipeline.pyramid import Pyramid, level_shapes, prepare_pyramid
from pipeline.redact import redact
from pipeline.retries import RETRY_LOG, under
from pipeline.sources.discover import ImageRef, discover
from pipeline.sources.formats import ImageSource, open_source
from pipeline.sources.pixels import level_reader
from pipeline.storage import AuditStore, zarr_store
from pipeline.workers.dispatch import Call, WorkerPool
from pipeline.workers.label_pyramid import pyramid_levels
from pipeline.workers.worker import BlockResult, BlockTask

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
    retries: int = 0  # storage requests retried for this image's input and output (``pipeline.retries``)
    error: str | None = None


class Progress(Protocol):
    def start_image(self, name: str, total_tiles: int, done_tiles: int) -> None: ...
    def advance(self, tiles: int, megapixels: float) -> None: ...
    def end_image(self, result: ImageResult) -> None: ...


class Events(Protocol):
    """Listens to the job: ``with events.phase("ingest"): …`` around each phase (several may overlap: the
    driver prepares, dispatches and finishes in threads of its own), and ``batch(result)`` for each block a
    worker returns (its ``BlockResult``: the worker's seconds, model seconds, CPU-seconds by phase)."""

    def phase(self, name: str) -> ContextManager: ...

    def batch(self, result: BlockResult) -> None: ...


class NoEvents:
    def phase(self, name: str) -> ContextManager:
        return contextlib.nullcontext()

    def batch(self, result: BlockResult) -> None:
        pass


def list_images(plan: JobPlan) -> list[ImageRef]:
    return discover(plan.inputs.url, plan.inputs.patterns, plan.inputs.storage_options)


@dataclass
class _Work:
    """One image on its way through the stages; ``result.status`` turns "failed" at the first error."""

    position: int
    ref: ImageRef
    result: ImageResult
    t0: float
    out: ImageOutput | None = None
    source: ImageSource | None = None
    pyramid: Pyramid | None = None
    stages: list[StagePlan] = field(default_factory=list)
    outputs: OutputArrays | None = None
    selected: dict[int, tuple | None] = field(default_factory=dict)  # the tiles each stage ran (None: all)
    pending: int = 0  # blocks of the current stage not back yet
    megapixels: float = 0.0
    first_call: float | None = None
    last_result: float = 0.0
    finished: bool = False
    closed: bool = False  # no call of this image will come any more (its last stage's blocks are all back)

    @property
    def failed(self) -> bool:
        return self.result.status == "failed"

    def roots(self) -> list[str]:
        """The URLs under which this image's reads and writes go: its source, its output group, its work area."""
        return [self.ref.url, *((self.out.group_url, self.out.work_url) if self.out is not None else ())]

    def fail(self, err: Exception | str) -> None:
        """One bad image never stops the others; the report says why."""
        if self.failed:
            return
        self.result.status = "failed"
        self.result.error = redact(err if isinstance(err, str) else (
            str(err) if isinstance(err, GigasegError) else f"{type(err).__name__}: {err}".splitlines()[0]))
        log.error("%s: %s", self.ref.url, self.result.error)
        if not isinstance(err, str):
            log.debug("traceback for %s", self.ref.url, exc_info=err)


class _Calls:
    """The job's ``CallSource``: blocks in the order their images came, added as images and stages get ready."""

    def __init__(self) -> None:
        self._calls: deque[Call] = deque()
        self._cond = threading.Condition()
        self.open = 0  # images whose calls may still come

    def add(self, calls: list[Call]) -> None:
        with self._cond:
            self._calls.extend(calls)
            self._cond.notify_all()

    def drop(self, work: _Work) -> None:
        with self._cond:
            self._calls = deque(c for c in self._calls if c.tag[0] is not work)

    def opened(self, n: int = 1) -> None:
        with self._cond:
            self.open += n
            self._cond.notify_all()

    def closed(self) -> None:
        with self._cond:
            self.open -= 1
            self._cond.notify_all()

    def next(self) -> Call | None:
        with self._cond:
            return self._calls.popleft() if self._calls else None

    def exhausted(self) -> bool:
        with self._cond:
            return not self._calls and self.open == 0

    def wait(self, timeout: float) -> None:
        with self._cond:
            if not self._calls and self.open:
                self._cond.wait(timeout)


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
    stop_when: Callable[[], bool] = lambda: False,
) -> list[ImageResult]:
    """Run every image, several at a time (module docstring); results are reported in input order.

    Up to ``workers + 1`` images are in flight: one is prepared (opened, ingested) while the others' blocks
    run, and an image's next stage, or the next image, is queued while the pool still runs the last blocks of
    the one before. With ``fail_fast`` images run one at a time, so nothing starts after the first failure.
    ``scheduler`` runs the Dask graphs (``"threads"`` or a ``distributed.Client``). ``pool`` may be a function
    that starts the pool: it is called once the first image's preparation is under way, so starting the cluster
    overlaps it. ``on_tiles_done`` is called once no block is left to run, before the last images are finished,
    so the caller can release the workers meanwhile. Once ``stop_when()`` is true no further image is started
    (the output's lease was lost); those in flight finish.
    """
    job = _Job(plan, progress, on_image, scheduler, events)
    job.stop_when = stop_when
    return job.run(refs, pool, on_tiles_done)


class _Job:
    def __init__(self, plan: JobPlan, progress: Progress, on_image, scheduler: Any, events: Events) -> None:
        self.plan, self.progress, self.on_image, self.scheduler, self.events = plan, progress, on_image, scheduler, events
        self.steps = JobSteps(plan, scheduler, events)
        self.calls = _Calls()
        self._lock = threading.RLock()
        self._all_finished = threading.Condition(self._lock)
        self.results: list[ImageResult | None] = []
        self.emitted = 0
        self.stop = False
        self.works: list[_Work] = []  # images in flight (their retries are counted by URL)
        self.stop_when: Callable[[], bool] = lambda: False

    # ---------------------------------------------------------------- the flow of images

    def run(self, refs: list[ImageRef], pool, on_tiles_done) -> list[ImageResult]:
        fail_fast = self.plan.failure.fail_fast
        self.results = [None] * len(refs)
        self.upcoming = deque(enumerate(refs))
        self.in_flight = 0
        self.calls.opened(len(refs))
        with ThreadPoolExecutor(1, thread_name_prefix="gigaseg-prepare") as self.prep, \
                ThreadPoolExecutor(1, thread_name_prefix="gigaseg-stage", initializer=_background_priority) as self.driver:
            self.max_in_flight = 1
            self._admit()
            if callable(pool):
                pool = pool()
            self.max_in_flight = 1 if fail_fast else max(2, pool.config.workers + 1)
            self._admit()
            with self.events.phase("tiles"):
                pool.run(self.calls, retries=self.plan.failure.tile_retries, on_result=self._on_result,
                         on_failure=self._on_failure, on_retry=self._on_retry)
            on_tiles_done()
            with self._all_finished:  # the last images' finishes on the driver (they may queue more of them)
                self._all_finished.wait_for(lambda: self.in_flight == 0)
        return [r for r in self.results if r is not None]

    def _admit(self) -> None:
        with self._lock:
            if not self.stop and self.stop_when():
                log.error("stopping: no further image is started")
                self.stop = True
            while self.upcoming and self.in_flight < self.max_in_flight and not self.stop:
                position, ref = self.upcoming.popleft()
                work = _Work(position, ref, ImageResult(name=ref.name, url=ref.url, status="ok"), time.perf_counter())
                self.works.append(work)
                self.in_flight += 1
                self.prep.submit(self._guard, self._prepare, work)
            if self.stop:
                while self.upcoming:  # never started: resumable later
                    self.upcoming.popleft()
                    self.calls.closed()

    def _guard(self, step, work: _Work, *args) -> None:
        """Run a step of ``work``; an error fails the image, which is then finished (never left hanging)."""
        try:
            step(work, *args)
        except Exception as err:
            work.fail(err)
            self._finish(work)

    def _prepare(self, work: _Work) -> None:
        self.steps.prepare_image(work)
        if work.result.status != "ok":
            self._finish(work)
            return
        self._start_stage(work, 0)

    def _start_stage(self, work: _Work, s: int) -> None:
        """Queue stage ``s``'s blocks not done yet (skipping stages done already), or finish the image."""
        while s < len(work.stages) and stage_done(work.out, s):
            s += 1
        if s == len(work.stages):
            self.driver.submit(self._guard, self._finish_image, work)
            return
        calls = self.steps.stage_calls(work, s, self.progress)
        if calls:
            with self._lock:
                work.pending = len(calls)
                if work.first_call is None:
                    work.first_call = time.perf_counter()
            self.calls.add(calls)
        else:
            self.driver.submit(self._guard, self._stage_done, work, s)

    def _on_result(self, call: Call, result: BlockResult) -> None:
        work, s = call.tag
        self.events.batch(result)
        self._count_retries(result.retries, work)
        if work.failed:
            return
        mark_block(work.out, s, call.task.block, owned=result.owned, tiles=result.tiles_run)
        self.progress.advance(result.owned, result.megapixels)
        with self._lock:
            work.megapixels += result.megapixels
            work.result.tiles_run += result.owned
            work.last_result = time.perf_counter()
            work.pending -= 1
            last = work.pending == 0
        if last:
            if s == len(work.stages) - 1:
                self._close(work)  # what is left is the driver's: the pool may stop once nothing else runs
            self.driver.submit(self._guard, self._stage_done, work, s)

    def _on_failure(self, call: Call, error: str) -> None:
        work, _ = call.tag
        if work.failed:
            return
        work.fail(f"{len(call.task.tiles)} tile(s) failed after {self.plan.failure.tile_retries} retries (block "
                  f"{call.task.block.name} of stage {call.task.stage.index + 1}): {error}")
        self.calls.drop(work)
        self._finish(work)

    def _on_retry(self, call: Call) -> None:
        work, _ = call.tag
        with self._lock:
            work.result.tiles_retried += call.task.owned

    def _count_retries(self, by_url: dict[str, int], work: _Work) -> None:
        """A worker's retries, by URL, added to the image in flight whose URLs they are under (``work`` first: the
        block's own image; a worker running two blocks at once hands over the other's too). Retries of no image's
        URL (the weights, the job's files) go back to this process's log, counted for the job as a whole."""
        with self._lock:
            works = [work, *(w for w in self.works if w is not work)]
            for url, n in by_url.items():
                owner = next((w for w in works if any(under(url, r) for r in w.roots())), None)
                if owner is not None and not owner.finished:
                    owner.result.retries += n
                else:
                    RETRY_LOG.add(url, n)

    def _close(self, work: _Work) -> None:
        with self._lock:
            if not work.closed:
                work.closed = True
                self.calls.closed()

    def _stage_done(self, work: _Work, s: int) -> None:
        if work.failed:
            return
        with self.events.phase("stage"):
            self.steps.finish_stage(work, s)
        mark_stage(work.out, s)
        self._start_stage(work, s + 1)

    def _finish_image(self, work: _Work) -> None:
        self.steps.finish_image(work)
        self._finish(work)

    def _finish(self, work: _Work) -> None:
        """The image's result, emitted in input order; the next image admitted."""
        with self._lock:
            if work.finished:
                return
            result = work.result
            result.retries += sum(RETRY_LOG.take(work.roots()).values())  # the driver's own, for this image
            work.finished = True
            self.works.remove(work)
            result.seconds = time.perf_counter() - work.t0
            if result.status == "ok" and work.first_call is not None and work.megapixels:
                result.megapixels_per_s = work.megapixels / max(work.last_result - work.first_call, 1e-9)
            self.results[work.position] = result
            self.in_flight -= 1
            self._close(work)
            if result.status == "failed" and self.plan.failure.fail_fast:
                log.error("failure.mode=fail_fast: stopping after %s", result.name)
                self.stop = True
            while self.emitted < len(self.results) and self.results[self.emitted] is not None:
                done = self.results[self.emitted]
                self.progress.end_image(done)
                self.on_image(done)
                self.emitted += 1
            self._admit()
            self._all_finished.notify_all()


def _background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: nice 19 for this thread and the threads it starts).

    The stage finishes and label pyramids built while blocks run then use only CPU the workers leave idle, and
    never slow a worker sharing the machine (this driver's node, or a laptop). Elsewhere a no-op.
    """
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError as err:  # not permitted in some sandboxes: run at normal priority
            log.debug("could not lower the driver threads' priority: %s", err)


class JobSteps:
    """The per-image steps of one job: its plan, where its Dask graphs run, who listens to its phases."""

    def __init__(self, plan: JobPlan, scheduler: Any, events: Events) -> None:
        self.plan, self.scheduler, self.events = plan, scheduler, events

    def prepare_image(self, work: _Work) -> None:
        """Resume check, pyramid (read in place or ingested), the framework's stages."""
        plan, result = self.plan, work.result
        try:
            work.out = out = plan.output.layout.image(work.ref.name)
            if check_resumable(out, plan.fingerprint, plan.output.if_exists) == "complete":
                state = read_state(out) or {}
                result.status = "skipped"
                result.shape = tuple(state.get("shape", ())) or None
                result.tiles = int(state.get("tiles", 0))
                return
            with self.events.phase("ingest"):
                work.source = source = self._source(work.ref)
                work.pyramid = pyramid = self._pyramid(source, out)
            h, w = pyramid.shapes[0]
            result.shape = (h, w)
            work.stages = plan.framework.stages(pyramid, out, plan.tiling, plan.num_classes)
            result.tiles = sum(len(st.grid) for st in work.stages if st.tiles)
            mark(out, fingerprint=plan.fingerprint, complete=False, shape=[h, w], tiles=result.tiles,
                 source=work.ref.url, in_place=pyramid.in_place, spatial=source.spatial.to_json())
        except Exception as err:
            work.fail(err)

    def _source(self, ref: ImageRef) -> ImageSource:
        inputs = self.plan.inputs
        return open_source(ref, inputs.storage_options, inputs.value_range, inputs.bands)

    def _pyramid(self, source: ImageSource, out: ImageOutput) -> Pyramid:
        """Level 0 read in place where it can be; the coarser levels the framework reads built (``prepare_pyramid``)."""
        levels = self.plan.framework.levels(len(level_shapes(source.shape_yx)))
        return prepare_pyramid(source, out.group_url, levels, chunk=self.plan.tiling.image_chunk,
                               storage_options=self.plan.output.storage_options, scheduler=self.scheduler)

    def stage_calls(self, work: _Work, s: int, progress: Progress) -> list[Call]:
        """The calls of stage ``s``'s blocks not done yet; the arrays they write created (or, resuming, opened)."""
        plan, stage, fw = self.plan, work.stages[s], self.plan.framework
        tiling = plan.tiling
        if not stage.tiles:  # a pass over stored arrays: blocks, no tiles
            selected = work.selected[s] = ()
        else:
            fw.prepare_stage(work.stages, s, self.scheduler)
            selected = work.selected[s] = fw.selected_tiles(work.stages, s, self.scheduler)
            if selected is not None:  # planned with every tile: count the ones that run
                work.result.tiles -= len(stage.grid) - len(selected)
        done = blocks_done(work.out, s)
        side = tiling.block_side(plan.num_classes)
        if s == len(work.stages) - 1:
            work.outputs = self._outputs(work, fresh=not done, side=side)
        sink = fw.stage_sink(work.stages, s, work.out, work.outputs, tiling.chunk, fresh=not done,
                             extras=tuple(plan.output.extras), side=side)
        subset = None if selected is None else frozenset(selected)
        owned = owned_counts(stage.grid, side, tiling.chunk, subset)
        blocks = plan_blocks(stage.grid.height, stage.grid.width, tiling.chunk, side)
        total = len(stage.grid) if subset is None else len(subset)
        n = len(work.stages)
        label = work.ref.name if n == 1 else f"{work.ref.name} [stage {s + 1}/{n}]"
        progress.start_image(label, total, sum(owned.get(b.index, 0) for b in blocks if b.name in done))
        return [Call(BlockTask(stage, b, tuple(block_tiles(stage.grid, b, subset, stage.halo)), sink,
                               owned.get(b.index, 0), tiling.batch, tiling.blend, tiling.sigma_scale, tiling.chunk),
                     (work, s)) for b in blocks if b.name not in done]

    def _outputs(self, work: _Work, fresh: bool, side: int) -> OutputArrays:
        """The masks and extras: created anew when no block of the last stage is done (no stale chunk of an
        interrupted run survives), else opened as they are; the blocks of ``side`` px make the label pyramid's
        levels they are aligned to (``label_pyramid.pyramid_levels``)."""
        plan, out = self.plan, work.out
        shapes = list(work.pyramid.shapes)
        kwargs = dict(label_name=plan.output.label_name, shapes=shapes, extras=list(plan.output.extras))
        spatial = work.source.spatial
        dtype = blend.labels_dtype(plan.num_classes)
        label = nodata_label(plan.num_classes, dtype, work.ref.url) if spatial.has_nodata else None
        if not fresh:
            outputs = open_outputs(out, **kwargs)
        else:
            outputs = create_outputs(out, class_names=list(plan.classes.names), class_colors=list(plan.classes.colors),
                                     chunk=plan.tiling.chunk, labels_dtype=dtype, spatial=spatial, nodata_label=label,
                                     **kwargs)
        levels = pyramid_levels(len(shapes), side, plan.tiling.chunk, *shapes[0])
        nodata = None
        if label is not None:
            reader, axes = level_reader(work.source, 0)
            nodata = Nodata(reader, axes, spatial, label)
        return replace(outputs, block_levels=levels, nodata=nodata)


    def finish_stage(self, work: _Work, s: int) -> None:
        """The framework's finish of stage ``s`` (MagNet's merge), once every block is in."""
        targets = self._audited(work, work.outputs) if s == len(work.stages) - 1 else None
        self.plan.framework.finish_stage(work.stages, s, work.out, targets, work.selected.get(s),
                                         self.plan.tiling.chunk, self.scheduler)

    def finish_image(self, work: _Work) -> None:
        """The label pyramid above the levels the blocks made, completion mark; the work area goes once the mask
        is complete. (Nodata the input states is in the labels already: the blocks write it, ``output.nodata``.)
        Resuming an image whose stages were all done (its driver died before the completion mark), the masks are
        opened as they are."""
        if work.outputs is None:
            work.outputs = self._outputs(work, fresh=False, side=self.plan.tiling.block_side(self.plan.num_classes))
        outputs = self._audited(work, work.outputs)
        n = self.plan.num_classes
        with self.events.phase("label pyramid"):
            for level in range(1 + outputs.block_levels, len(outputs.labels)):
                blend.downsample_labels(outputs.labels[level - 1], outputs.labels[level], n, self.scheduler)
        mark(work.out, complete=True)
        safe_remove_work(work.out)

    def _audited(self, work: _Work, outputs: OutputArrays) -> OutputArrays:
        """``outputs`` opened through an ``AuditStore`` that logs each chunk key the driver writes (``--audit-writes``)."""
        audit_dir = self.plan.pool.audit_dir
        if not audit_dir:
            return outputs
        store = AuditStore(zarr_store(work.out.group_url, work.out.storage_options),
                           os.path.join(audit_dir, "driver.log"), "driver", work.out.group_url)

        def reopen(a):
            return None if a is None else zarr.open_array(store=store, path=a.path, mode="r+")

        return replace(outputs, labels=[reopen(a) for a in outputs.labels], confidence=reopen(outputs.confidence),
                       probabilities=reopen(outputs.probabilities))


__all__ = ["Events", "ImageResult", "JobSteps", "NoEvents", "Progress", "list_images", "run_job"]
