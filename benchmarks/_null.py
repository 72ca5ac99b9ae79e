"""A null model inside the real workers: everything of the job runs (reads, contexts, maps, the device blend,
sinks, writes, stage merges, the label pyramid) but the network, which is replaced by a per-pixel map of the tile
(a fixed 3 → C linear map of the normalised pixels, softmax), costing almost nothing and giving label maps with
the structure of the image, so the labels compress as real ones do.

``NullFramework(inner)`` wraps the job's framework (``job_plan(...).framework``) and changes only ``load``;
``jobs.runner.run_plan`` runs it. The workers import this module, so the benchmark puts the repository on
``PYTHONPATH`` before Ray starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.checkpoint import IMAGENET_NORMALIZATION
from pipeline.frameworks.base import Framework, Resolution
from pipeline.plan import WeightsRef
from pipeline.workers.predictor import DeviceConfig, DeviceRunner


class NullModel:
    """``TileModel`` of ``num_classes`` classes: softmax of a fixed per-pixel linear map of the tile."""

    def __init__(self, num_classes: int, device: DeviceConfig) -> None:
        self.runner = DeviceRunner(device, IMAGENET_NORMALIZATION)
        self.device = self.runner.device
        g = torch.Generator().manual_seed(0)
        self.weight = (torch.randn(num_classes, 3, generator=g) * 2).to(self.device)

    @torch.inference_mode()
    def __call__(self, stage: int, tiles: torch.Tensor, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        x = self.runner.input(tiles)
        return torch.softmax(torch.einsum("kc,bchw->bkhw", self.weight, x), dim=1)


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

    def selected_tiles(self, *args, **kwargs):
        return self.inner.selected_tiles(*args, **kwargs)

    def stage_sink(self, *args, **kwargs):
        return self.inner.stage_sink(*args, **kwargs)

    def finish_stage(self, *args, **kwargs):
        return self.inner.finish_stage(*args, **kwargs)

    def load(self, read: Callable[[str], bytes], device: DeviceConfig) -> NullModel:
        return NullModel(self.num_classes, device)
