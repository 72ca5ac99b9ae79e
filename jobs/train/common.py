"""Pieces every training task and the loop share: input normalisation, a rank's share of validation items, the
spec's loss, and the validation scores (summed over the data-parallel ranks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from jobs.train.contract import TrainPlan
from jobs.train.spec import TrainSpec
from models.losses import LossConfig, build_loss
from pipeline.evaluation.metrics import mean_iou, pixel_accuracy


def normalizer(normalization: dict, device):
    """uint8 ``(B, 3, H, W)`` numpy → normalised float tensor on ``device``: ``(x − 255·mean) / (255·std)``."""
    mean = torch.tensor(normalization["mean"], device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(normalization["std"], device=device).view(1, -1, 1, 1) * 255
    return lambda images: (torch.from_numpy(images).to(device).float() - mean) / std


def shard_batches(items: list, rank: int, world: int, batch_size: int, read: Callable[[Any], tuple]) -> Iterator[tuple]:
    """This rank's share ``items[rank::world]`` in batches of ``batch_size``: ``read(item)`` gives a tuple of
    arrays, stacked position by position into ``(B, …)`` arrays."""
    mine = items[rank::world]
    for i in range(0, len(mine), batch_size):
        parts = [read(item) for item in mine[i : i + batch_size]]
        yield tuple(np.stack(p) for p in zip(*parts, strict=True))


def all_sum(values: list[float]) -> list[float]:
    """``values`` summed over the data-parallel ranks (as they are without a process group)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def spec_loss(spec: TrainSpec, plan: TrainPlan):
    """The loss module ``loss.*`` names, with the plan's ignore index and class weights."""
    c = spec.loss
    return build_loss(LossConfig(c.name, plan.ignore_index, c.threshold, c.min_kept, c.gamma, plan.class_weights))


def score(items: Iterable, k: int, ignore: int, exclude: list[int], baseline: bool = False) -> dict:
    """Validation loss (CE), mIoU and pixel accuracy of ``(logits, target, baseline)`` items, confusion
    matrices summed over ranks with all-reduce; ``segmenter_miou`` of the baseline's argmax when asked."""
    cms = torch.zeros(2, k * k, dtype=torch.float64)
    loss_sum = count = 0.0
    for logits, y, base in items:
        valid = y != ignore
        loss_sum += float(F.cross_entropy(logits.float(), y, ignore_index=ignore, reduction="sum"))
        count += float(valid.sum())
        for i, pred in enumerate([logits] + ([base] if baseline else [])):
            cms[i] += torch.bincount((y[valid] * k + pred.argmax(1)[valid]).cpu(), minlength=k * k).double()
    totals = all_sum([loss_sum, count, *cms.flatten().tolist()])
    matrices = np.asarray(totals[2:]).reshape(2, k, k)
    out = {"val_loss": totals[0] / totals[1] if totals[1] else float("nan"),
           "miou": mean_iou(matrices[0], exclude=exclude), "pixel_accuracy": pixel_accuracy(matrices[0])}
    if baseline:
        out["segmenter_miou"] = mean_iou(matrices[1], exclude=exclude)
    return out


__all__ = ["all_sum", "normalizer", "score", "shard_batches", "spec_loss"]
