"""One job: discover images, ingest pyramids, run tiles on the worker pool, blend, write masks.

Images run one after another through one long-lived pool of actors (the model is loaded once per actor
for the whole job). An image that fails (unreadable, unsupported, a tile failing on every retry) is
reported and the job goes on, unless ``fail_fast``; what other images wrote is never touched.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zarr

from pipeline import blend, output, stages
from pipeline.dispatch import PoolConfig, WorkerPool, batches, call_size
from pipeline.errors import GigasegError
from pipeline.pyramid import Pyramid, ingest, pyramid_in_place
from pipeline.discover import ImageRef, discover
from pipeline.sources import open_source
from pipeline.storage import AuditStore, zarr_store
from pipeline.magnet import MagnetConfig
from pipeline.worker import BatchResult, StagePlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobConfig:
    input_url: str
    output_url: str
    checkpoint: bytes = field(repr=False)
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    patterns: tuple[str, ...] = ("**/*",)
    input_storage_options: dict[str, Any] = field(default_factory=dict)
    output_storage_options: dict[str, Any] = field(default_factory=dict)
    value_range: tuple[float, float] | None = None
    tile: int = 512
    overlap: int = 128
    batch: int = 8
    tiles_per_call: int | None = None  # None: dispatch.call_size
    blend_window: blend.BlendWindow = "gaussian"
    sigma_scale: float = 0.125
    offset: tuple[int, int] = (0, 0)
    margin: int = 64
    chunk: int = 1024
    image_chunk: int = 512
    extras: tuple[str, ...] = ()
    if_exists: str = "resume"
    label_name: str = "segmentation"
    pool: PoolConfig = PoolConfig()
    fail_fast: bool = False
    tile_retries: int = 2
    fingerprint: str = ""
    magnet: MagnetConfig | None = None
    refiner: bytes | None = field(default=None, repr=False)
    contexts: tuple[float, ...] = ()  # FCtL: context factors each tile reads around itself
    scheduler: Any = field(default="threads", repr=False)  # Dask: "threads" or a distributed.Client


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


def list_images(cfg: JobConfig) -> list[ImageRef]:
    return discover(cfg.input_url, cfg.patterns, cfg.input_storage_options)


def run_job(
    cfg: JobConfig,
    refs: list[ImageRef],
    pool: WorkerPool | Callable[[], WorkerPool],
    progress: Progress,
    on_image: Callable[[ImageResult], None] = lambda r: None,
    on_tiles_done: Callable[[], None] = lambda: None,
) -> list[ImageResult]:
    """Run every image through prepare → tiles → finish, overlapping the stages of neighbours.

    While image k's tiles run on the workers, image k+1 is prepared (opened, ingested), image k−1 is
    blended, and image k's finished bands are blended (``blend.BandBlend``), each in one driver thread, so
    the driver's CPU work hides behind the workers' (on a GPU cluster it would otherwise leave the GPUs
    idle). Results are reported in input order. With ``fail_fast`` images run one at a time, so nothing
    starts after the first failure.

    ``pool`` may be a function that starts the pool: it is called once the first image's preparation is
    under way, so starting the cluster overlaps it (if it raises, the error surfaces once that preparation
    ends). ``on_tiles_done`` is called once no tile is left to
    run, before the last blends are waited for, so the caller can release the workers meanwhile.
    """
    results: list[ImageResult] = []
    stop = False

    def emit(result: ImageResult) -> None:
        nonlocal stop
        results.append(result)
        progress.end_image(result)
        on_image(result)
        if result.status == "failed" and cfg.fail_fast:
            log.error("failure.mode=fail_fast: stopping after %s", result.name)
            stop = True

    upcoming = deque(refs)
    finishing: deque[Future] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="gigaseg-prepare") as prep, \
            ThreadPoolExecutor(1, thread_name_prefix="gigaseg-finish") as fin, \
            ThreadPoolExecutor(1, thread_name_prefix="gigaseg-bands", initializer=_background_priority) as bands:
        next_work = prep.submit(prepare_image, cfg, upcoming.popleft()) if upcoming else None
        if callable(pool):
            pool = pool()
        while next_work is not None and not stop:
            work = next_work.result()
            overlap = not cfg.fail_fast
            next_work = prep.submit(prepare_image, cfg, upcoming.popleft()) if upcoming and overlap else None
            if work.result.status == "ok":
                run_tiles(cfg, work, pool, progress, bands)
            finishing.append(fin.submit(finish_image, cfg, work))
            while finishing and (finishing[0].done() or not overlap):
                emit(finishing.popleft().result())
            if next_work is None and upcoming and not stop:
                next_work = prep.submit(prepare_image, cfg, upcoming.popleft())
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
    out: output.ImageOutput | None = None
    pyramid: Pyramid | None = None
    stages: list[StagePlan] = field(default_factory=list)
    megapixels: float = 0.0
    run_seconds: float = 0.0
    selected: dict[int, tuple | None] = field(default_factory=dict)  # MagNet-Fast: the tiles each stage ran
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


def prepare_image(cfg: JobConfig, ref: ImageRef) -> _Work:
    """Resume check, pyramid (ingest or in place), tile store, and the tiles still to run."""
    work = _Work(ref, ImageResult(name=ref.name, url=ref.url, status="ok"), time.perf_counter())
    result = work.result
    try:
        work.out = out = output.image_output(cfg.output_url, ref.name, cfg.output_storage_options)
        if output.check_resumable(out, cfg.fingerprint, cfg.if_exists) == "complete":
            state = output.read_state(out) or {}
            result.status = "skipped"
            result.shape = tuple(state.get("shape", ())) or None
            result.tiles = int(state.get("tiles", 0))
            return work
        work.pyramid = pyramid = _prepare_pyramid(cfg, ref, out)
        h, w = pyramid.shapes[0]
        result.shape = (h, w)
        work.stages = stages.stage_plans(cfg, out, pyramid)
        result.tiles = sum(len(st.grid) for st in work.stages)
        output.mark(out, fingerprint=cfg.fingerprint, complete=False, shape=[h, w], tiles=result.tiles,
                    source=ref.url, in_place=pyramid.in_place)
    except Exception as err:
        work.fail(err)
    return work


def run_tiles(cfg: JobConfig, work: _Work, pool: WorkerPool, progress: Progress, band_executor=None) -> None:
    """Run every stage's unfinished tiles on the pool, blending each stage before the next (a barrier:
    stage s+1 reads the map of stage s). The last stage is blended band by band as its tiles finish when
    its map is its own blend (one stage, FCtL) and ``band_executor`` is given; ``finish_image`` blends
    what is left (all of it for MagNet, whose last merge needs a threshold over the whole image)."""
    try:
        last = len(work.stages) - 1
        for s, stage in enumerate(work.stages):
            if s < last and stages.stage_map_complete(work.out, s):
                continue
            work.selected[s] = stages.selected_tiles(cfg, work.out, work.stages, s)
            if work.selected[s] is not None:  # planned with every tile: count the ones that run
                work.result.tiles -= len(stage.grid) - len(work.selected[s])
            streams = s == last and stage.previous is None and band_executor is not None
            _run_stage(cfg, work, pool, progress, s, stage, work.selected[s], band_executor if streams else None)
            if s < last:
                stages.store_stage_map(cfg, work.out, work.stages, s, work.selected[s])
    except Exception as err:
        work.fail(err)


def _run_stage(cfg: JobConfig, work: _Work, pool: WorkerPool, progress: Progress, s: int, stage: StagePlan,
               tiles=None, band_executor=None) -> None:
    """Run the stage's unfinished tiles (of ``tiles``, MagNet-Fast's choice; None: every tile)."""
    grid = stage.grid
    output.create_tile_store(stage.tiles_url, cfg.output_storage_options,
                             (grid.ny, grid.nx, stage.num_classes, grid.tile, grid.tile))
    done = output.finished_tiles(stage.tiles_url, cfg.output_storage_options)
    wanted = grid.indices() if tiles is None else list(tiles)
    todo = [t for t in wanted if t not in done]
    label = work.ref.name if len(work.stages) == 1 else f"{work.ref.name} [stage {s + 1}/{len(work.stages)}]"
    progress.start_image(label, len(wanted), len(wanted) - len(todo))
    if band_executor is not None:
        plan = stages.blend_plan(cfg, stage, tiles)
        work.bands = blend.BandBlend(plan, _targets(cfg, work), cfg.scheduler, band_executor, done)

    def on_result(r: BatchResult) -> None:
        work.megapixels += r.megapixels
        progress.advance(len(r.tiles), r.megapixels)
        if work.bands is not None:
            work.bands.tiles_done(r.tiles)

    t0 = time.perf_counter()
    per_call = cfg.tiles_per_call or call_size(len(todo), cfg.batch, pool.config.workers)
    outcome = pool.run(batches(stage, todo, cfg.batch, per_call), retries=cfg.tile_retries, on_result=on_result)
    work.run_seconds += time.perf_counter() - t0
    work.result.tiles_run += len(todo)
    work.result.tiles_retried += outcome.retried_tiles
    if outcome.failed:
        n = sum(len(b) for b in outcome.failed)
        raise GigasegError(f"{n} tile(s) failed after {cfg.tile_retries} retries: {outcome.error}")


def finish_image(cfg: JobConfig, work: _Work) -> ImageResult:
    """Blend, label pyramid, completion mark; the work area goes once the mask is complete."""
    result = work.result
    try:
        if result.status == "ok":
            _blend(cfg, work)
            output.mark(work.out, complete=True)
            output.safe_remove_work(work.out)
            result.megapixels_per_s = work.megapixels / work.run_seconds if work.megapixels else 0.0
        elif work.bands is not None:
            work.bands.settle()
    except Exception as err:
        work.fail(err)
        if work.bands is not None:
            work.bands.settle()
    result.seconds = time.perf_counter() - work.t0
    return result


def _prepare_pyramid(cfg: JobConfig, ref: ImageRef, out: output.ImageOutput) -> Pyramid:
    source = open_source(ref, cfg.input_storage_options, cfg.value_range)
    if source.has_pyramid:
        return pyramid_in_place(source)
    return ingest(source, out.group_url, chunk=cfg.image_chunk, storage_options=cfg.output_storage_options,
                  scheduler=cfg.scheduler)


def _targets(cfg: JobConfig, work: _Work) -> dict[str, zarr.Array]:
    """Create the masks and extras (recreated: no stale chunks of an interrupted blend survive); the
    level-0 arrays the blend writes."""
    out, pyramid = work.out, work.pyramid
    n = len(cfg.class_names)
    arrays = output.create_outputs(
        out,
        label_name=cfg.label_name,
        shapes=list(pyramid.shapes),
        class_names=list(cfg.class_names),
        class_colors=list(cfg.class_colors),
        chunk=cfg.chunk,
        extras=list(cfg.extras),
        labels_dtype=blend.labels_dtype(n),
    )
    if cfg.pool.audit_dir:
        arrays = {k: _audited(out, v, cfg.pool.audit_dir) for k, v in arrays.items()}
    work.arrays = arrays
    targets = {"labels": arrays["labels"][0]}
    targets.update({k: arrays[k] for k in ("confidence", "probabilities") if k in arrays})
    return targets


def _blend(cfg: JobConfig, work: _Work) -> None:
    """The last stage's probabilities into the masks, extras and label pyramid."""
    n = len(cfg.class_names)
    if work.bands is not None:
        work.bands.finish()
    else:
        targets = _targets(cfg, work)
        last = len(work.stages) - 1
        probs = stages.stage_probabilities(cfg, work.out, work.stages, last, work.selected.get(last))
        blend.store_outputs(probs, targets, n, cfg.scheduler)
    labels = work.arrays["labels"]
    for level in range(1, len(labels)):
        blend.downsample_labels(labels[level - 1], labels[level], n, cfg.scheduler)


def _audited(out: output.ImageOutput, arrays, audit_dir: str):
    """The same arrays opened through an ``AuditStore`` that logs each chunk key the blend writes."""
    store = AuditStore(zarr_store(out.group_url, out.storage_options), os.path.join(audit_dir, "blend.log"),
                       "blend", out.group_url)
    if isinstance(arrays, list):
        return [zarr.open_array(store=store, path=a.path, mode="r+") for a in arrays]
    return zarr.open_array(store=store, path=arrays.path, mode="r+")
