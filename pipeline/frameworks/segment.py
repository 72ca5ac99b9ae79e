"""Framework ``segment``: one stage at full resolution, each tile segmented on its own and the tiles blended.

The stage is a tile grid over pyramid level 0 (``pipeline.tiling``); a tile reads its image window and nothing
else, and the model is one gigaseg segmenter (any head, with or without PointRend) returning softmax
probabilities. The stage's blend is the output: each block writes its masks as its rows are blended.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.frameworks.base import Framework, ModelSource, Resolution, StagePlan, TileInput, TileModel
from pipeline.frameworks.segmenters import SegmenterRuntime, load_segmenter, resolve_segmenter
from pipeline.output.layout import ImageOutput
from pipeline.plan import TilingPlan, WeightsRef
from pipeline.pyramid import Pyramid
from pipeline.workers.predictor import DeviceConfig


def image_stage(index: int, pyramid: Pyramid, level: int, out: ImageOutput, tiling: TilingPlan, num_classes: int,
                inputs: tuple[TileInput, ...] = ()) -> StagePlan:
    """A stage whose tiles cover level ``level`` of ``pyramid`` on ``tiling``'s grid."""
    h, w = pyramid.shapes[level]
    return StagePlan(index=index, image=pyramid.level_ref(level), grid=tiling.grid(h, w),
                     maps_url=out.maps_url(index), num_classes=num_classes, storage_options=dict(out.storage_options),
                     inputs=inputs)


class SegmenterModel:
    """``TileModel`` of one segmenter (``segmenters.load_segmenter``): probabilities of each tile."""

    def __init__(self, predictor) -> None:
        self.predictor, self.runner, self.device = predictor, predictor.runner, predictor.device

    def __call__(self, stage: int, tiles: torch.Tensor, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        return self.predictor.probabilities(tiles)


@dataclass(frozen=True)
class Segment(Framework):
    model: WeightsRef
    runtime: SegmenterRuntime | None = None  # None: a gigaseg checkpoint

    name: ClassVar[str] = "segment"

    @classmethod
    def resolve(cls, options: Mapping[str, Any], source: ModelSource) -> Resolution:
        return resolve_segmenter(source, cls.name)

    @classmethod
    def build(cls, options: Mapping[str, Any], weights: Mapping[str, WeightsRef], resolution: Resolution) -> Segment:
        return cls(weights["model"], runtime_of(resolution))

    def fingerprint(self) -> dict[str, Any]:
        return {"framework": self.name, "checkpoint": self.model.sha256,
                **(self.runtime.fingerprint() if self.runtime else {})}

    def stages(self, pyramid: Pyramid, out: ImageOutput, tiling: TilingPlan, num_classes: int) -> list[StagePlan]:
        return [image_stage(0, pyramid, 0, out, tiling, num_classes)]

    def load(self, read: Callable[[str], bytes], device: DeviceConfig) -> TileModel:
        return SegmenterModel(load_segmenter(read(self.model.url), self.runtime or GIGASEG, device))


#: The runtime of a gigaseg checkpoint (its card is inside it).
GIGASEG = SegmenterRuntime("gigaseg", None)


def runtime_of(resolution: Resolution) -> SegmenterRuntime | None:
    """The segmenter's runtime for a model you bring; None for a gigaseg checkpoint (fingerprints unchanged)."""
    runtime = resolution.details.get("segmenter")
    return runtime if runtime is not None and runtime.kind != "gigaseg" else None


__all__ = ["GIGASEG", "Segment", "SegmenterModel", "image_stage", "runtime_of"]
