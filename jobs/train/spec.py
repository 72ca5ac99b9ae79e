"""The training spec (``gigaseg train SPEC``): YAML → one frozen, validated pydantic model.

Same conventions as the job spec (``jobs.spec``): unknown keys rejected with their full key path, names
are ``Literal``s, cross-field rules are validators, credentials never in ``storage_options``.

Steps: each epoch is ``crops.batches_per_epoch`` optimiser steps; at each step every one of the
``workers.num_workers`` data-parallel workers trains on its own batch of ``crops.batch_size`` crops, so
the global batch is ``batch_size × num_workers``.

Tasks: ``segmenter`` (the default) trains ``model.*`` on random crops at ``crops.scales``; with
``model.refine: pointrend`` the segmenter with a PointRend point head (``jobs.train.tasks.segmenter``), which
``gigaseg run`` loads like any checkpoint;
``magnet_refiner`` trains MagNet's refiner for the trained segmenter of ``refiner.segmenter`` (frozen) on
pairs (a ``crops.size`` crop at a fine level L, a coarse view at L+1), with OHEM cross entropy unless
``loss.name`` says otherwise; its ``refiner.safetensors`` is ``model.magnet.refiner`` of ``gigaseg run``;
``fctl`` trains FCtL in the reference's stages, one resumable run each (``FctlSpec``, ``jobs.train.tasks.fctl``),
with focal loss (γ = 3) unless ``loss.name`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from jobs.spec import Strict, check_storage_options, read_yaml, validate
from jobs.train.spec_tasks import FCTL_STAGE_LOCAL, FctlSpec, RefinerSpec
from models import ARCHITECTURES, DECODERS


class ValidationSpec(Strict):
    names: list[str] | None = Field(default=None, description="images held out for validation")
    fraction: float = Field(default=0.0, ge=0, lt=1, description="else this share of the images, by seed")
    scale: float = Field(default=1.0, gt=0, description="scale the held-out images are scored at")
    exclude_classes: list[str] = Field(default_factory=list, description="classes left out of the mIoU")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.names and self.fraction:
            raise ValueError("give either 'names' or 'fraction', not both")
        return self


class DatasetSpec(Strict):
    url: str = Field(description="a dataset built by `gigaseg import-pairs` (holds dataset.json)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)

    _storage = field_validator("storage_options")(check_storage_options)


# model.* options read with refine: pointrend, and their defaults: detectron2's PointRend semantic FPN config
# (2048 training points per crop, k = 3, β = 0.75; 8192 points per subdivision step). None: log2 of the stride.
POINTREND_DEFAULTS: dict[str, Any] = {
    "point_channels": 256, "subdivision_steps": None, "subdivision_points": 8192,
    "train_points": 2048, "oversample_ratio": 3.0, "importance_ratio": 0.75,
}
POINTREND_OPTIONS = tuple(POINTREND_DEFAULTS)


class TrainModelSpec(Strict):
    name: str = Field(default="fpn_resnet18", description="registry name (models.ARCHITECTURES)")
    width: int = Field(default=64, ge=8, le=256, multiple_of=8)
    output_stride: Literal[8, 16, 32] | None = Field(default=None, description="default: the head's own")
    init: str | None = Field(
        default=None,
        description="checkpoint URL to fine-tune from; its head is re-initialised when its classes differ. With "
                    "refine: pointrend, a plain segmenter of the same architecture too (the point head starts fresh). "
                    "Or ImageNet encoder weights: a torchvision ResNet file (.pth) or an encoder checkpoint of "
                    "`gigaseg import-checkpoint --from torchvision-resnet` (the encoder only; the head starts fresh)",
    )
    refine: Literal["pointrend"] | None = Field(
        default=None, description="pointrend: a PointRend point head around the segmenter (a head that emits features)"
    )
    # PointRend options (refine: pointrend only); defaults: POINTREND_DEFAULTS, the reference's.
    point_channels: int | None = Field(default=None, ge=8, le=1024, description="point head width (256)")
    subdivision_steps: int | None = Field(default=None, ge=0, le=8,
                                          description="inference ×2 steps (default: log2 of the head's stride)")
    subdivision_points: int | None = Field(default=None, ge=1, description="cells re-predicted per step (8192)")
    train_points: int | None = Field(default=None, ge=1, le=1 << 20, description="points per crop in training (2048)")
    oversample_ratio: float | None = Field(default=None, ge=1, le=64,
                                           description="k: candidates drawn = k · train_points (3)")
    importance_ratio: float | None = Field(default=None, ge=0, le=1,
                                           description="β: share of the points taken the most uncertain (0.75)")

    @field_validator("name")
    @classmethod
    def _registered(cls, v):
        if v not in ARCHITECTURES:
            raise ValueError(f"unknown model {v!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
        return v

    @field_validator("refine")
    @classmethod
    def _feature_head(cls, v, info):
        name = info.data.get("name")
        if v is None or name is None:
            return v
        head = ARCHITECTURES[name][1]
        if DECODERS[head].emits_logits:
            feature = sorted(h for h, c in DECODERS.items() if not c.emits_logits)
            raise ValueError(
                f"PointRend samples a head's fine features, but {name!r} has head {head!r}, which emits class logits; "
                f"use a model with one of the heads {feature} (e.g. fpn_resnet18), or remove model.refine")
        return v

    @field_validator(*POINTREND_OPTIONS)
    @classmethod
    def _pointrend_only(cls, v, info):
        if v is not None and info.data.get("refine", "pointrend") is None:  # (absent: refine itself was refused)
            raise ValueError("a PointRend option, only read with model.refine: pointrend; set that or remove this key")
        return v

    def pointrend(self) -> dict[str, Any]:
        """The PointRend options, defaults filled in (empty without refine)."""
        if self.refine is None:
            return {}
        return {k: POINTREND_DEFAULTS[k] if getattr(self, k) is None else getattr(self, k) for k in POINTREND_OPTIONS}


class CropsSpec(Strict):
    size: int = Field(default=512, ge=32, le=4096, description="crop side fed to the network")
    scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1, description="crop covers size·scale px")
    batches_per_epoch: int = Field(default=100, ge=1)
    batch_size: int = Field(default=8, ge=1, le=1024, description="crops per worker per step")

    @field_validator("size")
    @classmethod
    def _stride(cls, v):
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (the network's coarsest stride), got {v}")
        return v

    @field_validator("scales")
    @classmethod
    def _positive(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError(f"scales must be > 0, got {v}")
        return v


class AugmentSpec(Strict):
    flips: bool = True
    rot90: bool = True


class LossSpec(Strict):
    name: Literal["ce", "ohem", "focal"] = "ce"
    threshold: float = Field(default=0.7, gt=0, le=1, description="ohem: pixels with p_true below this count")
    min_kept: int = Field(default=100_000, ge=1, description="ohem: at least this many pixels per batch")
    gamma: float = Field(default=3.0, ge=0, description="focal: (1 − p)^γ")
    ignore_index: int | None = Field(default=None, ge=0, description="default: the dataset's")
    aux_weight: float = Field(default=0.4, ge=0, description="weight of auxiliary-head losses (OCRNet: 0.4)")
    class_weights: Literal["none", "median_frequency"] | list[float] = Field(
        default="none",
        description="per-class loss weights: none; median_frequency (from the dataset's class pixel counts, "
                    "w_c = median f / f_c: rare classes weigh more); or one number ≥ 0 per class",
    )

    @field_validator("class_weights")
    @classmethod
    def _class_weights(cls, v):
        if isinstance(v, list) and (not v or min(v) < 0 or max(v) <= 0):
            raise ValueError(f"give one weight ≥ 0 per class, not all 0, got {v}")
        return v


class OptimizerSpec(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd momentum")
    weight_decay: float = Field(default=1e-4, ge=0)


class ScheduleSpec(Strict):
    name: Literal["poly", "cosine", "constant"] = "poly"
    power: float = Field(default=0.9, gt=0, description="poly: lr · (1 − t/T)^power")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up from 0")


class WorkersSpec(Strict):
    num_workers: int = Field(default=1, ge=1, le=4096, description="Ray Train data-parallel workers")
    use_gpu: bool | Literal["auto"] = Field(default="auto", description="auto: when the cluster has a GPU per worker")
    cpus_per_worker: float = Field(default=1.0, gt=0, le=256)
    torch_threads: int = Field(default=1, ge=1, le=256)
    max_failures: int = Field(default=0, ge=-1, description="worker-group restarts (each resumes from latest.json)")


class ClusterSpec(Strict):
    address: str | None = Field(default=None, description="absent → embedded local Ray")


class TrainOutputSpec(Strict):
    url: str = Field(description="checkpoints (epoch-NNN/, latest.json), curves.png, model.safetensors")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    if_exists: Literal["resume", "overwrite"] = "resume"
    keep_last: int = Field(default=3, ge=0, description="epoch checkpoints kept (0: all)")

    _storage = field_validator("storage_options")(check_storage_options)


class TrainSpec(Strict):
    task: Literal["segmenter", "magnet_refiner", "fctl"] = Field(
        default="segmenter",
        description="segmenter: train model.*; magnet_refiner: train MagNet's refiner; fctl: a stage of FCtL",
    )
    refiner: RefinerSpec | None = Field(default=None, validate_default=True,
                                        description="task magnet_refiner: what to refine")
    fctl: FctlSpec | None = Field(default=None, validate_default=True, description="task fctl: which stage")
    dataset: DatasetSpec
    model: TrainModelSpec = Field(default_factory=TrainModelSpec)
    crops: CropsSpec = Field(default_factory=CropsSpec)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    epochs: int = Field(default=10, ge=1, le=100_000)
    precise_bn_batches: int = Field(
        default=16, ge=0, le=100_000,
        description="batches that recompute BatchNorm's running statistics after every epoch, before validation "
                    "and the checkpoint (models.precise_bn; 0: off)",
    )
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    output: TrainOutputSpec
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _task_loss(cls, data):
        """Each task's default loss: MagNet trains its refiner with OHEM CE (threshold 0.7), FCtL every stage
        with focal loss (γ = 3, ``loss.gamma``'s default)."""
        name = {"magnet_refiner": "ohem", "fctl": "focal"}.get(data.get("task")) if isinstance(data, dict) else None
        if name:
            loss = data.get("loss")
            if loss is None:
                data = {**data, "loss": {"name": name}}
            elif isinstance(loss, dict) and "name" not in loss:
                data = {**data, "loss": {**loss, "name": name}}
        return data

    @field_validator("refiner")
    @classmethod
    def _refiner_for_task(cls, v, info):
        task = info.data.get("task")
        if task == "magnet_refiner" and v is None:
            raise ValueError("required when task is magnet_refiner (refiner.segmenter: the trained segmenter's "
                             "model.safetensors)")
        if task in ("segmenter", "fctl") and v is not None:
            raise ValueError("only read when task is magnet_refiner; set task: magnet_refiner or remove it")
        return v

    @field_validator("fctl")
    @classmethod
    def _fctl_for_task(cls, v, info):
        task = info.data.get("task")
        if task == "fctl" and v is None:
            raise ValueError("required when task is fctl (fctl.stage: context or fused, fctl.local: the stage-local "
                             "segmenter's model.safetensors); " + FCTL_STAGE_LOCAL)
        if task in ("segmenter", "magnet_refiner") and v is not None:
            raise ValueError("only read when task is fctl; set task: fctl or remove it")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_for_task(cls, v, info):
        if info.data.get("task") == "fctl" and v.validation.scale != 1.0:
            raise ValueError("validation.scale: not read when task is fctl (FCtL is scored on level-0 tiles with "
                             "their contexts); remove it")
        return v

    @field_validator("model")
    @classmethod
    def _model_for_task(cls, v, info):
        task = info.data.get("task")
        if task == "magnet_refiner" and v != TrainModelSpec():
            raise ValueError("not read when task is magnet_refiner (the segmenter's checkpoint holds its "
                             "architecture, refiner.width sizes the refiner); remove the model section")
        if task == "fctl" and v != TrainModelSpec():
            raise ValueError("not read when task is fctl (every stage takes the architecture and initial weights "
                             "of fctl.local); remove the model section")
        return v

    @field_validator("crops")
    @classmethod
    def _crops_for_task(cls, v, info):
        task = info.data.get("task")
        if task == "magnet_refiner" and v.scales != [1.0]:
            raise ValueError("scales: not read when task is magnet_refiner (pairs are read at levels "
                             "0 … refiner.scales − 2); remove crops.scales")
        if task == "fctl" and v.scales != [1.0]:
            raise ValueError("scales: not read when task is fctl (local crops are level-0 tiles, the coarser views "
                             "are the contexts); remove crops.scales")
        return v

    def echo(self) -> str:
        """The spec as YAML, defaults filled in (safe to log: it never holds credentials)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_train_spec(data: Any, source: str = "spec") -> TrainSpec:
    return validate(TrainSpec, data, source)


def load_train_spec(path: str | Path, overrides: list[str] | None = None) -> TrainSpec:
    """Read, override (``--set key.path=value``) and validate a YAML training spec."""
    return parse_train_spec(read_yaml(path, overrides), str(path))



__all__ = ["FctlSpec", "RefinerSpec", "TrainSpec", "load_train_spec", "parse_train_spec"]
