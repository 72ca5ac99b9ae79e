"""``gigaseg train SPEC``: data-parallel training with Ray Train, resumable from per-epoch checkpoints.

Three tasks: ``segmenter`` (the default) trains ``model.*`` (with ``model.refine: pointrend``, a PointRend:
``jobs.train_pointrend``); ``magnet_refiner`` trains MagNet's refiner with the segmenter of ``refiner.segmenter``
frozen (``jobs.train_refiner``); ``fctl`` runs one stage of FCtL's staged training (``jobs.train_fctl``, whose
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
runs a ``TorchTrainer`` whose workers run ``jobs.train_loop.train_worker``; rank 0 writes the checkpoints
(``jobs.train_store.CheckpointStore``) and sends progress to the driver through a Ray queue.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from jobs.train_loop import Plan, init_weights, lr_factor, train_worker, weights_name
from jobs.train_spec import TrainSpec
from jobs.train_store import HISTORY, CheckpointStore, read_url
from pipeline.errors import CheckpointError, OutputConflictError

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # read when ray.train is first imported

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_SPEC = 0, 1, 2


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
    from pipeline.storage import join

    t0 = time.monotonic()
    spec = _absolute(spec)
    out = CheckpointStore(spec.output.url, spec.output.storage_options, weights=weights_name(spec))
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
    from pipeline.storage import is_local, local_path

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


def make_plan(spec: TrainSpec) -> Plan:
    """Check the spec against the dataset (and the checkpoints it names); ``SpecError`` lists every problem."""
    from jobs.spec import SpecError
    from pipeline.datasets import read_dataset

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
    if spec.task == "magnet_refiner":
        model, normalization = _refiner_model(spec, info, problems)
    elif spec.task == "fctl":
        from jobs.train_fctl import fctl_plan

        model, normalization = fctl_plan(spec, info, problems)
    else:
        model, normalization = _segmenter_model(spec, info, problems), info.normalization
    weights = _class_weights(spec, info, problems)
    if problems:
        raise SpecError("spec", problems)
    return Plan(
        model=model, class_names=list(info.class_names),
        class_colors=[list(c) for c in info.class_colors], normalization=normalization,
        ignore_index=info.ignore_index if spec.loss.ignore_index is None else spec.loss.ignore_index,
        train_names=train_names, val_names=val,
        exclude_classes=[info.class_names.index(c) for c in v.exclude_classes], class_weights=weights,
    )


def _class_weights(spec: TrainSpec, info, problems: list[str]) -> list[float] | None:
    """``loss.class_weights`` as one float per class of the dataset (None: unweighted)."""
    from models.losses import median_frequency_weights

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


def _segmenter_model(spec: TrainSpec, info, problems: list[str]) -> dict[str, Any]:
    """The ``ModelConfig`` dict of ``model.*`` (with ``refine``, the PointRend wrapped around it) for the dataset's
    classes, the init checkpoint checked."""
    from jobs.spec import SpecError
    from jobs.train_pointrend import model_config

    try:
        config = model_config(spec.model, info.num_classes)
    except ValueError as err:
        raise SpecError("spec", [*problems, str(err)]) from None
    if spec.model.init:
        try:
            init_weights(None, read_url(spec.model.init, spec.dataset.storage_options), config, info.class_names)
        except (CheckpointError, FileNotFoundError) as err:
            problems.append(f"model.init: {spec.model.init}: {err}")
    return config.to_dict()


def _refiner_model(spec: TrainSpec, info, problems: list[str]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The refiner's plan entry (the segmenter's hash in it, so a resume with another segmenter is refused)
    and the segmenter's normalisation, which both of its inputs get."""
    from models.checkpoint import read_info

    r = spec.refiner
    model = {"task": "magnet_refiner", "num_classes": info.num_classes, "width": r.width, "scales": r.scales,
             "residual": r.residual}
    try:
        data = read_url(r.segmenter, spec.dataset.storage_options)
        seg = read_info(data)
    except FileNotFoundError:
        problems.append(f"refiner.segmenter: {r.segmenter} does not exist; point it at the model.safetensors "
                        "of a finished `gigaseg train` run")
        return model, info.normalization
    except CheckpointError as err:
        problems.append(f"refiner.segmenter: {r.segmenter}: {err}")
        return model, info.normalization
    if tuple(seg.class_names) != tuple(info.class_names):
        problems.append(
            f"refiner.segmenter: {r.segmenter} predicts {list(seg.class_names)} but the dataset's classes are "
            f"{list(info.class_names)}; the refiner learns the dataset's masks from the segmenter's "
            "probabilities, so train it on a dataset with the segmenter's class table")
    return {**model, "segmenter_sha256": hashlib.sha256(data).hexdigest()}, seg.normalization.to_dict()


def _check_resumable(latest: dict | None, plan: Plan, url: str) -> None:
    if latest and (latest.get("model") != plan.model or latest.get("class_names") != plan.class_names):
        raise OutputConflictError(
            f"{url} holds checkpoints of another model or class table ({latest.get('model')}, "
            f"{latest.get('class_names')}); set output.if_exists: overwrite to replace them, or choose another "
            "output.url"
        )


def _run_trainer(spec: TrainSpec, plan: Plan, progress: bool) -> None:
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from pipeline.cluster import start_ray

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
            train_loop_config={"spec": spec.model_dump(mode="json"), "plan": asdict(plan), "events": events},
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
    from pipeline.storage import filesystem, fs_path, is_local, join

    url = join(spec.output.url, "_ray")
    if is_local(url):
        return {"storage_path": fs_path(url)}
    import pyarrow.fs

    fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem(url, spec.output.storage_options)))
    return {"storage_path": fs_path(url), "storage_filesystem": fs}


class ProgressWatcher(threading.Thread):
    """Shows rank 0's progress events: a one-line bar on a terminal, log lines otherwise."""

    def __init__(self, events, epochs: int, enabled: bool = True, stream=None, interval: float = 10.0):
        super().__init__(daemon=True)
        self.events, self.epochs, self.enabled = events, epochs, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval, self._last = interval, 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll(timeout=0.5)

    def poll(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout)
        except Exception:  # noqa: BLE001 - ray.util.queue.Empty, or the queue actor is gone
            return
        if self.enabled:
            self.show(event)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        while self.enabled and not self.events.empty():
            self.poll(timeout=0.1)
        if self.tty:
            self.stream.write("\r\033[K")

    def show(self, e: dict[str, Any]) -> None:
        if e["kind"] == "epoch":
            if self.tty:
                self.stream.write("\r\033[K")
            m = e["metrics"]
            shown = ("train_point_loss", "val_loss", "miou", "pixel_accuracy", "segmenter_miou")
            extra = "".join(f"  {k} {m[k]:.4f}" for k in shown if m.get(k) is not None)
            log.info("epoch %d/%d: train_loss %.4f%s  %.1f crops/s  %.1f s", m["epoch"], self.epochs,
                     m["train_loss"], extra, m["crops_per_s"], m["seconds"])
            return
        done, total = e["step"], e["steps"]
        eta = (total - done) * e["elapsed"] / done if done else float("nan")
        bar = "#" * int(24 * done / total) + "-" * (24 - int(24 * done / total))
        line = (f"epoch {e['epoch']}/{self.epochs} [{bar}] {done}/{total} steps  loss {e['loss']:.4f}  "
                f"{e['crops_per_s']:.1f} crops/s  ETA {eta:.0f} s")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif time.monotonic() - self._last >= self.interval:
            log.info(line)
            self._last = time.monotonic()


__all__ = ["CheckpointStore", "TrainResult", "init_weights", "lr_factor", "make_plan", "train"]
