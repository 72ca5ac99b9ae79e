"""PointRend through ``gigaseg train`` (REFERENCES.md, "PointRend"): task ``segmenter`` with ``model.refine:
pointrend`` trains ``models.pointrend.PointRend`` around the segmenter ``model.name`` names::

    task: segmenter
    dataset: {url: s3://bucket/ds}
    model:
      name: fpn_resnet18                 # a head that emits features (fpn, unet, segnet, deeplabv3, ocrnet)
      refine: pointrend
      init: s3://bucket/seg/model.safetensors   # optional: start from a trained plain segmenter
      # point_channels: 256, subdivision_steps: null (log2 of the head's stride), subdivision_points: 8192,
      # train_points: 2048, oversample_ratio: 3, importance_ratio: 0.75   (the reference's values)
    crops: {size: 512}
    output: {url: s3://bucket/pointrend}

- **Training points.** For each crop ``PointRend.forward_train`` draws ``oversample_ratio · train_points`` uniform
  candidates, keeps the ``importance_ratio · train_points`` most uncertain under the coarse logits and fills the
  rest uniformly (``models.pointrend.sample_training_points``). 2048 per crop is detectron2's value for its
  512 × 1024 Cityscapes crops; points are continuous, so small crops take as many (they just land closer).
- **Loss** = coarse term + point term, both with the ignore index: the coarse term is ``loss.name``'s loss (CE by
  default, the reference's; OHEM or focal when asked) on the coarse logits upsampled bilinearly to the crop; the
  point term is always CE of the point logits against the labels sampled nearest at the points (the reference's;
  OHEM's threshold and focal's γ are tuned on dense pixel maps, not on a few points biased toward boundaries).
  With CE the sum is ``models.pointrend.point_rend_loss``. Both terms go to the history as ``train_coarse_loss``
  and ``train_point_loss``. Auxiliary-head losses (``loss.aux_weight``, OCRNet) are not added.
- **Init.** ``model.init`` may be a plain segmenter checkpoint of the same architecture: its tensors seed the
  segmenter part (the point head starts fresh), so PointRend can be added to a trained segmenter; a PointRend
  checkpoint seeds both parts.
- **Validation** scores the model as ``gigaseg run`` runs it: eval ``forward``, subdivision up to the crop's
  resolution. The checkpoint is a gigaseg checkpoint whose config has ``refine: pointrend``: ``model.checkpoint``
  of ``gigaseg run``, nothing else to set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from jobs.train_spec import TrainModelSpec


def model_config(m: TrainModelSpec, num_classes: int):
    """The ``ModelConfig`` of ``model.*`` for ``num_classes`` classes; ValueError naming the ``model.*`` field
    at fault (``subdivision_steps`` is checked against the head's stride by building the model on meta)."""
    import torch

    from models import REFINE_FIELDS, ModelConfig, build_model

    from jobs.train_spec import POINTREND_DEFAULTS, POINTREND_OPTIONS

    # FCtL stages train a PointRend local model without a model section: the defaults then
    options = m.pointrend() or {k: POINTREND_DEFAULTS[k] for k in POINTREND_OPTIONS}
    try:
        config = ModelConfig(m.name, num_classes, width=m.width, output_stride=m.output_stride, refine=m.refine,
                             **{k: options[k] for k in REFINE_FIELDS if k in options})
    except ValueError as err:
        field = re.match(r"ModelConfig\.(\w+)", str(err))
        raise ValueError(f"model.{field.group(1) if field else 'name'}: {err}") from None
    if config.refine is not None:
        try:
            with torch.device("meta"):
                build_model(config)
        except ValueError as err:
            field = "subdivision_steps" if str(err).startswith("subdivision_steps") else "refine"
            raise ValueError(f"model.{field}: {err}") from None
    return config


def configure_training(model, m: TrainModelSpec) -> None:
    """Set a ``PointRend``'s training-point options from ``model.*`` (they are not part of its config: inference
    does not read them)."""
    from jobs.train_spec import POINTREND_DEFAULTS, POINTREND_OPTIONS

    # FCtL stages train a PointRend local model without a model section: the defaults then
    options = m.pointrend() or {k: POINTREND_DEFAULTS[k] for k in POINTREND_OPTIONS}
    model.train_points = options["train_points"]
    model.oversample = options["oversample_ratio"]
    model.importance = options["importance_ratio"]


def pointrend_loss_terms(coarse_loss: Callable, ignore_index: int,
                         weight: Sequence[float] | None = None) -> Callable[[Any, Any], dict[str, Any]]:
    """``(PointRendOutput, target (B, H, W)) → {"coarse_loss", "point_loss"}``, scalars to be summed: ``coarse_loss``
    of the coarse logits (B, K, h, w) upsampled bilinearly to (H, W), and ``point_ce`` of the point logits
    (with the same class ``weight`` as the coarse loss, if any)."""
    import torch
    import torch.nn.functional as F

    from models.pointrend import point_ce

    w = None if weight is None else torch.tensor(list(weight), dtype=torch.float32)

    def terms(out, target) -> dict[str, Any]:
        coarse = F.interpolate(out.coarse.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        return {"coarse_loss": coarse_loss(coarse, target), "point_loss": point_ce(out, target, ignore_index, w)}

    return terms


__all__ = ["configure_training", "model_config", "pointrend_loss_terms"]
