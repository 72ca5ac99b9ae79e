"""Task ``segmenter``: the model of ``model.*`` on random multi-scale crops (``pipeline.training.crops``), plain
or with PointRend's point head around it (``model.refine: pointrend``).

PointRend (Kirillov et al., CVPR 2020; facebookresearch/detectron2, ``projects/PointRend``) trains
``models.pointrend.PointRend`` around the segmenter ``model.name`` names::

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
  checkpoint seeds both parts. It may also be ImageNet encoder weights: a torchvision ResNet file
  (``resnet50-*.pth``, read with ``torch.load(weights_only=True)``) or the encoder checkpoint
  ``gigaseg import-checkpoint --from torchvision-resnet`` makes of one; they seed the encoder (of the same
  ResNet and width 64), the head starts fresh, and crops are normalised as the encoder was trained (ImageNet's
  mean and std) instead of with the dataset's statistics.
- **Validation** scores the model as ``gigaseg run`` runs it: eval ``forward``, subdivision up to the crop's
  resolution. The checkpoint is a gigaseg checkpoint whose config has ``refine: pointrend``: ``model.checkpoint``
  of ``gigaseg run``, nothing else to set.

``image_mask_trainee`` (a segmenter trained on image/mask pairs from any sampler) is shared with FCtL's context
stage (``jobs.train.tasks.fctl``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load

from jobs.train.common import normalizer, shard_batches, spec_loss
from jobs.train.contract import Task, Trainee, TrainPlan
from jobs.train.spec import POINTREND_DEFAULTS, POINTREND_OPTIONS, TrainModelSpec, TrainSpec
from models import ARCHITECTURES, POINT_HEAD_FIELDS, ModelConfig, build_model
from models.checkpoint import load_state_into, read_info, save_checkpoint
from models.encoder_checkpoint import EncoderWeights, describe, encoder_weights
from models.errors import CheckpointError
from models.heads.dupsampling import DUpsamplingHead, fit_dupsampling
from models.pointrend import point_ce
from pipeline.errors import SpecError
from pipeline.storage import read_bytes
from pipeline.training.crops import CropConfig, CropSampler, read_crop, validation_windows
from pipeline.training.datasets import TrainingDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmenterModel:
    """The plan's model section of task segmenter: the ``ModelConfig`` (a PointRend's, with ``refine``)."""

    config: ModelConfig

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmenterModel:
        return cls(ModelConfig.from_dict(data))


# ---------------------------------------------------------------- plan (driver)


def plan(spec: TrainSpec, info, problems: list[str]) -> tuple[SegmenterModel, dict[str, list[float]]]:
    """The ``ModelConfig`` of ``model.*`` for the dataset's classes, the init checkpoint checked."""
    try:
        config = model_config(spec.model, info.num_classes)
    except ValueError as err:
        raise SpecError("spec", [*problems, str(err)]) from None
    normalization = info.normalization
    if spec.model.init:
        try:
            data = read_bytes(spec.model.init, spec.dataset.storage_options)
            encoder = encoder_weights(data, spec.model.init)
            if encoder is None:
                init_weights(None, data, config, info.class_names)
            else:  # features learnt on inputs normalised so: keep feeding them so
                _init_encoder(None, encoder, config)
                normalization = encoder.normalization.to_dict()
        except (CheckpointError, FileNotFoundError) as err:
            problems.append(f"model.init: {spec.model.init}: {err}")
    return SegmenterModel(config), normalization


def model_config(m: TrainModelSpec, num_classes: int) -> ModelConfig:
    """The ``ModelConfig`` of ``model.*`` for ``num_classes`` classes; ValueError naming the ``model.*`` field
    at fault (``subdivision_steps`` is checked against the head's stride by building the model on meta)."""
    options = _pointrend_options(m)
    try:
        config = ModelConfig(m.name, num_classes, width=m.width, output_stride=m.output_stride, refine=m.refine,
                             **{k: options[k] for k in POINT_HEAD_FIELDS if k in options})
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


def _pointrend_options(m: TrainModelSpec) -> dict[str, Any]:
    # FCtL stages train a PointRend local model without a model section: the defaults then
    return m.pointrend() or {k: POINTREND_DEFAULTS[k] for k in POINTREND_OPTIONS}


def init_weights(model, data: bytes, config: ModelConfig, class_names) -> str:
    """Check (and with ``model``, load) a fine-tuning checkpoint. With another class table, the tensors
    whose shape depends on the class count (the classifier, heads that emit logits, a point head) keep their
    fresh initialisation. A plain segmenter seeds the segmenter part of a PointRend (whose point head starts
    fresh), and a PointRend's segmenter part seeds a plain segmenter. Encoder weights (an encoder checkpoint of
    ``gigaseg import-checkpoint --from torchvision-resnet``, or a torchvision ResNet file itself) seed the encoder
    only. Returns what was done, for the log."""
    encoder = encoder_weights(data, "model.init")
    if encoder is not None:
        return _init_encoder(model, encoder, config)
    info = read_info(data)
    theirs, ours = info.config, config
    if not theirs.same_architecture(ours):
        raise CheckpointError(
            f"holds a {theirs.name!r} of width {theirs.width}, output stride {theirs.output_stride}; the spec asks "
            f"for {ours.name!r}, width {ours.width}, output stride {ours.output_stride}: set model.name/width/"
            "output_stride to the checkpoint's")
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


def _init_encoder(model, encoder: EncoderWeights, config: ModelConfig) -> str:
    """Check (and with ``model``, load strictly) encoder weights into the model's encoder; the head starts fresh."""
    ours = ARCHITECTURES[config.name][0]
    if (encoder.encoder, encoder.width) != (ours, config.width):
        raise CheckpointError(
            f"holds the encoder of a {encoder.encoder} of width {encoder.width}, but {config.name!r} of width "
            f"{config.width} has a {ours}: set model.name to a {encoder.encoder} architecture (e.g. "
            f"fpn_{encoder.encoder}) and model.width to {encoder.width}")
    if model is not None:
        load_state_into(getattr(model, "segmenter", model).encoder, encoder.state)
    return f"the encoder ({describe(encoder)}); the head starts fresh"


def _rekey(state: dict, theirs: str | None, ours: str | None) -> dict:
    """A checkpoint's tensors named as in our model: a plain segmenter's go under a PointRend's ``segmenter.``;
    of a PointRend's, a plain segmenter takes the ``segmenter.`` part."""
    if theirs == ours:
        return state
    if ours is not None:
        return {f"segmenter.{k}": v for k, v in state.items()}
    return {k.removeprefix("segmenter."): v for k, v in state.items() if k.startswith("segmenter.")}


def _class_dependent(config: ModelConfig) -> set[str]:
    """State-dict keys whose shape changes with ``num_classes`` (shapes only, on the meta device)."""
    with torch.device("meta"):
        a = build_model(config).state_dict()
        b = build_model(dataclasses.replace(config, num_classes=config.num_classes + 1)).state_dict()
    return {k for k in a if a[k].shape != b[k].shape}


# ---------------------------------------------------------------- PointRend's training options and loss


def configure_training(model, m: TrainModelSpec) -> None:
    """Set a ``PointRend``'s training-point options from ``model.*`` (they are not part of its config: inference
    does not read them)."""
    options = _pointrend_options(m)
    model.train_points = options["train_points"]
    model.oversample = options["oversample_ratio"]
    model.importance = options["importance_ratio"]


def pointrend_loss_terms(coarse_loss: Callable, ignore_index: int,
                         weight: Sequence[float] | None = None) -> Callable[[Any, Any], dict[str, Any]]:
    """``(PointRendOutput, target (B, H, W)) → {"coarse_loss", "point_loss"}``, scalars to be summed: ``coarse_loss``
    of the coarse logits (B, K, h, w) upsampled bilinearly to (H, W), and ``point_ce`` of the point logits
    (with the same class ``weight`` as the coarse loss, if any)."""
    w = None if weight is None else torch.tensor(list(weight), dtype=torch.float32)

    def terms(out, target) -> dict[str, Any]:
        coarse = F.interpolate(out.coarse.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        return {"coarse_loss": coarse_loss(coarse, target), "point_loss": point_ce(out, target, ignore_index, w)}

    return terms


# ---------------------------------------------------------------- trainees (workers)


def trainee(spec: TrainSpec, plan: TrainPlan, rank: int, device, weights: bytes | None) -> Trainee:
    """Task segmenter: ``model.*`` on random multi-scale crops (``CropSampler``)."""
    dataset = TrainingDataset(spec.dataset.url, spec.dataset.storage_options)
    c = spec.crops
    crop_config = CropConfig(c.size, tuple(c.scales), c.batch_size, spec.augment.flips, spec.augment.rot90)
    windows = [(n, lvl, w) for n in plan.val_names
               for lvl, w in validation_windows(dataset.shapes(n), c.size, spec.dataset.validation.scale)]

    def pairs(r: int, epoch: int, n: int):
        return CropSampler(dataset, plan.train_names, crop_config, seed=spec.seed, rank=r).batches(epoch, n)

    return image_mask_trainee(spec, plan, plan.model.config, rank, device, weights, spec.model.init, pairs, windows,
                              lambda item: read_crop(dataset, *item, c.size))


def image_mask_trainee(spec: TrainSpec, plan: TrainPlan, config: ModelConfig, rank: int, device,
                       weights: bytes | None, init: str | None,
                       pairs: Callable[[int, int, int], Iterator[tuple[np.ndarray, np.ndarray]]],
                       val_items: list, read_val: Callable[[Any], tuple[np.ndarray, np.ndarray]]) -> Trainee:
    """A segmenter (``config``; with ``refine``, the PointRend around it) trained on ``pairs(rank, epoch, n)``:
    ``n`` batches of images ``(B, 3, T, T)`` uint8 and masks ``(B, T, T)``; validated on ``read_val(item) → (image,
    mask)`` over this rank's share of ``val_items``. Starts from ``weights`` (a resume), else from the checkpoint at
    ``init`` when given."""
    model = build_model(config, seed=spec.seed)
    if weights is not None:
        load_state_into(model, weights)
    elif init:
        done = init_weights(model, read_bytes(init, spec.dataset.storage_options), config, plan.class_names)
        log.info("initialised from %s: %s", init, done)
    to_input = normalizer(plan.normalization, device)
    segmenter = getattr(model, "segmenter", model)  # a PointRend wraps it
    loss_terms = None
    if config.refine is not None:
        configure_training(model, spec.model)
        loss_terms = pointrend_loss_terms(spec_loss(spec, plan), plan.ignore_index, plan.class_weights)
    if weights is None and isinstance(segmenter.decoder, DUpsamplingHead):
        # DUpsampling's reconstruction W comes from PCA of training label blocks, not from gradients. The
        # same seeded crops on every rank give every worker the same basis; a resumed run loads it.
        masks = np.concatenate([m for _, m in pairs(0, 0, 8)])
        explained = fit_dupsampling(segmenter.decoder, torch.from_numpy(masks.astype(np.int64)), config.num_classes)
        log.info("DUpsampling basis fit on %d label crops: %.1f %% of the variance explained",
                 len(masks), 100 * explained)

    has_aux = loss_terms is None and bool(getattr(segmenter.decoder, "aux_outputs", ()))

    def forward(m, batch):
        """Logits (with the auxiliary heads' logits in training, when the head has any; a PointRend's
        ``PointRendOutput`` in training) and targets."""
        images, masks = batch
        x = to_input(images)
        out = m(x, aux=True) if has_aux and m.training and spec.loss.aux_weight > 0 else m(x)
        return out, torch.from_numpy(masks.astype(np.int64)).to(device)

    def validation(module, rank: int, world: int):
        for batch in shard_batches(val_items, rank, world, spec.crops.batch_size, read_val):
            yield forward(module, batch) + (None,)

    return Trainee(model, lambda epoch, n: pairs(rank, epoch, n), forward,
                   lambda m: save_checkpoint(None, m, config, plan.class_names, plan.class_colors, plan.normalization),
                   validation, loss_terms=loss_terms)


TASK = Task(plan=plan, read_model=SegmenterModel.from_dict, trainee=trainee)

__all__ = ["TASK", "SegmenterModel", "configure_training", "image_mask_trainee",
           "init_weights", "model_config", "plan", "pointrend_loss_terms", "trainee"]
