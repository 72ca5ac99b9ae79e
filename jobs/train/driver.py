"""``gigaseg train SPEC``: data-parallel training with Ray Train, resumable from per-epoch checkpoints.

Three tasks, one module each in ``jobs.train.tasks``: ``segmenter`` (the default) trains ``model.*`` (with
``model.refine: pointrend``, a PointRend); ``magnet_refiner`` trains MagNet's refiner with the segmenter of
``refiner.segmenter`` frozen; ``fctl`` runs one stage of FCtL's staged training (``jobs.train.tasks.fctl``, whose
docstring gives the three commands). Output layout (any fsspec URL)::

    <out>/epoch-NNN/model.safetensors   gigaseg checkpoint: weights, config, classes, colours, normalisation
                                        (refiner.safetensors for the refiner: ``models.magnet.save_refiner``;
                                        an FCtL checkpoint for fctl stage fused: ``save_fctl``)
    <out>/epoch-NNN/state.pt            optimiser, scheduler, epoch, step, history (torch.save; read back
                                        with torch.load(weights_only=True): plain tensors and containers)
    <out>/latest.json                   the last complete epoch, written after its files: a killed run resumes
                                        from it, whatever else it left behind
    <out>/history.json, curves.png      metrics per epoch
    <out>/model.safetensors             the final weights, usable as ``model.checkpoint`` of ``gigaseg run``
    <out>/refiner.safetensors           (refiner task) usable as ``model.magnet.refiner`` of ``gigaseg run``
    <out>/_ray/                         Ray Train's own run state

The driver checks the spec against the dataset (and the checkpoints it names), starts (or joins) Ray and
runs a ``TorchTrainer`` whose workers run ``jobs.train.loop.train_worker``; rank 0 writes the checkpoints
(``jobs.train.store.CheckpointStore``) and sends progress to the driver through a Ray queue.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs
import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from jobs.progress import StatusLine, bar
from jobs.train.contract import TrainPlan
from jobs.train.loop import train_worker
from jobs.train.spec import TrainSpec
from jobs.train.store import HISTORY, CheckpointStore
from jobs.train.tasks import TASKS
from models.losses import median_frequency_weights
from pipeline.errors import OutputConflictError, SpecError
from pipeline.storage import filesystem, fs_path, is_local, join, local_path
from pipeline.training.datasets import read_dataset
from pipeline.workers.ray_cluster import start_ray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    output_url: str
    model_url: str  # the final weights: model.safetensors, or refiner.safetensors for the refiner
    start_epoch: int  # first epoch this call trained (epochs + 1 when there was nothing left)
    last_epoch: int
    history: dict[str, list]
    seconds: float


# ---------------------------------------------------------------- driver


def train(spec: TrainSpec, *, progress: bool = True) -> TrainResult:
    """Train as ``spec`` says, resuming from ``<output>/latest.json`` when it is there; see the module doc."""
    t0 = time.monotonic()
    spec = _absolute(spec)
    out = CheckpointStore(spec.output.url, spec.output.storage_options, weights=TASKS[spec.task].weights)
    plan = make_plan(spec)
    if plan.class_weights:
        log.info("class weights: %s", ", ".join(f"{n} {w:.2f}" for n, w in zip(plan.class_names, plan.class_weights)))
    if spec.output.if_exists == "overwrite":
        out.clear()
    latest = out.latest()
    _check_resumable(latest, plan, spec.output.url)
    start = latest["epoch"] + 1 if latest else 1
    if start > spec.epochs and out.exists(out.weights):
        log.info("%s: all %d epochs done already", spec.output.url, latest["epoch"])
    else:
        if latest:
            log.info("resuming from epoch %d of %d (%s)", latest["epoch"], spec.epochs, spec.output.url)
        _run_trainer(spec, plan, progress)
    latest = out.latest() or {"epoch": 0}
    return TrainResult(spec.output.url, join(spec.output.url, out.weights), start, latest["epoch"],
                       out.read_json(HISTORY) or {}, time.monotonic() - t0)


def _absolute(spec: TrainSpec) -> TrainSpec:
    """Local paths made absolute: Ray Train workers run in their own working directory."""
    def fix(url):
        return os.path.abspath(local_path(url)) if url and is_local(url) else url

    data = spec.model_dump()
    data["dataset"]["url"] = fix(spec.dataset.url)
    data["output"]["url"] = fix(spec.output.url)
    data["model"]["init"] = fix(spec.model.init)
    if spec.refiner:
        data["refiner"]["segmenter"] = fix(spec.refiner.segmenter)
    if spec.fctl:
        data["fctl"]["local"] = fix(spec.fctl.local)
        if spec.fctl.context_checkpoints:
            data["fctl"]["context_checkpoints"] = [fix(u) for u in spec.fctl.context_checkpoints]
    return TrainSpec.model_validate(data)


def make_plan(spec: TrainSpec) -> TrainPlan:
    """Check the spec against the dataset (and the checkpoints it names); ``SpecError`` lists every problem."""
    info = read_dataset(spec.dataset.url, spec.dataset.storage_options)
    v = spec.dataset.validation
    names = sorted(info.images)
    problems = []
    if v.names:
        unknown = sorted(set(v.names) - set(names))
        if unknown:
            problems.append(f"dataset.validation.names: {unknown} are not images of {info.url} ({names[:10]})")
        val = sorted(set(v.names) & set(names))
    elif v.fraction:
        order = np.random.default_rng(spec.seed).permutation(len(names))
        val = sorted(names[i] for i in order[: math.ceil(v.fraction * len(names))])
    else:
        val = []
    train_names = [n for n in names if n not in val]
    if not train_names:
        problems.append("dataset.validation: no image left to train on; hold out fewer images")
    bad = sorted(set(v.exclude_classes) - set(info.class_names))
    if bad:
        problems.append(f"dataset.validation.exclude_classes: {bad} are not classes ({list(info.class_names)})")
    model, normalization = TASKS[spec.task].plan(spec, info, problems)
    weights = _class_weights(spec, info, problems)
    if problems:
        raise SpecError("spec", problems)
    return TrainPlan(
        model=model, class_names=list(info.class_names),
        class_colors=[list(c) for c in info.class_colors], normalization=normalization,
        ignore_index=info.ignore_index if spec.loss.ignore_index is None else spec.loss.ignore_index,
        train_names=train_names, val_names=val,
        exclude_classes=[info.class_names.index(c) for c in v.exclude_classes], class_weights=weights,
    )


def _class_weights(spec: TrainSpec, info, problems: list[str]) -> list[float] | None:
    """``loss.class_weights`` as one float per class of the dataset (None: unweighted)."""
    w = spec.loss.class_weights
    if w == "none":
        return None
    if w == "median_frequency":
        if not any(info.class_pixels):
            problems.append(f"loss.class_weights: median_frequency needs class pixel counts and {info.url} has none; "
                            "re-import the dataset or give one weight per class")
            return None
        return median_frequency_weights(info.class_pixels)
    if len(w) != info.num_classes:
        problems.append(f"loss.class_weights: {len(w)} weight(s) for {info.num_classes} classes "
                        f"({list(info.class_names)}); give one per class, in that order")
        return None
    return [float(x) for x in w]


def _check_resumable(latest: dict | None, plan: TrainPlan, url: str) -> None:
    if latest and (latest.get("model") != plan.model.to_dict() or latest.get("class_names") != plan.class_names):
        raise OutputConflictError(
            f"{url} holds checkpoints of another model or class table ({latest.get('model')}, "
            f"{latest.get('class_names')}); set output.if_exists: overwrite to replace them, or choose another "
            "output.url"
        )


def _run_trainer(spec: TrainSpec, plan: TrainPlan, progress: bool) -> None:
    w = spec.workers
    local_gpus = torch.cuda.device_count() if w.use_gpu is not False else 0
    session = start_ray(spec.cluster.address, num_cpus=w.num_workers * w.cpus_per_worker, num_gpus=local_gpus)
    try:
        use_gpu = w.use_gpu
        if use_gpu == "auto":
            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = gpus >= w.num_workers and bool(spec.cluster.address or torch.cuda.is_available())
        log.info("training on %d worker(s), %s", w.num_workers, "GPU" if use_gpu else "CPU")
        events = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"spec": spec.model_dump(mode="json"), "plan": plan.to_dict(), "events": events},
            scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": w.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}", **_ray_storage(spec),
                                 failure_config=FailureConfig(max_failures=w.max_failures)),
        )
        watcher = ProgressWatcher(events, spec.epochs, enabled=progress)
        watcher.start()
        try:
            trainer.fit()
        finally:
            watcher.stop()
            ray.kill(events.actor)
    finally:
        session.stop()


def _ray_storage(spec: TrainSpec) -> dict[str, Any]:
    """Ray Train keeps its run state under ``<output>/_ray`` (through fsspec for object stores)."""
    url = join(spec.output.url, "_ray")
    if is_local(url):
        return {"storage_path": fs_path(url)}
    fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem(url, spec.output.storage_options)))
    return {"storage_path": fs_path(url), "storage_filesystem": fs}


class ProgressWatcher(threading.Thread):
    """Shows rank 0's progress events on a ``jobs.progress.StatusLine``, and a log line per epoch."""

    def __init__(self, events, epochs: int, enabled: bool = True, stream=None, interval: float = 10.0):
        super().__init__(daemon=True)
        self.events, self.epochs = events, epochs
        self.line = StatusLine(stream, interval, enabled, logger=log)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll(timeout=0.5)

    def poll(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout)
        except Exception:  # noqa: BLE001 - ray.util.queue.Empty, or the queue actor is gone
            return
        if self.line.enabled:
            self.show(event)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        while self.line.enabled and not self.events.empty():
            self.poll(timeout=0.1)
        self.line.clear()

    def show(self, e: dict[str, Any]) -> None:
        if e["kind"] == "epoch":
            self.line.clear()
            m = e["metrics"]
            shown = ("train_point_loss", "val_loss", "miou", "pixel_accuracy", "segmenter_miou")
            extra = "".join(f"  {k} {m[k]:.4f}" for k in shown if m.get(k) is not None)
            log.info("epoch %d/%d: train_loss %.4f%s  %.1f crops/s  %.1f s", m["epoch"], self.epochs,
                     m["train_loss"], extra, m["crops_per_s"], m["seconds"])
            return
        done, total = e["step"], e["steps"]
        eta = (total - done) * e["elapsed"] / done if done else float("nan")
        self.line.show(f"epoch {e['epoch']}/{self.epochs} {bar(done, total)} {done}/{total} steps  loss "
                       f"{e['loss']:.4f}  {e['crops_per_s']:.1f} crops/s  ETA {eta:.0f} s")


__all__ = ["TrainResult", "make_plan", "train"]
