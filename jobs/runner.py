"""From a validated spec to a finished job: plan it (``jobs.plan``), start Ray and Dask, run, report."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

import ray
import torch

from jobs.plan import ResolvedModel, job_plan, resolve_model
from jobs.progress import ProgressBar
from jobs.report import Report
from jobs.spec import JobSpec
from pipeline.engine import Events, ImageResult, NoEvents, list_images, run_job
from pipeline.errors import OutputUnwritableError, SpecError
from pipeline.output.layout import JobLayout
from pipeline.output.lease import Lease, acquire
from pipeline.plan import JobPlan, PoolPlan
from pipeline.retries import RETRY_LOG
from pipeline.workers.dask_cluster import ON_RAY, start_dask
from pipeline.workers.dispatch import WorkerPool
from pipeline.workers.ray_cluster import start_ray

log = logging.getLogger(__name__)

__all__ = ["JobWorkers", "ResolvedModel", "auto_workers", "check_resources", "embedded_resources", "hold_output",
           "job_plan", "resolve_model", "run_plan", "run_spec"]


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


def check_resources(pool: PoolPlan, have: dict[str, float] | None = None) -> None:
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

    def __init__(self, spec: JobSpec, plan: JobPlan, events: Events = NoEvents()) -> None:
        self.spec, self.plan, self.events = spec, plan, events
        self.keep_ray = spec.cluster.dask == ON_RAY  # Dask's workers live on Ray: Ray outlives the blend
        self.embedded = spec.cluster.address is None and not ray.is_initialized()
        self.pool_config = plan.pool
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
            with self.events.phase("ray start"):
                self.session = start_ray(self.spec.cluster.address, num_cpus=self.cpus, num_gpus=self.gpus)
            if not self.embedded:
                self._size(ray.cluster_resources())

    def start(self) -> WorkerPool:
        """Ray (if not up yet) and the pool; the actors load the model while the first image is prepared."""
        self.start_ray()
        with self.events.phase("actors"):
            self.pool = WorkerPool(self.plan.framework, self.plan.output.storage_options, self.pool_config)
        return self.pool

    def release(self) -> None:
        """Ask the actors where they ran, stop them, and stop Ray unless the blend needs it (once)."""
        with self._lock, self.events.phase("shutdown"):
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


def hold_output(spec: JobSpec, force: bool = False) -> Lease:
    """The output's lease for this driver (``pipeline.output.lease``), taken before anything is computed: a live
    driver on the same output is refused, and an output that cannot be written at all stops the job here."""
    layout = JobLayout(spec.output.url, dict(spec.output.storage_options))
    try:
        return acquire(layout, force=force)
    except OSError as err:
        if isinstance(err, FileExistsError):  # LeaseHeldError: another driver holds it
            raise
        raise OutputUnwritableError(
            f"{spec.output.url}: the output cannot be written, so nothing was run: {type(err).__name__}: {err}. "
            "Check output.url, its permissions and free space (and the bucket, for object stores)") from err


def run_spec(spec: JobSpec, *, progress: ProgressBar | None = None, audit_dir: str | None = None,
             events: Events = NoEvents(), force: bool = False) -> list[ImageResult]:
    """Run a job; returns one result per image attempted (report.json is kept current as they finish).
    ``events`` listens to the job's phases (``pipeline.engine.Events``); ``force`` takes the output over from
    another driver's lease (``gigaseg run --force``)."""
    RETRY_LOG.take()  # an earlier job's counts in this process are not this one's
    with hold_output(spec, force) as lease:
        with events.phase("model"):
            plan = job_plan(spec, resolve_model(spec), audit_dir)
        return run_plan(spec, plan, progress=progress, events=events, lease=lease)


def run_plan(spec: JobSpec, plan: JobPlan, *, progress: ProgressBar | None = None,
             events: Events = NoEvents(), lease: Lease | None = None) -> list[ImageResult]:
    """Run ``plan`` (``jobs.plan.job_plan`` of ``spec``; a benchmark may swap its framework for a null model)
    under ``lease`` (taken here when None)."""
    if lease is None:
        with hold_output(spec) as held:
            return run_plan(spec, plan, progress=progress, events=events, lease=held)
    refs = list_images(plan)
    log.info("%d image(s) under %s", len(refs), spec.inputs.url)
    workers = JobWorkers(spec, plan, events)
    dask_session = None
    try:
        if workers.keep_ray or not workers.embedded:
            workers.start_ray()
        dask_session = start_dask(spec.cluster.dask)
        plan = replace(plan, pool=workers.pool_config)
        workers.plan = plan
        report = Report(spec.output.url, dict(spec.output.storage_options), [x.name for x in refs],
                        spec.model_dump(mode="json"))
        try:
            results = run_job(plan, refs, workers.start, progress or ProgressBar(), on_image=report.add,
                              on_tiles_done=workers.release_in_background, scheduler=dask_session.scheduler,
                              events=events, stop_when=lambda: lease.lost is not None)
            lease.check()
            return results
        finally:
            report.job_retries += sum(RETRY_LOG.take().values())  # the job's files, the weights, the lease
            report.set_cluster(workers=workers.finish(), dask=dask_session.info())
    finally:
        workers.finish()
        if dask_session is not None:
            dask_session.stop()
        workers.stop_ray()
