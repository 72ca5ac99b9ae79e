"""Precise BatchNorm statistics (detectron2's PreciseBN): recompute the running mean and variance of a model's
BatchNorm layers from a few batches, after training and before the model is evaluated or saved.

Running statistics are an exponential average, ``r ← (1 − m)·r + m·batch``, started at mean 0 and variance 1.
After ``n`` steps the start still weighs ``(1 − m)^n``: 0.61 for MagNet's refiner (m = 0.01, as the
reference) after 50 steps, so at inference, when BatchNorm uses the running statistics, the refiner sees
inputs scaled and shifted by stale numbers and its output is wrong although its training loss fell. Here each
layer's statistics are reset and recomputed as the plain average over ``batches`` (``momentum = None``), with
the weights unchanged.

Only layers in training mode are touched: a module kept in eval mode on purpose (FCtL's frozen context
encoders) keeps its statistics. Under data parallelism each worker averages over its own batches and the
workers' results are averaged (all-reduce), so every copy of the model holds the same statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def recalibrate_batchnorm(module: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]) -> int:
    """Recompute the running statistics of ``module``'s BatchNorm layers in training mode from ``batches``
    (``forward(module, batch)`` runs one, without gradients). Returns the number of batches used (0: no
    layer to recalibrate or no batch; the statistics are then left as they were)."""
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    if not layers:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    n = 0
    with torch.no_grad():
        for batch in batches:
            forward(module, batch)
            n += 1
    for m, (momentum, mean, var, count) in zip(layers, saved, strict=True):
        m.momentum = momentum
        if n == 0:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
    if n and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            for m in layers:
                for stat in (m.running_mean, m.running_var):
                    torch.distributed.all_reduce(stat)
                    stat.div_(world)
    return n


__all__ = ["recalibrate_batchnorm"]
