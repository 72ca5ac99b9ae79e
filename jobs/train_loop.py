"""The Ray Train worker of ``gigaseg train``: one loop (optimiser, LR schedule, resume, epoch checkpoints,
progress, validation) for every training task, which differ only in a ``Trainee``:

- ``segmenter``: the model of ``model.*`` on random multi-scale crops (``pipeline.crops.CropSampler``),
  checkpoints written with ``models.checkpoint.save_checkpoint``; with ``model.refine: pointrend`` a PointRend,
  with its own loss terms (``jobs.train_pointrend``).
- ``magnet_refiner``: MagNet's refiner with the segmenter of ``refiner.segmenter`` frozen
  (``jobs.train_refiner``).
- ``fctl``: a stage of FCtL's staged training (``jobs.train_fctl``): a context segmenter, or the fused model
  with its context encoders frozen (only parameters that require gradients are optimised).

Every worker loads ``latest.json``'s checkpoint if there is one, wraps the model in DDP (``prepare_model``)
and trains on its own draws (seeded by rank and epoch); rank 0 writes the checkpoints and sends progress
events to the driver.
"""

from __future__ import annotations

import logging
import math
import queue as queue_lib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.train_spec import TrainSpec
from jobs.train_store import FINAL, REFINER_FINAL, CheckpointStore
from pipeline.errors import CheckpointError

log = logging.getLogger(__name__)

PRECISE_BN_STREAM = 1_000_000  # sampler epoch key offset of the batches that recalibrate BatchNorm


@dataclass(frozen=True)
class Plan:
    """What the driver resolved from the spec and the dataset; workers get it as a dict. ``model`` is the
    segmenter's ``ModelConfig`` dict, for the refiner ``{"task", "num_classes", "width", "scales",
    "segmenter_sha256"}``, for FCtL ``jobs.train_fctl.fctl_plan``'s; ``normalization`` is the dataset's, or
    the frozen segmenter's (the refiner), or the local checkpoint's (FCtL)."""

    model: dict[str, Any]
    class_names: list[str]
    class_colors: list[list[int]]
    normalization: dict[str, list[float]]
    ignore_index: int
    train_names: list[str]
    val_names: list[str]
    exclude_classes: list[int]
    class_weights: list[float] | None = None  # loss.class_weights resolved against the dataset


def weights_name(spec: TrainSpec) -> str:
    return REFINER_FINAL if spec.task == "magnet_refiner" else FINAL


def init_weights(model, data: bytes, config, class_names) -> str:
    """Check (and with ``model``, load) a fine-tuning checkpoint. With another class table, the tensors
    whose shape depends on the class count (the classifier, heads that emit logits, a point head) keep their
    fresh initialisation. A plain segmenter seeds the segmenter part of a PointRend (whose point head starts
    fresh), and a PointRend's segmenter part seeds a plain segmenter. Returns what was done, for the log."""
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
    fresh_points = ours.refine is not None and (theirs.refine, theirs.point_channels) != (ours.refine,
                                                                                          ours.point_channels)
    if model is not None:
        state = _rekey(st_load(data), theirs.refine, ours.refine)
        if not same:
            head = _class_dependent(ours)
            state = {k: v for k, v in state.items() if k not in head}
        if fresh_points:
            state = {k: v for k, v in state.items() if not k.startswith("point_head.")}
        load_state_into(model, state, strict=same and not fresh_points)
    left = [] if same else [f"the class head ({list(info.class_names)} → {list(class_names)})"]
    if fresh_points:
        left.append("the point head (starts fresh)")
    elif theirs.refine and not ours.refine:
        left.append("the checkpoint's point head (this model has none)")
    return "all weights" if not left else "all but " + " and ".join(left)


def _rekey(state: dict, theirs: str | None, ours: str | None) -> dict:
    """A checkpoint's tensors named as in our model: a plain segmenter's go under a PointRend's ``segmenter.``;
    of a PointRend's, a plain segmenter takes the ``segmenter.`` part."""
    if theirs == ours:
        return state
    if ours is not None:
        return {f"segmenter.{k}": v for k, v in state.items()}
    return {k.removeprefix("segmenter."): v for k, v in state.items() if k.startswith("segmenter.")}


def _class_dependent(config) -> set[str]:
    """State-dict keys whose shape changes with ``num_classes`` (shapes only, on the meta device)."""
    import dataclasses

    import torch

    from models import build_model

    with torch.device("meta"):
        a = build_model(config).state_dict()
        b = build_model(dataclasses.replace(config, num_classes=config.num_classes + 1)).state_dict()
    return {k for k in a if a[k].shape != b[k].shape}


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


def _send(events, event: dict) -> None:
    try:
        events.put_nowait(event)
    except Exception:  # noqa: BLE001 - progress is best effort (queue full or gone)
        pass


def shard_batches(items: list, rank: int, world: int, batch_size: int, read: Callable[[Any], tuple]) -> Iterator[tuple]:
    """This rank's share ``items[rank::world]`` in batches of ``batch_size``: ``read(item)`` gives a tuple of
    arrays, stacked position by position into ``(B, …)`` arrays."""
    mine = items[rank::world]
    for i in range(0, len(mine), batch_size):
        parts = [read(item) for item in mine[i : i + batch_size]]
        yield tuple(np.stack(p) for p in zip(*parts, strict=True))


def normalizer(normalization: dict, device):
    """uint8 ``(B, 3, H, W)`` numpy → normalised float tensor on ``device``: ``(x − 255·mean) / (255·std)``."""
    import torch

    mean = torch.tensor(normalization["mean"], device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(normalization["std"], device=device).view(1, -1, 1, 1) * 255
    return lambda images: (torch.from_numpy(images).to(device).float() - mean) / std


# ---------------------------------------------------------------- the loop


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    spec, plan, events = TrainSpec.model_validate(config["spec"]), Plan(**config["plan"]), config["events"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.workers.torch_threads)
    device = ray.train.torch.get_device()
    store = CheckpointStore(spec.output.url, spec.output.storage_options, weights=weights_name(spec))
    latest = store.latest()
    weights, state = store.load_epoch(latest) if latest else (None, None)
    from jobs.train_tasks import score, segmenter_trainee, spec_loss
    from models.precise_bn import recalibrate_batchnorm

    if spec.task == "fctl":
        from jobs.train_fctl import fctl_trainee as make
    elif spec.task == "magnet_refiner":
        from jobs.train_refiner import refiner_trainee as make
    else:
        make = segmenter_trainee
    trainee = make(spec, plan, rank, device, weights)
    model = ray.train.torch.prepare_model(trainee.model)
    module = model.module if hasattr(model, "module") else model
    o, s = spec.optimizer, spec.schedule
    params = [p for p in model.parameters() if p.requires_grad]  # FCtL's frozen context encoders left out
    if o.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    steps, batch = spec.crops.batches_per_epoch, spec.crops.batch_size
    total = spec.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, s.name, s.power, s.warmup_steps))
    history: dict[str, list] = {}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
    loss_fn = spec_loss(spec, plan)

    for epoch in range((latest or {"epoch": 0})["epoch"] + 1, spec.epochs + 1):
        model.train()
        t0 = last = time.monotonic()
        loss_sum, term_sums = 0.0, {}
        for step, item in enumerate(_prefetch(trainee.batches(epoch, steps)), 1):
            out, target = trainee.forward(model, item)
            if trainee.loss_terms is not None:
                terms = trainee.loss_terms(out, target)
                loss = sum(terms.values())
                for k, v in terms.items():
                    term_sums[k] = term_sums.get(k, 0.0) + v.item()
            elif isinstance(out, tuple):  # (logits, {aux name: logits}): heads with auxiliary outputs
                out, aux = out
                loss = loss_fn(out, target) + spec.loss.aux_weight * sum(loss_fn(a, target) for a in aux.values())
            else:
                loss = loss_fn(out, target)
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
                               "crops_per_s": step * batch * world / (now - t0)})
        if spec.precise_bn_batches:  # a stream of its own: the training draws stay as they were
            recalibrate_batchnorm(module, trainee.batches(PRECISE_BN_STREAM + epoch, spec.precise_bn_batches),
                                  trainee.forward)
        seconds = time.monotonic() - t0
        loss_total, n, *term_totals = _all_sum([loss_sum, steps, *term_sums.values()])
        metrics = {"epoch": epoch, "train_loss": loss_total / n,
                   **{f"train_{k}": t / n for k, t in zip(term_sums, term_totals)},
                   "lr": scheduler.get_last_lr()[0], "seconds": seconds, "crops_per_s": steps * batch * world / seconds}
        if plan.val_names:
            module.eval()
            with torch.inference_mode():
                metrics |= score(trainee.validation(module, rank, world), len(plan.class_names), plan.ignore_index,
                                 plan.exclude_classes, trainee.baseline)
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)
        if rank == 0:
            state = {"epoch": epoch, "step": epoch * steps, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "history": history}
            store.save_epoch(epoch, trainee.weights(module), state, history,
                             {"model": plan.model, "class_names": plan.class_names, "metrics": metrics},
                             spec.output.keep_last)
            _send(events, {"kind": "epoch", "metrics": metrics})
        ray.train.report(metrics)  # a barrier: no worker starts the next epoch before the checkpoint exists
    if rank == 0:
        store.write(store.weights, trainee.weights(module))


__all__ = ["Plan", "init_weights", "lr_factor", "normalizer", "shard_batches", "train_worker", "weights_name"]
