"""From a validated spec to a finished job: resolve the model, start Ray, run, report."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, replace

import ray

from jobs.progress import ProgressBar
from jobs.report import Report
from jobs.spec import JobSpec, SpecError
from models.checkpoint import read_info, seeded_checkpoint
from models.fctl_checkpoint import is_fctl_checkpoint, read_fctl_info, seeded_fctl
from models.info import CheckpointInfo
from models.magnet import load_refiner, seeded_refiner
from pipeline.cluster import start_ray
from pipeline.dask_cluster import ON_RAY, start_dask
from pipeline.dispatch import PoolConfig, WorkerPool, placement_for
from pipeline.engine import ImageResult, JobConfig, list_images, run_job
from pipeline.magnet import MagnetConfig
from pipeline.errors import CheckpointError
from pipeline.output import WORK_DIR, default_colors, fingerprint
from pipeline.predictor import PredictorConfig
from pipeline.storage import filesystem, fs_path, join

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    checkpoint: bytes
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    refiner: bytes | None = None


def resolve_model(spec: JobSpec) -> ResolvedModel:
    """Checkpoint bytes and the class table: from ``model.checkpoint``, or a seeded init of ``model.name``.

    Class names and colours given in the spec override the checkpoint's, but their count must match it.
    """
    m = spec.model
    if m.checkpoint:
        try:
            with filesystem(m.checkpoint, spec.inputs.storage_options).open(fs_path(m.checkpoint), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise SpecError("model.checkpoint", [f"model.checkpoint: {m.checkpoint} does not exist"]) from None
        info = _checkpoint_info(spec, data)
        if m.name is not None and info.config.name != m.name:
            raise SpecError("model", [f"model.name: {m.name!r} but {m.checkpoint} holds a {info.config.name!r}; "
                                      f"set model.name: {info.config.name}"])
        names = info.class_names
        colors = info.class_colors
        if m.classes:
            if len(m.classes) != len(names):
                raise SpecError("model.classes", [
                    f"model.classes: {len(m.classes)} classes listed but {m.checkpoint} predicts "
                    f"{len(names)} ({', '.join(names)}); list {len(names)} or omit model.classes"])
            names = tuple(c.name for c in m.classes)
            if all(c.color for c in m.classes):
                colors = tuple(c.color for c in m.classes)
    else:
        names = tuple(c.name for c in m.classes)
        colors = tuple(c.color for c in m.classes) if all(c.color for c in m.classes) else None
        if m.framework == "fctl":
            data = seeded_fctl(m.architecture, len(names), list(names), contexts=tuple(m.fctl.contexts or (2.0, 4.0)),
                               seed=m.seed, width=m.width, gamma=m.fctl.gamma)
        else:
            data = seeded_checkpoint(m.architecture, len(names), list(names), seed=m.seed, width=m.width)
    refiner = _resolve_refiner(spec, len(names)) if m.framework == "magnet" else None
    return ResolvedModel(data, tuple(names), tuple(colors or default_colors(len(names))), refiner)


def _checkpoint_info(spec: JobSpec, data: bytes) -> CheckpointInfo:
    """The checkpoint's metadata, checked against ``model.framework`` (FCtL checkpoints are their own kind)."""
    m = spec.model
    fctl = is_fctl_checkpoint(data)
    if fctl != (m.framework == "fctl"):
        kind = "an FCtL model (gigaseg train task fctl)" if fctl else "a plain segmenter"
        fix = "set model.framework: fctl" if fctl else (
            "point model.checkpoint at the fused FCtL checkpoint of `gigaseg train` (task fctl), or drop it to run a "
            "seeded FCtL")
        raise SpecError("model.framework", [
            f"model.framework: {m.framework} but {m.checkpoint} holds {kind}; {fix}"])
    try:
        if not fctl:
            return read_info(data)
        info, config = read_fctl_info(data)
    except CheckpointError as err:
        raise SpecError("model.checkpoint", [f"model.checkpoint: {m.checkpoint}: {err}"]) from None
    if m.fctl.contexts is not None and tuple(m.fctl.contexts) != config.contexts:
        raise SpecError("model.fctl.contexts", [
            f"model.fctl.contexts: {m.fctl.contexts} but {m.checkpoint} was trained with contexts "
            f"{list(config.contexts)}; omit model.fctl.contexts or use those"])
    return info


def _resolve_refiner(spec: JobSpec, num_classes: int) -> bytes:
    mg = spec.model.magnet
    if mg.refiner is None:
        return seeded_refiner(num_classes, seed=mg.refiner_seed, width=mg.refiner_width)
    try:
        with filesystem(mg.refiner, spec.inputs.storage_options).open(fs_path(mg.refiner), "rb") as f:
            data = f.read()
        load_refiner(data, num_classes)  # fail now, naming the field, not in every worker
    except FileNotFoundError:
        raise SpecError("model.magnet.refiner", [f"model.magnet.refiner: {mg.refiner} does not exist"]) from None
    except CheckpointError as err:
        raise SpecError("model.magnet.refiner", [f"model.magnet.refiner: {mg.refiner}: {err}"]) from None
    return data


def job_config(spec: JobSpec, model: ResolvedModel, audit_dir: str | None = None) -> JobConfig:
    t, r = spec.tiling, spec.resources
    fp = fingerprint(
        checkpoint=hashlib.sha256(model.checkpoint).hexdigest(),
        classes=model.class_names,
        tiling=t.model_dump(mode="json", exclude={"batch", "tiles_per_call"}),
        value_range=spec.inputs.value_range,
        extras=sorted(spec.output.extras),
        label_name=spec.output.label_name,
        framework=spec.model.framework,
        magnet=spec.model.magnet.model_dump(mode="json", exclude={"refiner"}) if spec.model.framework == "magnet" else None,
        refiner=hashlib.sha256(model.refiner).hexdigest() if model.refiner else None,
    )
    return JobConfig(
        input_url=spec.inputs.url,
        output_url=spec.output.url,
        checkpoint=model.checkpoint,
        class_names=model.class_names,
        class_colors=model.class_colors,
        patterns=tuple(spec.inputs.patterns),
        input_storage_options=dict(spec.inputs.storage_options),
        output_storage_options=dict(spec.output.storage_options),
        value_range=spec.inputs.value_range,
        tile=t.tile,
        overlap=t.overlap,
        batch=t.batch,
        tiles_per_call=None if t.tiles_per_call == "auto" else t.tiles_per_call,
        blend_window=t.blend,
        sigma_scale=t.sigma_scale,
        offset=t.offset,
        margin=t.margin,
        chunk=t.chunk,
        image_chunk=t.image_chunk,
        extras=tuple(spec.output.extras),
        if_exists=spec.output.if_exists,
        label_name=spec.output.label_name,
        pool=PoolConfig(
            workers=r.workers if r.workers != "auto" else 1,  # auto: counted once Ray is up (run_spec)
            gpus_per_worker=r.gpus_per_worker,
            cpus_per_worker=r.cpus_per_worker,
            in_flight_per_worker=r.in_flight_per_worker,
            predictor=PredictorConfig(precision=spec.model.precision, torch_threads=r.torch_threads),
            audit_dir=audit_dir,
            placement=placement_for([spec.inputs.url, spec.output.url]),
        ),
        fail_fast=spec.failure.mode == "fail_fast",
        tile_retries=spec.failure.tile_retries,
        fingerprint=fp,
        magnet=_magnet_config(spec),
        refiner=model.refiner,
        contexts=read_fctl_info(model.checkpoint)[1].contexts if spec.model.framework == "fctl" else (),
    )


def _magnet_config(spec: JobSpec) -> MagnetConfig | None:
    if spec.model.framework != "magnet":
        return None
    mg = spec.model.magnet
    return MagnetConfig(scales=mg.scales, replace=mg.replace, median=mg.median, patches=mg.patches)


def stage_checkpoint(cfg: JobConfig, data: bytes, kind: str = "model") -> str:
    """Copy checkpoint bytes into the output store (once per content) and return their URL."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    url = join(cfg.output_url, WORK_DIR, f"{kind}-{digest}.safetensors")
    fs = filesystem(url, cfg.output_storage_options)
    if not fs.exists(fs_path(url)):
        fs.makedirs(fs_path(join(cfg.output_url, WORK_DIR)), exist_ok=True)
        with fs.open(fs_path(url), "wb") as f:
            f.write(data)
    return url


def embedded_resources(spec: JobSpec) -> tuple[float, float]:
    """(CPUs, logical GPUs) of the embedded local cluster this spec asks for.

    GPUs: ``cluster.local_gpus``, else ``workers × gpus_per_worker``; with ``workers: auto`` the CUDA
    devices present (at least one logical GPU, so a CPU machine runs one worker per logical GPU share).
    """
    r = spec.resources
    if r.workers == "auto":
        cpus = float(max(2, os.cpu_count() or 2))
        gpus = spec.cluster.local_gpus if spec.cluster.local_gpus is not None else max(1, _cuda_devices())
        return cpus, float(gpus)
    gpus = spec.cluster.local_gpus if spec.cluster.local_gpus is not None else r.workers * r.gpus_per_worker
    return max(2.0, r.workers * r.cpus_per_worker), float(gpus)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def auto_workers(spec: JobSpec, resources: dict[str, float]) -> int:
    """``workers: auto``: ``⌊GPUs / gpus_per_worker⌋`` of the cluster (``⌊CPUs / cpus_per_worker⌋`` when
    ``gpus_per_worker`` is 0), counted when the job starts; an int ``workers`` is returned as it is."""
    r = spec.resources
    if r.workers != "auto":
        return r.workers
    name, per = ("GPU", r.gpus_per_worker) if r.gpus_per_worker > 0 else ("CPU", r.cpus_per_worker)
    n = int(resources.get(name, 0) / per + 1e-9)
    if n < 1:
        raise SpecError("resources.workers", [
            f"resources.workers: auto found {resources.get(name, 0):g} {name}s on the Ray cluster, fewer than "
            f"one worker's {per:g}; start GPU nodes first (an autoscaler adds none until asked), or set "
            f"resources.workers to a number"])
    return n


def check_resources(pool: PoolConfig, have: dict[str, float] | None = None) -> None:
    """Refuse a pool the cluster cannot place, instead of waiting forever for its actors.

    ``have``: the cluster's resources (default: ask the running Ray cluster)."""
    have = ray.cluster_resources() if have is None else have
    for name, per_worker, field in (("GPU", pool.gpus_per_worker, "gpus_per_worker"),
                                    ("CPU", pool.cpus_per_worker, "cpus_per_worker")):
        need = pool.workers * per_worker
        if need > have.get(name, 0) + 1e-9:
            raise SpecError("resources", [
                f"resources: {pool.workers} workers × {field} {per_worker:g} = {need:g} {name}s but the Ray "
                f"cluster has {have.get(name, 0):g}; lower resources.workers or resources.{field}, or use a "
                f"larger cluster"])


class JobWorkers:
    """Ray and the worker pool of one job, started and released where they cost the least wall time.

    - The embedded local cluster's resources follow from the spec, so they are checked up front and Ray
      starts while the first image is prepared (``run_job`` calls ``start`` once that is under way): its
      start-up, about 3 s of process launches, overlaps the first ingest. Joining a running cluster is
      quick and is done up front, so a cluster that cannot place the pool is refused at once.
    - Once the last tile has run, ``release_in_background`` stops the actors and Ray in a thread while the
      last image is blended (about 1.4 s of waiting for processes to exit), unless the blend itself runs
      on Ray (``cluster.dask: ray``), which then stops after the blend.
    """

    def __init__(self, spec: JobSpec, cfg: JobConfig) -> None:
        self.spec, self.cfg = spec, cfg
        self.keep_ray = spec.cluster.dask == ON_RAY  # Dask's workers live on Ray: Ray outlives the blend
        self.embedded = spec.cluster.address is None and not ray.is_initialized()
        self.pool_config = cfg.pool
        self.session = None
        self.pool: WorkerPool | None = None
        self.workers_info: list[dict] = []
        self._releasing: threading.Thread | None = None
        self._lock = threading.Lock()
        self.cpus, self.gpus = embedded_resources(spec)
        if self.embedded:
            self._size({"CPU": float(max(1, int(round(self.cpus)))), "GPU": self.gpus})

    def _size(self, have: dict[str, float]) -> None:
        if self.spec.resources.workers == "auto":
            self.pool_config = replace(self.pool_config, workers=auto_workers(self.spec, have))
            log.info("resources.workers auto: %d workers", self.pool_config.workers)
        check_resources(self.pool_config, have)

    def start_ray(self) -> None:
        if self.session is None:
            self.session = start_ray(self.spec.cluster.address, num_cpus=self.cpus, num_gpus=self.gpus)
            if not self.embedded:
                self._size(ray.cluster_resources())

    def start(self) -> WorkerPool:
        """Ray (if not up yet) and the pool; the actors load the model while the first image is prepared."""
        self.start_ray()
        refiner_url = stage_checkpoint(self.cfg, self.cfg.refiner, "refiner") if self.cfg.refiner else None
        self.pool = WorkerPool(stage_checkpoint(self.cfg, self.cfg.checkpoint), self.cfg.output_storage_options,
                               self.pool_config, refiner_url)
        return self.pool

    def release(self) -> None:
        """Ask the actors where they ran, stop them, and stop Ray unless the blend needs it (once)."""
        with self._lock:
            if self.pool is not None:
                self.workers_info = self.pool.info()
                for info in self.workers_info:
                    log.info("worker %s ran on %s, GPU ids %s", info["worker"], info["device"], info["gpu_ids"])
                self.pool.shutdown()
                self.pool = None
            if not self.keep_ray:
                self.stop_ray()

    def release_in_background(self) -> None:
        if self._releasing is None:
            self._releasing = threading.Thread(target=self.release, name="gigaseg-release", daemon=True)
            self._releasing.start()

    def finish(self) -> list[dict]:
        """Wait for (or do) the release; where the workers ran, for the report."""
        if self._releasing is not None:
            self._releasing.join()
        self.release()
        return self.workers_info

    def stop_ray(self) -> None:
        if self.session is not None:
            self.session.stop()
            self.session = None


def run_spec(spec: JobSpec, *, progress: ProgressBar | None = None, audit_dir: str | None = None) -> list[ImageResult]:
    """Run a job; returns one result per image attempted (report.json is kept current as they finish)."""
    model = resolve_model(spec)
    cfg = job_config(spec, model, audit_dir)
    refs = list_images(cfg)
    log.info("%d image(s) under %s", len(refs), spec.inputs.url)
    workers = JobWorkers(spec, cfg)
    dask_session = None
    try:
        if workers.keep_ray or not workers.embedded:
            workers.start_ray()
        dask_session = start_dask(spec.cluster.dask)
        cfg = replace(cfg, scheduler=dask_session.scheduler, pool=workers.pool_config)
        workers.cfg = cfg
        report = Report(spec.output.url, dict(spec.output.storage_options), [x.name for x in refs],
                        spec.model_dump(mode="json"))
        try:
            return run_job(cfg, refs, workers.start, progress or ProgressBar(), on_image=report.add,
                           on_tiles_done=workers.release_in_background)
        finally:
            report.set_cluster(workers=workers.finish(), dask=dask_session.info())
    finally:
        workers.finish()
        if dask_session is not None:
            dask_session.stop()
        workers.stop_ray()
