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

from models.checkpoint import read_info, seeded_checkpoint
from models.errors import CheckpointError
from models.fctl_checkpoint import is_fctl_checkpoint
from pipeline.errors import SpecError
from pipeline.frameworks.base import Framework, ModelSource, Resolution, StagePlan, TileInput, TileModel
from pipeline.output.layout import ImageOutput
from pipeline.plan import TilingPlan, WeightsRef
from pipeline.pyramid import Pyramid
from pipeline.workers.predictor import DeviceConfig, TilePredictor


def segmenter_resolution(source: ModelSource, framework: str) -> Resolution:
    """The plain gigaseg segmenter a ``segment`` (or MagNet) job runs: ``model.checkpoint``, or seeded weights of
    ``model.name``; an FCtL checkpoint is refused (it needs its context windows: ``model.framework: fctl``)."""
    if source.checkpoint is None:
        data = seeded_checkpoint(source.architecture, len(source.class_names), list(source.class_names),
                                 seed=source.seed, width=source.width)
        return Resolution(read_info(data), {"model": data})
    if is_fctl_checkpoint(source.checkpoint):
        raise SpecError("model.framework", [
            f"model.framework: {framework} but {source.checkpoint_url} holds an FCtL model (gigaseg train task fctl); "
            "set model.framework: fctl"])
    try:
        info = read_info(source.checkpoint)
    except CheckpointError as err:
        raise SpecError("model.checkpoint", [f"model.checkpoint: {source.checkpoint_url}: {err}"]) from None
    return Resolution(info, {"model": source.checkpoint})


def image_stage(index: int, pyramid: Pyramid, level: int, out: ImageOutput, tiling: TilingPlan, num_classes: int,
                inputs: tuple[TileInput, ...] = ()) -> StagePlan:
    """A stage whose tiles cover level ``level`` of ``pyramid`` on ``tiling``'s grid."""
    h, w = pyramid.shapes[level]
    return StagePlan(index=index, image=pyramid.level_ref(level), grid=tiling.grid(h, w),
                     maps_url=out.maps_url(index), num_classes=num_classes, storage_options=dict(out.storage_options),
                     inputs=inputs)


class SegmenterModel:
    """``TileModel`` of one segmenter: softmax probabilities of each tile."""

    def __init__(self, predictor: TilePredictor) -> None:
        self.predictor, self.runner, self.device = predictor, predictor.runner, predictor.device

    def __call__(self, stage: int, tiles: torch.Tensor, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        return self.predictor.probabilities(tiles)


@dataclass(frozen=True)
class Segment(Framework):
    model: WeightsRef

    name: ClassVar[str] = "segment"

    @classmethod
    def resolve(cls, options: Mapping[str, Any], source: ModelSource) -> Resolution:
        return segmenter_resolution(source, cls.name)

    @classmethod
    def build(cls, options: Mapping[str, Any], weights: Mapping[str, WeightsRef], resolution: Resolution) -> Segment:
        return cls(weights["model"])

    def fingerprint(self) -> dict[str, Any]:
        return {"framework": self.name, "checkpoint": self.model.sha256}

    def stages(self, pyramid: Pyramid, out: ImageOutput, tiling: TilingPlan, num_classes: int) -> list[StagePlan]:
        return [image_stage(0, pyramid, 0, out, tiling, num_classes)]

    def load(self, read: Callable[[str], bytes], device: DeviceConfig) -> TileModel:
        return SegmenterModel(TilePredictor(read(self.model.url), device))


__all__ = ["Segment", "SegmenterModel", "image_stage", "segmenter_resolution"]
