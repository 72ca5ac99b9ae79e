"""Segmentation losses: cross entropy, OHEM cross entropy and focal loss, all with an ignore index.

Every loss takes logits ``(B, K, H, W)`` float and targets ``(B, H, W)`` int64 (class ids, or
``ignore_index`` for pixels that must not count) and returns a scalar mean over the pixels it keeps; a
batch with no pixel left returns 0 (connected to the graph, so ``backward`` still works).

Class weights ``w`` (optional, one per class) make that mean ``Σ w_{y_i} · l_i / Σ w_{y_i}`` over the kept
pixels, as torch's ``cross_entropy(weight=…)`` averages; OHEM still picks its pixels by the unweighted
probability of the true class. ``median_frequency_weights`` gives the usual choice for rare classes.

``LOSSES`` maps a name to its class; ``build_loss(config)`` is the only place a ``LossConfig`` becomes
constructor arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _pixel_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel CE ``(N,)`` of the valid pixels and their mask ``(B·H·W,)``: ``−log softmax(z)[y]``."""
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits (B, K, H, W) and targets (B, H, W), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    losses = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none").reshape(-1)
    valid = target.reshape(-1) != ignore_index
    return losses[valid], valid


def _mean(values: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ wᵢ·vᵢ / Σ wᵢ`` (plain mean without weights). An all-ignored batch: 0 that still depends on the
    logits, so DDP sees a gradient for every parameter."""
    if not values.numel():
        return logits.sum() * 0.0
    if weights is None:
        return values.mean()
    return (weights * values).sum() / weights.sum().clamp(min=torch.finfo(values.dtype).tiny)


def median_frequency_weights(class_pixels: Sequence[int]) -> list[float]:
    """Median frequency balancing (Eigen & Fergus 2015): ``w_c = median(f) / f_c`` with ``f_c`` class c's share
    of the labelled pixels and the median over the classes present; a class with no pixel gets 1.

    Rare classes (roads, buildings) weigh more, so a short training does not learn to ignore them."""
    total = float(sum(class_pixels))
    if total <= 0:
        raise ValueError("median frequency weights need class pixel counts; the dataset has none")
    freq = [p / total for p in class_pixels]
    present = sorted(f for f in freq if f > 0)
    mid = len(present) // 2
    median = present[mid] if len(present) % 2 else 0.5 * (present[mid - 1] + present[mid])
    return [median / f if f > 0 else 1.0 for f in freq]


class _Weighted(nn.Module):
    """Holds the ignore index and the optional class weights; ``_weights(target, valid)`` per kept pixel."""

    def __init__(self, ignore_index: int, weight: Sequence[float] | None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        if weight is not None and (not len(weight) or min(weight) < 0):
            raise ValueError(f"class weights must be a non-empty list of numbers ≥ 0, got {list(weight)}")
        self.register_buffer("weight", None if weight is None else torch.tensor(list(weight), dtype=torch.float32),
                             persistent=False)

    def _weights(self, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        if self.weight is None:
            return None
        ids = target.reshape(-1)[valid]
        if ids.numel() and int(ids.max()) >= self.weight.numel():
            raise ValueError(f"target holds class {int(ids.max())} but only {self.weight.numel()} class weights "
                             "were given: give one weight per class")
        return self.weight.to(ids.device)[ids]


class CrossEntropyLoss(_Weighted):
    """``mean over valid pixels of −log p(y)``, ``p = softmax(logits)`` (class-weighted: module docstring)."""

    def __init__(self, ignore_index: int = 255, weight: Sequence[float] | None = None) -> None:
        super().__init__(ignore_index, weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses, valid = _pixel_ce(logits, target, self.ignore_index)
        return _mean(losses, logits, self._weights(target, valid))


class OhemCrossEntropyLoss(_Weighted):
    """Online hard example mining CE, as HRNet's ``OhemCrossEntropy`` that MagNet's refiner trains with.

    With ``p_i`` the softmax probability of pixel i's true class and ``p_(k)`` the k-th smallest over the
    valid pixels (0-based), ``t = max(p_(min(min_kept, n−1)), threshold)``; the loss is the mean CE of the
    pixels with ``p_i < t``. So every pixel the model is less than ``threshold`` sure of counts, and at
    least about ``min_kept`` of the hardest pixels count when fewer than that are unsure.
    """

    def __init__(self, ignore_index: int = 255, threshold: float = 0.7, min_kept: int = 100_000,
                 weight: Sequence[float] | None = None) -> None:
        super().__init__(ignore_index, weight)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"OHEM threshold must be in (0, 1], got {threshold}")
        if min_kept < 1:
            raise ValueError(f"OHEM min_kept must be ≥ 1, got {min_kept}")
        self.threshold, self.min_kept = threshold, min_kept

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses, valid = _pixel_ce(logits, target, self.ignore_index)
        if not losses.numel():
            return _mean(losses, logits)
        with torch.no_grad():
            p_true = torch.exp(-losses)  # softmax probability of the true class
            kth = torch.kthvalue(p_true, min(self.min_kept, p_true.numel() - 1) + 1).values
            t = torch.clamp(kth, min=self.threshold)
        weights = self._weights(target, valid)
        hard = p_true < t
        return _mean(losses[hard], logits, None if weights is None else weights[hard])


class FocalLoss(_Weighted):
    """Focal loss (Lin et al. 2017) as FCtL uses it: ``mean over valid pixels of −(1 − p)^γ · log p``.

    ``p`` is the softmax probability of the true class; ``γ = 0`` is plain cross entropy.
    """

    def __init__(self, ignore_index: int = 255, gamma: float = 3.0, weight: Sequence[float] | None = None) -> None:
        super().__init__(ignore_index, weight)
        if gamma < 0:
            raise ValueError(f"focal gamma must be ≥ 0, got {gamma}")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses, valid = _pixel_ce(logits, target, self.ignore_index)
        p = torch.exp(-losses)
        return _mean((1.0 - p).pow(self.gamma) * losses, logits, self._weights(target, valid))


LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropyLoss,
    "ohem": OhemCrossEntropyLoss,
    "focal": FocalLoss,
}

# The LossConfig options each loss takes besides ignore_index.
_OPTIONS: dict[str, tuple[str, ...]] = {"ce": (), "ohem": ("threshold", "min_kept"), "focal": ("gamma",)}


@dataclass(frozen=True)
class LossConfig:
    """A loss by name with its options; options a loss does not take are ignored by it."""

    name: str = "ce"
    ignore_index: int = 255
    threshold: float = 0.7  # ohem
    min_kept: int = 100_000  # ohem
    gamma: float = 3.0  # focal
    weight: tuple[float, ...] | None = None  # one per class, every loss

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"unknown loss {self.name!r}; valid names: {', '.join(sorted(LOSSES))}")
        if self.weight is not None:
            object.__setattr__(self, "weight", tuple(float(w) for w in self.weight))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown LossConfig keys {unknown}; valid keys: {', '.join(sorted(fields))}")
        return cls(**data)


def build_loss(config: LossConfig | Mapping[str, Any]) -> nn.Module:
    """The loss module ``config`` names, with only the options that loss takes."""
    if not isinstance(config, LossConfig):
        config = LossConfig.from_dict(config)
    options = {k: getattr(config, k) for k in _OPTIONS[config.name]}
    return LOSSES[config.name](ignore_index=config.ignore_index, weight=config.weight, **options)


__all__ = ["LOSSES", "CrossEntropyLoss", "FocalLoss", "LossConfig", "OhemCrossEntropyLoss", "build_loss",
           "median_frequency_weights"]
