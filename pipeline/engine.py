"""One job: discover images, ingest pyramids, run tiles on the worker pool, blend, write masks.

Images run one after another through one long-lived pool of actors (the model is loaded once per actor
for the whole job). An image that fails (unreadable, unsupported, a tile failing on every retry) is
reported and the job goes on, unless ``fail_fast``; what other images wrote is never touched.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zarr

from pipeline import blend, output
from pipeline.dispatch import PoolConfig, WorkerPool, batches
from pipeline.errors import GigasegError
from pipeline.pyramid import Pyramid, ingest, pyramid_in_place
from pipeline.discover import ImageRef, discover
from pipeline.sources import open_source
from pipeline.storage import AuditStore, zarr_store
from pipeline.tiling import TileGrid
from pipeline.worker import ArrayRef, BatchResult, StagePlan

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
    pool: WorkerPool,
    progress: Progress,
    on_image: Callable[[ImageResult], None] = lambda r: None,
) -> list[ImageResult]:
    results = []
    for ref in refs:
        result = run_image(cfg, ref, pool, progress)
        results.append(result)
        progress.end_image(result)
        on_image(result)
        if result.status == "failed" and cfg.fail_fast:
            log.error("failure.mode=fail_fast: stopping after %s", ref.name)
            break
    return results


def run_image(cfg: JobConfig, ref: ImageRef, pool: WorkerPool, progress: Progress) -> ImageResult:
    t0 = time.perf_counter()
    out = output.image_output(cfg.output_url, ref.name, cfg.output_storage_options)
    result = ImageResult(name=ref.name, url=ref.url, status="ok")
    try:
        if output.check_resumable(out, cfg.fingerprint, cfg.if_exists) == "complete":
            state = output.read_state(out) or {}
            result.status = "skipped"
            result.shape = tuple(state.get("shape", ())) or None
            result.tiles = int(state.get("tiles", 0))
            return result
        pyramid = _prepare_pyramid(cfg, ref, out)
        h, w = pyramid.shapes[0]
        result.shape = (h, w)
        grid = TileGrid(h, w, cfg.tile, cfg.overlap, *cfg.offset, margin=cfg.margin)
        result.tiles = len(grid)
        output.mark(out, fingerprint=cfg.fingerprint, complete=False, shape=[h, w], tiles=len(grid),
                    source=ref.url, in_place=pyramid.in_place)
        stage = _stage_plan(cfg, out, pyramid, grid)
        output.create_tile_store(stage.tiles_url, cfg.output_storage_options,
                                 (grid.ny, grid.nx, len(cfg.class_names), cfg.tile, cfg.tile))
        done = output.finished_tiles(stage.tiles_url, cfg.output_storage_options)
        todo = [t for t in grid.indices() if t not in done]
        progress.start_image(ref.name, len(grid), len(grid) - len(todo))
        megapixels = 0.0

        def on_result(r: BatchResult) -> None:
            nonlocal megapixels
            megapixels += r.megapixels
            progress.advance(len(r.tiles), r.megapixels)

        run_t0 = time.perf_counter()
        outcome = pool.run(batches(stage, todo, cfg.batch), retries=cfg.tile_retries, on_result=on_result)
        result.tiles_run = len(todo)
        result.tiles_retried = outcome.retried_tiles
        if outcome.failed:
            n = sum(len(b) for b in outcome.failed)
            raise GigasegError(f"{n} tile(s) failed after {cfg.tile_retries} retries: {outcome.error}")
        run_seconds = time.perf_counter() - run_t0
        _blend(cfg, out, pyramid, grid, stage)
        output.mark(out, complete=True)
        output.safe_remove_work(out)
        result.megapixels_per_s = megapixels / run_seconds if megapixels else 0.0
    except Exception as err:  # one bad image never stops the others; the report says why
        result.status = "failed"
        result.error = str(err) if isinstance(err, GigasegError) else f"{type(err).__name__}: {err}".splitlines()[0]
        log.error("%s: %s", ref.url, result.error)
        log.debug("traceback for %s", ref.url, exc_info=True)
    finally:
        result.seconds = time.perf_counter() - t0
    return result


def _prepare_pyramid(cfg: JobConfig, ref: ImageRef, out: output.ImageOutput) -> Pyramid:
    source = open_source(ref, cfg.input_storage_options, cfg.value_range)
    if source.has_pyramid:
        return pyramid_in_place(source)
    return ingest(source, out.group_url, chunk=cfg.image_chunk, storage_options=cfg.output_storage_options)


def _stage_plan(cfg: JobConfig, out: output.ImageOutput, pyramid: Pyramid, grid: TileGrid) -> StagePlan:
    image = ArrayRef(
        group_url=pyramid.url,
        path=pyramid.paths[0],
        axes=pyramid.axes,
        shape_yx=pyramid.shapes[0],
        storage_options=dict(pyramid.storage_options),
        value_range=cfg.value_range if pyramid.in_place else None,
    )
    return StagePlan(
        image=image,
        grid=grid,
        tiles_url=output.join(out.work_url, "stage-0", "tiles"),
        num_classes=len(cfg.class_names),
        storage_options=dict(cfg.output_storage_options),
    )


def _blend(cfg: JobConfig, out: output.ImageOutput, pyramid: Pyramid, grid: TileGrid, stage: StagePlan) -> None:
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
    plan = blend.BlendPlan(
        grid=grid, tiles_url=stage.tiles_url, num_classes=n, window=cfg.blend_window,
        sigma_scale=cfg.sigma_scale, chunk=cfg.chunk, storage_options=cfg.output_storage_options,
    )
    if cfg.pool.audit_dir:
        arrays = {k: _audited(out, v, cfg.pool.audit_dir) for k, v in arrays.items()}
    targets = {"labels": arrays["labels"][0]}
    targets.update({k: arrays[k] for k in ("confidence", "probabilities") if k in arrays})
    blend.store_outputs(plan, targets)
    for level in range(1, len(arrays["labels"])):
        blend.downsample_labels(arrays["labels"][level - 1], arrays["labels"][level], n)


def _audited(out: output.ImageOutput, arrays, audit_dir: str):
    """The same arrays opened through an ``AuditStore`` that logs each chunk key the blend writes."""
    store = AuditStore(zarr_store(out.group_url, out.storage_options), os.path.join(audit_dir, "blend.log"),
                       "blend", out.group_url)
    if isinstance(arrays, list):
        return [zarr.open_array(store=store, path=a.path, mode="r+") for a in arrays]
    return zarr.open_array(store=store, path=arrays.path, mode="r+")
