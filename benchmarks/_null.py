"""A null model inside the real workers: everything of the job runs (reads, contexts, maps, the device blend,
sinks, writes, stage merges, the label pyramid) but the network, which is replaced by a per-pixel map of the tile
(``NullModel``: one-hot classes from the red channel's top bits), costing about what its output's memory costs
and giving label maps with the structure of the image, so the labels compress as real ones do.

``NullFramework(inner)`` wraps the job's framework (``job_plan(...).framework``) and changes only ``load``;
``jobs.runner.run_plan`` runs it. The workers import this module, so the benchmark puts the repository on
``PYTHONPATH`` before Ray starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.checkpoint import IMAGENET_NORMALIZATION
from pipeline.frameworks.base import Framework, Resolution
from pipeline.plan import WeightsRef
from pipeline.workers.predictor import DeviceConfig, DeviceRunner


class NullModel:
    """``TileModel`` of ``num_classes`` classes costing about what writing its output costs: each pixel's class is
    its red value's top bits (``(r >> 5) mod C``: regions with the image's structure, so labels compress as real
    ones do), returned as one-hot probabilities ``(B, C, T, T)`` float32; blending them gives soft values where
    tiles overlap. The earlier null model (a 3 → C linear map and a softmax, 0.12 CPU-s per output MP here) was
    itself most of a CPU job's time, which made time-proportional overheads (Ray's polling) look per-pixel."""

    def __init__(self, num_classes: int, device: DeviceConfig) -> None:
        self.runner = DeviceRunner(device, IMAGENET_NORMALIZATION)
        self.device = self.runner.device
        self.num_classes = num_classes

    @torch.inference_mode()
    def __call__(self, stage: int, tiles: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        k = (tiles[:, 0] >> 5).long() % self.num_classes  # (B, T, T)
        out = torch.zeros((tiles.shape[0], self.num_classes, *tiles.shape[2:]), device=tiles.device)
        return out.scatter_(1, k[:, None], 1.0)


@dataclass(frozen=True)
class NullFramework(Framework):
    """``inner``'s stages, tile inputs, sinks and finishes, with the null model."""

    inner: Framework
    num_classes: int

    name = "null"

    @classmethod
    def resolve(cls, options: Mapping[str, Any], source) -> Resolution:
        raise NotImplementedError("wrap a resolved framework: NullFramework(plan.framework, classes)")

    @classmethod
    def build(cls, options, weights: Mapping[str, WeightsRef], resolution) -> Framework:
        raise NotImplementedError("wrap a built framework: NullFramework(plan.framework, classes)")

    def fingerprint(self) -> dict[str, Any]:
        return {**self.inner.fingerprint(), "model": "null"}

    def levels(self, n_levels: int) -> set[int]:
        return self.inner.levels(n_levels)

    def stages(self, *args, **kwargs):
        return self.inner.stages(*args, **kwargs)

    def prepare_stage(self, *args, **kwargs):
        return self.inner.prepare_stage(*args, **kwargs)

    def selected_tiles(self, *args, **kwargs):
        return self.inner.selected_tiles(*args, **kwargs)

    def stage_sink(self, *args, **kwargs):
        return self.inner.stage_sink(*args, **kwargs)

    def finish_stage(self, *args, **kwargs):
        return self.inner.finish_stage(*args, **kwargs)

    def load(self, read: Callable[[str], bytes], device: DeviceConfig) -> NullModel:
        return NullModel(self.num_classes, device)
