"""``gigaseg train SPEC``: data-parallel training with Ray Train, resumable from per-epoch checkpoints.

Output layout (any fsspec URL)::

    <out>/epoch-NNN/model.safetensors   gigaseg checkpoint: weights, config, classes, colours, normalisation
    <out>/epoch-NNN/state.pt            optimiser, scheduler, epoch, step, history (torch.save; read back
                                        with torch.load(weights_only=True): plain tensors and containers)
    <out>/latest.json                   the last complete epoch, written after its files: a killed run resumes
                                        from it, whatever else it left behind
    <out>/history.json, curves.png      metrics per epoch
    <out>/model.safetensors             the final weights, usable as ``model.checkpoint`` of ``gigaseg run``
    <out>/_ray/                         Ray Train's own run state

The driver checks the spec against the dataset, starts (or joins) Ray and runs a ``TorchTrainer``; every
worker builds the model, loads ``latest.json``'s checkpoint if there is one, wraps the model in DDP
(``prepare_model``) and trains on its own crops (``CropSampler`` seeded by rank and epoch). Rank 0 writes
the checkpoints and sends progress to the driver through a Ray queue.
"""

from __future__ import annotations

import io
import logging
import math
import os
import queue as queue_lib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from jobs.train_spec import TrainSpec, load_train_spec
from pipeline.errors import CheckpointError, GigasegError, OutputConflictError

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # read when ray.train is first imported

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_SPEC = 0, 1, 2
LATEST, HISTORY, CURVES, FINAL = "latest.json", "history.json", "curves.png", "model.safetensors"


@dataclass(frozen=True)
class Plan:
    """What the driver resolved from the spec and the dataset; workers get it as a dict."""

    model: dict[str, Any]
    class_names: list[str]
    class_colors: list[list[int]]
    normalization: dict[str, list[float]]
    ignore_index: int
    train_names: list[str]
    val_names: list[str]
    exclude_classes: list[int]


@dataclass(frozen=True)
class TrainResult:
    output_url: str
    model_url: str
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
    out = CheckpointStore(spec.output.url, spec.output.storage_options)
    plan = make_plan(spec)
    if spec.output.if_exists == "overwrite":
        out.clear()
    latest = out.latest()
    _check_resumable(latest, plan, spec.output.url)
    start = latest["epoch"] + 1 if latest else 1
    if start > spec.epochs and out.exists(FINAL):
        log.info("%s: all %d epochs done already", spec.output.url, latest["epoch"])
    else:
        if latest:
            log.info("resuming from epoch %d of %d (%s)", latest["epoch"], spec.epochs, spec.output.url)
        _run_trainer(spec, plan, progress)
    latest = out.latest() or {"epoch": 0}
    return TrainResult(spec.output.url, join(spec.output.url, FINAL), start, latest["epoch"],
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
    return TrainSpec.model_validate(data)


def make_plan(spec: TrainSpec) -> Plan:
    """Check the spec against the dataset (and the init checkpoint); ``SpecError`` lists every problem."""
    from jobs.spec import SpecError
    from models import ModelConfig
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
    try:
        config = ModelConfig(spec.model.name, info.num_classes, width=spec.model.width,
                             output_stride=spec.model.output_stride)
    except ValueError as err:
        raise SpecError("spec", [*problems, f"model: {err}"]) from None
    if spec.model.init:
        try:
            init_weights(None, _read_url(spec.model.init, spec.dataset.storage_options), config, info.class_names)
        except (CheckpointError, FileNotFoundError) as err:
            problems.append(f"model.init: {spec.model.init}: {err}")
    if problems:
        raise SpecError("spec", problems)
    return Plan(
        model=config.to_dict(), class_names=list(info.class_names),
        class_colors=[list(c) for c in info.class_colors], normalization=info.normalization,
        ignore_index=info.ignore_index if spec.loss.ignore_index is None else spec.loss.ignore_index,
        train_names=train_names, val_names=val,
        exclude_classes=[info.class_names.index(c) for c in v.exclude_classes],
    )


def _check_resumable(latest: dict | None, plan: Plan, url: str) -> None:
    if latest and (latest.get("model") != plan.model or latest.get("class_names") != plan.class_names):
        raise OutputConflictError(
            f"{url} holds checkpoints of another model or class table ({latest.get('model')}, "
            f"{latest.get('class_names')}); set output.if_exists: overwrite to replace them, or choose another "
            "output.url"
        )


def _read_url(url: str, storage_options: dict) -> bytes:
    from pipeline.storage import filesystem, fs_path

    return filesystem(url, storage_options).cat_file(fs_path(url))


def init_weights(model, data: bytes, config, class_names) -> str:
    """Check (and with ``model``, load) a fine-tuning checkpoint. With another class table, the tensors
    whose shape depends on the class count (the classifier, heads that emit logits) keep their fresh
    initialisation. Returns what was done, for the log."""
    from safetensors.torch import load as st_load

    from models.checkpoint import load_state_into, read_info

    info = read_info(data)
    theirs, ours = info.config, config
    if (theirs.name, theirs.width, theirs.output_stride, theirs.in_channels) != (
            ours.name, ours.width, ours.output_stride, ours.in_channels):
        raise CheckpointError(
            f"holds a {theirs.name!r} of width {theirs.width}, output stride {theirs.output_stride}; the spec asks "
            f"for {ours.name!r}, width {ours.width}, output stride {ours.output_stride}: set model.name/width/"
            "output_stride to the checkpoint's"
        )
    same = tuple(info.class_names) == tuple(class_names)
    if model is not None:
        state = st_load(data)
        if not same:
            head = _class_dependent(ours)
            state = {k: v for k, v in state.items() if k not in head}
        load_state_into(model, state, strict=same)
    return "all weights" if same else f"all but the class head ({list(info.class_names)} → {list(class_names)})"


def _class_dependent(config) -> set[str]:
    """State-dict keys whose shape changes with ``num_classes`` (shapes only, on the meta device)."""
    import dataclasses

    import torch

    from models import build_model

    with torch.device("meta"):
        a = build_model(config).state_dict()
        b = build_model(dataclasses.replace(config, num_classes=config.num_classes + 1)).state_dict()
    return {k for k in a if a[k].shape != b[k].shape}


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
            _train_worker,
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
            extra = "".join(f"  {k} {m[k]:.4f}" for k in ("val_loss", "miou", "pixel_accuracy")
                            if m.get(k) is not None)
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


# ---------------------------------------------------------------- checkpoints


class CheckpointStore:
    """The training output: epoch checkpoints, ``latest.json`` (written last), history, curves, final model."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        from pipeline.storage import filesystem

        self.url, self.storage_options = url, dict(storage_options or {})
        self.fs = filesystem(url, self.storage_options)

    def _path(self, rel: str) -> str:
        from pipeline.storage import fs_path, join

        return fs_path(join(self.url, rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def read(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(rel))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> dict | None:
        import json

        data = self.read(rel)
        return None if data is None else json.loads(data)

    def write(self, rel: str, data: bytes) -> None:
        """Temp file + rename locally, one PUT on object stores: a reader never sees half a file."""
        from pipeline.storage import is_local

        path = self._path(rel)
        if is_local(self.url):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(f"{path}.tmp", "wb") as f:
                f.write(data)
            os.replace(f"{path}.tmp", path)
        else:
            self.fs.pipe_file(path, data)

    def write_json(self, rel: str, data: dict) -> None:
        import json

        self.write(rel, json.dumps(_json_safe(data), indent=1).encode())

    def latest(self) -> dict | None:
        return self.read_json(LATEST)

    def epochs(self) -> list[int]:
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(""), detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(n[6:]) for n in names if n.startswith("epoch-") and n[6:].isdigit())

    def clear(self) -> None:
        for epoch in self.epochs():
            self.fs.rm(self._path(_epoch_dir(epoch)), recursive=True)
        for rel in (LATEST, HISTORY, CURVES, FINAL):
            if self.exists(rel):
                self.fs.rm(self._path(rel))

    def save_epoch(self, epoch: int, weights: bytes, state: dict, history: dict, info: dict, keep: int) -> None:
        """Epoch files, then history and curves, then ``latest.json``; older epochs past ``keep`` pruned."""
        import torch

        from models.curves import plot_curves

        buf = io.BytesIO()
        torch.save(state, buf)
        self.write(f"{_epoch_dir(epoch)}/{FINAL}", weights)
        self.write(f"{_epoch_dir(epoch)}/state.pt", buf.getvalue())
        self.write_json(HISTORY, history)
        self.write(CURVES, plot_curves(_panels(history)))
        self.write_json(LATEST, {"epoch": epoch, "dir": _epoch_dir(epoch), **info})
        for old in self.epochs():
            if keep and old <= epoch - keep:
                self.fs.rm(self._path(_epoch_dir(old)), recursive=True)

    def load_epoch(self, latest: dict) -> tuple[bytes, dict]:
        import torch

        weights, state = self.read(f"{latest['dir']}/{FINAL}"), self.read(f"{latest['dir']}/state.pt")
        if weights is None or state is None:
            raise CheckpointError(f"{self.url}/{latest['dir']} is incomplete although {LATEST} names it")
        return weights, torch.load(io.BytesIO(state), weights_only=True, map_location="cpu")


def _epoch_dir(epoch: int) -> str:
    return f"epoch-{epoch:03d}"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _panels(history: dict[str, list]) -> dict[str, dict[str, list]]:
    loss = {k: history[k] for k in ("train_loss", "val_loss") if k in history}
    scores = {k: history[k] for k in ("miou", "pixel_accuracy") if k in history}
    return {"loss": loss, "validation": scores}


# ---------------------------------------------------------------- workers


def lr_factor(step: int, total: int, name: str, power: float = 0.9, warmup: int = 0) -> float:
    """LR multiplier after ``step`` of ``total`` steps: linear warm-up ``step/warmup``, then with
    ``t = step / total``: poly ``(1 − t)^power``, cosine ``½(1 + cos πt)``, constant 1."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(step / max(total, 1), 1.0)
    if name == "poly":
        return (1.0 - t) ** power
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def _prefetch(batches: Iterator, depth: int = 2) -> Iterator:
    """Read the next batches in a thread while the current one trains."""
    q: queue_lib.Queue = queue_lib.Queue(maxsize=depth)
    done = object()

    def fill():
        try:
            for b in batches:
                q.put(b)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            q.put(err)
        q.put(done)

    threading.Thread(target=fill, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _all_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from models import ModelConfig, build_model
    from models.checkpoint import load_state_into, save_checkpoint
    from models.losses import LossConfig, build_loss
    from pipeline.crops import CropConfig, CropSampler
    from pipeline.datasets import TrainingDataset

    spec, plan, events = TrainSpec.model_validate(config["spec"]), Plan(**config["plan"]), config["events"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.workers.torch_threads)
    device = ray.train.torch.get_device()
    store = CheckpointStore(spec.output.url, spec.output.storage_options)
    model_config = ModelConfig.from_dict(plan.model)
    model = build_model(model_config, seed=spec.seed)
    latest, state = store.latest(), None
    if latest:
        weights, state = store.load_epoch(latest)
        load_state_into(model, weights)
    elif spec.model.init:
        done = init_weights(model, _read_url(spec.model.init, spec.dataset.storage_options), model_config,
                            plan.class_names)
        log.info("initialised from %s: %s", spec.model.init, done)
    model = ray.train.torch.prepare_model(model)
    module = model.module if hasattr(model, "module") else model
    o, s = spec.optimizer, spec.schedule
    if o.name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    steps = spec.crops.batches_per_epoch
    total = spec.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, s.name, s.power, s.warmup_steps))
    history: dict[str, list] = {}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
    loss_fn = build_loss(LossConfig(spec.loss.name, plan.ignore_index, spec.loss.threshold, spec.loss.min_kept,
                                    spec.loss.gamma))
    norm = plan.normalization
    mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1) * 255
    dataset = TrainingDataset(spec.dataset.url, spec.dataset.storage_options)
    crops = CropConfig(spec.crops.size, tuple(spec.crops.scales), spec.crops.batch_size, spec.augment.flips,
                       spec.augment.rot90)
    sampler = CropSampler(dataset, plan.train_names, crops, seed=spec.seed, rank=rank)

    def to_input(images: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(images).to(device).float() - mean) / std

    for epoch in range((latest or {"epoch": 0})["epoch"] + 1, spec.epochs + 1):
        model.train()
        t0 = last = time.monotonic()
        loss_sum = 0.0
        for step, (images, masks) in enumerate(_prefetch(sampler.batches(epoch, steps)), 1):
            loss = loss_fn(model(to_input(images)), torch.from_numpy(masks.astype(np.int64)).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
            now = time.monotonic()
            if rank == 0 and (now - last >= 1.0 or step == steps):
                last = now
                _send(events, {"kind": "step", "epoch": epoch, "step": step, "steps": steps,
                               "loss": loss_sum / step, "elapsed": now - t0,
                               "crops_per_s": step * crops.batch_size * world / (now - t0)})
        seconds = time.monotonic() - t0
        loss_total, n = _all_sum([loss_sum, steps])
        metrics = {"epoch": epoch, "train_loss": loss_total / n, "lr": scheduler.get_last_lr()[0],
                   "seconds": seconds, "crops_per_s": steps * crops.batch_size * world / seconds}
        if plan.val_names:
            metrics |= evaluate(module, dataset, plan, spec, to_input, rank, world, device)
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)
        if rank == 0:
            weights = save_checkpoint(None, module, model_config, plan.class_names, plan.class_colors, norm)
            state = {"epoch": epoch, "step": epoch * steps, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "history": history}
            store.save_epoch(epoch, weights, state, history,
                             {"model": plan.model, "class_names": plan.class_names, "metrics": metrics},
                             spec.output.keep_last)
            _send(events, {"kind": "epoch", "metrics": metrics})
        ray.train.report(metrics)  # a barrier: no worker starts the next epoch before the checkpoint exists
    if rank == 0:
        store.write(FINAL, save_checkpoint(None, module, model_config, plan.class_names, plan.class_colors, norm))


def _send(events, event: dict) -> None:
    try:
        events.put_nowait(event)
    except Exception:  # noqa: BLE001 - progress is best effort (queue full or gone)
        pass


def evaluate(module, dataset, plan: Plan, spec: TrainSpec, to_input, rank: int, world: int, device) -> dict:
    """Validation loss (CE), mIoU and pixel accuracy over whole held-out images at ``validation.scale``,
    windows split across ranks and confusion matrices summed with all-reduce."""
    import torch
    import torch.nn.functional as F

    from pipeline.crops import read_crop, validation_windows
    from pipeline.metrics import mean_iou, pixel_accuracy

    crop, k, ignore = spec.crops.size, len(plan.class_names), plan.ignore_index
    windows = [(name, level, w) for name in plan.val_names
               for level, w in validation_windows(dataset.shapes(name), crop, spec.dataset.validation.scale)]
    cm = torch.zeros(k * k, dtype=torch.float64)
    loss_sum = count = 0.0
    module.eval()
    mine = windows[rank::world]
    with torch.inference_mode():
        for i in range(0, len(mine), spec.crops.batch_size):
            pairs = [read_crop(dataset, n, lvl, w, crop) for n, lvl, w in mine[i : i + spec.crops.batch_size]]
            logits = module(to_input(np.stack([p[0] for p in pairs])))
            y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)).to(device)
            valid = y != ignore
            loss_sum += float(F.cross_entropy(logits, y, ignore_index=ignore, reduction="sum"))
            count += float(valid.sum())
            pred = logits.argmax(1)
            cm += torch.bincount((y[valid] * k + pred[valid]).cpu(), minlength=k * k).double()
    totals = _all_sum([loss_sum, count, *cm.tolist()])
    matrix = np.asarray(totals[2:]).reshape(k, k)
    return {"val_loss": totals[0] / totals[1] if totals[1] else float("nan"),
            "miou": mean_iou(matrix, exclude=plan.exclude_classes), "pixel_accuracy": pixel_accuracy(matrix)}


# ---------------------------------------------------------------- command line


def _print_problems(err) -> None:
    for line in err.problems:
        print(f"error: {err.source}: {line}", file=sys.stderr)


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on a Zarr training dataset (exit 0 ok, 1 failed, 2 bad spec)")
    p.add_argument("spec", help="training spec (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set workers.num_workers=4 (repeatable)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from jobs.spec import SpecError

    try:
        spec = load_train_spec(args.spec, args.set)
        result = train(spec)
    except SpecError as err:
        _print_problems(err)
        return EXIT_SPEC
    except GigasegError as err:
        print(f"error: {err}", file=sys.stderr)
        if getattr(args, "debug", False):
            raise
        return EXIT_SPEC if isinstance(err, (FileNotFoundError, OutputConflictError, CheckpointError)) else EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - a failed worker (ray.train.TrainingFailedError) and the like
        if getattr(args, "debug", False):
            raise
        print(f"error: training failed: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILED
    losses = result.history.get("train_loss") or [float("nan")]
    print(f"trained epochs {result.start_epoch}..{result.last_epoch} (last train_loss {losses[-1]:.4f}) in "
          f"{result.seconds:.0f} s\nmodel: {result.model_url}  curves: {result.output_url}/{CURVES}")
    return EXIT_OK


def add_import_parser(subparsers) -> None:
    p = subparsers.add_parser("import-pairs", help="build a Zarr training dataset from image/mask file pairs")
    p.add_argument("images", help="folder (URL) of the images")
    p.add_argument("out", help="dataset folder (URL) to create or add to")
    p.add_argument("--masks", default=None, help="folder of the masks (default: the images' folder)")
    p.add_argument("--image-pattern", default="{id}_sat.jpg", help="image file name with {id} (default %(default)s)")
    p.add_argument("--mask-pattern", default="{id}_mask.png", help="mask file name with {id} (default %(default)s)")
    p.add_argument("--palette", default=None, help="named class table of colour-coded masks, e.g. deepglobe")
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME[:R,G,B]",
                   help="a class, in id order (repeatable); colours needed for colour-coded masks")
    p.add_argument("--mask-kind", choices=["palette", "index"], default="palette",
                   help="colour-coded RGB masks, or masks of class ids")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--storage-options", default=None, help="fsspec options of the inputs, as JSON")
    p.add_argument("--out-storage-options", default=None, help="fsspec options of the output, as JSON")
    p.add_argument("--overwrite", action="store_true", help="re-import samples already there")
    p.set_defaults(func=cmd_import)


def _parse_classes(args) -> list:
    from pipeline.palette import get_palette

    if args.palette and args.classes:
        raise ValueError("give --palette or --class, not both")
    if args.palette:
        return list(get_palette(args.palette))
    if not args.classes:
        raise ValueError("name the classes: --palette NAME or --class NAME[:R,G,B] (repeated, in id order)")
    out = []
    for item in args.classes:
        name, _, rgb = item.partition(":")
        color = tuple(int(v) for v in rgb.split(",")) if rgb else None
        if color is not None and len(color) != 3:
            raise ValueError(f"--class {item!r}: the colour must be R,G,B")
        out.append((name, color))
    return out


def cmd_import(args) -> int:
    import json

    from pipeline.datasets import import_pairs

    try:
        classes = _parse_classes(args)
        so = json.loads(args.storage_options) if args.storage_options else None
        out_so = json.loads(args.out_storage_options) if args.out_storage_options else None
        info = import_pairs(args.images, args.out, masks_url=args.masks, image_pattern=args.image_pattern,
                            mask_pattern=args.mask_pattern, classes=classes, mask_kind=args.mask_kind,
                            ignore_index=args.ignore_index, chunk=args.chunk, storage_options=so,
                            out_storage_options=out_so, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # GigasegErrors are builtins too
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SPEC
    except GigasegError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    pixels = sum(info.class_pixels) or 1
    print(f"{args.out}: {len(info.images)} image(s), classes "
          + ", ".join(f"{n} {p / pixels:.1%}" for n, p in zip(info.class_names, info.class_pixels)))
    return EXIT_OK


__all__ = ["CheckpointStore", "TrainResult", "add_import_parser", "add_train_parser", "cmd_import", "cmd_train",
           "lr_factor", "make_plan", "train"]
