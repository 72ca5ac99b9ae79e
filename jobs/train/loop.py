"""The Ray Train worker of ``gigaseg train``: one loop (optimiser, LR schedule, resume, epoch checkpoints,
progress, validation) for every training task, which differ only in the ``Trainee`` their module builds
(``jobs.train.tasks.TASKS``):

- ``segmenter``: the model of ``model.*`` on random multi-scale crops (``pipeline.training.crops.CropSampler``),
  checkpoints written with ``models.checkpoint.save_checkpoint``; with ``model.refine: pointrend`` a PointRend,
  with its own loss terms (``jobs.train.tasks.segmenter``).
- ``magnet_refiner``: MagNet's refiner with the segmenter of ``refiner.segmenter`` frozen
  (``jobs.train.tasks.magnet_refiner``).
- ``fctl``: a stage of FCtL's staged training (``jobs.train.tasks.fctl``): a context segmenter, or the fused model
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
from collections.abc import Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch

from jobs.train.common import all_sum, score, spec_loss
from jobs.train.contract import TrainPlan
from jobs.train.spec import TrainSpec
from jobs.train.store import CheckpointStore
from jobs.train.tasks import TASKS
from models.precise_bn import recalibrate_batchnorm

log = logging.getLogger(__name__)

PRECISE_BN_STREAM = 1_000_000  # sampler epoch key offset of the batches that recalibrate BatchNorm


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


def _send(events, event: dict) -> None:
    try:
        events.put_nowait(event)
    except Exception:  # noqa: BLE001 - progress is best effort (queue full or gone)
        pass


# ---------------------------------------------------------------- the loop


def train_worker(config: dict[str, Any]) -> None:
    spec = TrainSpec.model_validate(config["spec"])
    task = TASKS[spec.task]
    plan, events = TrainPlan.from_dict(config["plan"], task.read_model), config["events"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.workers.torch_threads)
    device = ray.train.torch.get_device()
    store = CheckpointStore(spec.output.url, spec.output.storage_options, weights=task.weights)
    latest = store.latest()
    weights, state = store.load_epoch(latest) if latest else (None, None)
    trainee = task.trainee(spec, plan, rank, device, weights)
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
        loss_total, n, *term_totals = all_sum([loss_sum, steps, *term_sums.values()])
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
                             {"model": plan.model.to_dict(), "class_names": plan.class_names, "metrics": metrics},
                             spec.output.keep_last)
            _send(events, {"kind": "epoch", "metrics": metrics})
        ray.train.report(metrics)  # a barrier: no worker starts the next epoch before the checkpoint exists
    if rank == 0:
        store.write(store.weights, trainee.weights(module))


__all__ = ["lr_factor", "train_worker"]
