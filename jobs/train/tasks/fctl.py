"""Task ``fctl``: FCtL training, staged as the reference (Li et al., ACM MM 2021; github liqiokkk/FCtL,
``train_deep_globe.py``): three ``gigaseg train`` runs, each resumable as any training run (``latest.json``),
each pointing at the output of the one before.

1. **local** — a plain segmenter on level-0 crops: ``task: segmenter`` with ``crops.scales: [1]``::

       task: segmenter
       dataset: {url: s3://bucket/ds}
       model: {name: fpn_resnet18, width: 64}
       crops: {size: 512, scales: [1]}
       loss: {name: focal, gamma: 3}
       output: {url: s3://bucket/fctl/local}

2. **context** — one run per context factor: a segmenter initialised from the local one (its architecture,
   weights and normalisation) and trained on the context views of random level-0 crops (``FctlSampler``
   with ``context_targets``: the ``c·T`` window centred on the crop, read as a worker reads it, and its own
   labels). The output is a plain segmenter checkpoint::

       task: fctl
       fctl: {stage: context, local: s3://bucket/fctl/local/model.safetensors, factor: 2}
       dataset: {url: s3://bucket/ds}
       crops: {size: 512}
       output: {url: s3://bucket/fctl/context-2}
       # again with factor: 4 and output.url s3://bucket/fctl/context-4

3. **fused** — ``FCtL.from_local(local)``, context encoder ``i`` taken from ``context_checkpoints[i]`` and
   frozen (``freeze_context_encoders``: no gradients, BatchNorm in eval mode), the local model, the
   correlations and the fusion trained on (crop, contexts) → crop labels. The output ``model.safetensors`` is
   an FCtL checkpoint (``models.fctl_checkpoint.save_fctl``) for ``gigaseg run`` with ``model.framework:
   fctl``::

       task: fctl
       fctl:
         stage: fused
         local: s3://bucket/fctl/local/model.safetensors
         contexts: [2, 4]
         context_checkpoints: [s3://bucket/fctl/context-2/model.safetensors,
                               s3://bucket/fctl/context-4/model.safetensors]
       dataset: {url: s3://bucket/ds}
       crops: {size: 512}
       output: {url: s3://bucket/fctl/fused}

Both fctl stages train with focal loss (γ = 3) unless ``loss`` says otherwise, and normalise every view
(crop and contexts) with the local checkpoint's normalisation. Validation (``dataset.validation``) scores
level-0 tiles covering each held-out image: the context stage on its context views and their labels, the
fused stage on the tiles with their contexts. The plan records the SHA-256 of every checkpoint a stage starts
from, so resuming an output with other inputs is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jobs.train.common import normalizer, shard_batches, spec_loss
from jobs.train.contract import Task, Trainee, TrainPlan
from jobs.train.spec import TrainSpec
from jobs.train.store import LATEST
from jobs.train.tasks.segmenter import image_mask_trainee, pointrend_loss_terms
from models import ModelConfig
from models.checkpoint import load_checkpoint, read_info
from models.errors import CheckpointError
from models.fctl import FCtL, FctlConfig
from models.fctl_checkpoint import is_fctl_checkpoint, load_fctl, save_fctl
from pipeline.storage import join, read_bytes
from pipeline.training.crops import CropConfig, read_crop, validation_windows
from pipeline.training.crops_fctl import FctlSampler, read_context_masks, read_fctl_contexts
from pipeline.training.datasets import TrainingDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FctlModel:
    """The plan's model section of task fctl. Stage context: the local segmenter's ``ModelConfig`` and the
    ``factor`` trained; stage fused: the ``FctlConfig`` and the SHA-256 of each context checkpoint. Both record
    the local checkpoint's SHA-256, so resuming an output with other inputs is refused."""

    stage: str
    local_sha256: str | None = None
    factor: float | None = None
    config: ModelConfig | FctlConfig | None = None
    context_sha256: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"task": "fctl", "stage": self.stage}
        if self.local_sha256 is not None:
            data["local_sha256"] = self.local_sha256
        if self.stage == "context" and self.factor is not None:
            data["factor"] = self.factor
        if self.config is not None:
            data["config"] = self.config.to_dict()
        if self.stage == "fused" and self.config is not None:
            data["context_sha256"] = list(self.context_sha256)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FctlModel:
        config = data.get("config")
        if config is not None:
            config = (ModelConfig if data["stage"] == "context" else FctlConfig).from_dict(config)
        return cls(data["stage"], data.get("local_sha256"), data.get("factor"), config,
                   list(data.get("context_sha256", [])))


# ---------------------------------------------------------------- plan (driver)


def plan(spec: TrainSpec, info, problems: list[str]) -> tuple[FctlModel, dict[str, list[float]]]:
    """The plan's model section of an FCtL stage and the normalisation of its views (the local checkpoint's),
    the checkpoints the stage starts from checked; every problem appended to ``problems``."""
    f, so = spec.fctl, spec.dataset.storage_options
    local = _read_segmenter("fctl.local", f.local, so, info, problems)
    if local is None:
        return FctlModel(f.stage), info.normalization
    data, seg = local
    local_sha = hashlib.sha256(data).hexdigest()
    normalization = seg.normalization.to_dict()
    try:  # e.g. a local model with refine: FCtL wraps a plain segmenter
        config = FctlConfig(seg.config, (f.factor,) if f.stage == "context" else tuple(f.contexts), f.key_channels)
    except ValueError as err:
        problems.append(f"fctl.local: {f.local}: {err}")
        return FctlModel(f.stage, local_sha), normalization
    if f.stage == "context":
        return FctlModel(f.stage, local_sha, f.factor, seg.config), normalization
    hashes = []
    for i, url in enumerate(f.context_checkpoints):
        field = f"fctl.context_checkpoints[{i}]"
        ctx = _read_segmenter(field, url, so, info, problems)
        if ctx is None:
            continue
        hashes.append(hashlib.sha256(ctx[0]).hexdigest())
        theirs, ours = ctx[1].config, seg.config
        if not theirs.same_architecture(ours):
            problems.append(
                f"{field}: {url} is a {theirs.name!r} of width {theirs.width}, output stride {theirs.output_stride}, "
                f"but fctl.local is a {ours.name!r} of width {ours.width}, output stride {ours.output_stride}: its "
                "encoder cannot serve as a context encoder; train the context stage from this fctl.local")
        if not _same_normalization(ctx[1].normalization.to_dict(), normalization):
            problems.append(
                f"{field}: {url} was trained with normalisation {ctx[1].normalization.to_dict()} but fctl.local "
                f"with {normalization}; the fused model normalises crops and contexts alike, so train the context "
                "stage from this fctl.local")
        trained = _trained_factor(url, so)
        if trained is not None and trained != f.contexts[i]:
            problems.append(
                f"{field}: {url} was trained on ×{trained:g} contexts (its run's {LATEST}) but fctl.contexts[{i}] "
                f"is {f.contexts[i]:g}; list the context checkpoints in the order of fctl.contexts")
    return FctlModel(f.stage, local_sha, None, config, hashes), normalization


def _read_segmenter(field: str, url: str, storage_options: dict, info, problems: list[str]):
    """``(bytes, CheckpointInfo)`` of the plain segmenter checkpoint at ``url`` predicting the dataset's
    classes, or None with the problem appended."""
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        problems.append(f"{field}: {url} does not exist; point it at the model.safetensors of a finished "
                        "`gigaseg train` run")
        return None
    if is_fctl_checkpoint(data):
        problems.append(f"{field}: {url} is an FCtL checkpoint (a stage-fused output); this field takes a plain "
                        "segmenter's model.safetensors")
        return None
    try:
        seg = read_info(data)
    except CheckpointError as err:
        problems.append(f"{field}: {url}: {err}")
        return None
    if tuple(seg.class_names) != tuple(info.class_names):
        problems.append(f"{field}: {url} predicts {list(seg.class_names)} but the dataset's classes are "
                        f"{list(info.class_names)}; every FCtL stage trains on the class table of the local stage")
        return None
    return data, seg


def _same_normalization(a: dict, b: dict) -> bool:
    return all(np.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in ("mean", "std"))


def _trained_factor(url: str, storage_options: dict) -> float | None:
    """The factor a stage-context run trained, from the ``latest.json`` beside its ``model.safetensors``
    (None when there is none, or it is not a context run's)."""
    parent = url.rsplit("/", 1)[0] if "/" in url else "."
    try:
        latest = json.loads(read_bytes(join(parent, LATEST), storage_options))
    except (FileNotFoundError, ValueError):
        return None
    model = latest.get("model") if isinstance(latest, dict) else None
    if isinstance(model, dict) and model.get("task") == "fctl" and model.get("stage") == "context":
        return float(model["factor"])
    return None


# ---------------------------------------------------------------- trainees (workers)


def trainee(spec: TrainSpec, plan: TrainPlan, rank: int, device, weights: bytes | None) -> Trainee:
    make = context_trainee if spec.fctl.stage == "context" else fused_trainee
    return make(spec, plan, rank, device, weights)


def _fctl_parts(spec: TrainSpec, plan: TrainPlan):
    """The dataset, the crop config and the level-0 validation tiles ``(name, window)`` of an FCtL stage."""
    c = spec.crops
    dataset = TrainingDataset(spec.dataset.url, spec.dataset.storage_options)
    config = CropConfig(c.size, (1.0,), c.batch_size, spec.augment.flips, spec.augment.rot90)
    tiles = [(n, w) for n in plan.val_names for _, w in validation_windows(dataset.shapes(n), c.size, 1.0)]
    return dataset, config, tiles


def context_trainee(spec: TrainSpec, plan: TrainPlan, rank: int, device, weights: bytes | None) -> Trainee:
    """Stage context: the local segmenter, fine-tuned on ``(context view, its labels)`` at ``fctl.factor``."""
    dataset, crop_config, tiles = _fctl_parts(spec, plan)
    factors, size = (spec.fctl.factor,), spec.crops.size

    def pairs(r: int, epoch: int, n: int):
        sampler = FctlSampler(dataset, plan.train_names, crop_config, factors, seed=spec.seed, rank=r,
                              context_targets=True)
        for _, contexts, _, context_masks in sampler.batches(epoch, n):
            yield contexts[:, 0], context_masks[:, 0]

    def read_val(tile):
        name, window = tile
        return (read_fctl_contexts(dataset, name, window, factors, size)[0],
                read_context_masks(dataset, name, window, factors, size)[0])

    return image_mask_trainee(spec, plan, plan.model.config, rank, device, weights, spec.fctl.local, pairs, tiles,
                              read_val)


def fused_trainee(spec: TrainSpec, plan: TrainPlan, rank: int, device, weights: bytes | None) -> Trainee:
    """Stage fused: FCtL around the local segmenter, context encoders from the stage-context checkpoints,
    frozen; trained on ``(crop, contexts) → crop labels``."""
    f, so, size = spec.fctl, spec.dataset.storage_options, spec.crops.size
    config = plan.model.config
    if weights is not None:
        model = load_fctl(weights)[0].train()
    else:
        local, _ = load_checkpoint(read_bytes(f.local, so))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)  # the correlation and fusion convs: the same on every rank
            model = FCtL.from_local(local, len(config.contexts), config.key_channels)
        for i, url in enumerate(f.context_checkpoints):
            model.context_encoder_from(load_checkpoint(read_bytes(url, so))[0], i)
        log.info("FCtL from %s, context encoders from %s (frozen)", f.local, ", ".join(f.context_checkpoints))
    model.freeze_context_encoders()
    dataset, crop_config, tiles = _fctl_parts(spec, plan)
    sampler = FctlSampler(dataset, plan.train_names, crop_config, config.contexts, seed=spec.seed, rank=rank)
    to_input = normalizer(plan.normalization, device)
    has_aux = bool(getattr(model.segmenter.decoder, "aux_outputs", ())) and not config.local.refine
    loss_terms = None
    if config.local.refine:  # PointRend local model: coarse loss + point CE, as task segmenter trains it
        loss_terms = pointrend_loss_terms(spec_loss(spec, plan), plan.ignore_index, plan.class_weights)

    def forward(m, batch):
        images, contexts, masks = batch
        x = to_input(images)
        b, n = contexts.shape[:2]
        ctx = to_input(contexts.reshape(b * n, *contexts.shape[2:])).reshape(b, n, *x.shape[1:])
        out = m(x, ctx, aux=True) if has_aux and m.training and spec.loss.aux_weight > 0 else m(x, ctx)
        return out, torch.from_numpy(masks.astype(np.int64)).to(device)

    def read_val(tile):
        name, window = tile
        image, mask = read_crop(dataset, name, 0, window, size)
        return image, read_fctl_contexts(dataset, name, window, config.contexts, size), mask

    def validation(module, rank: int, world: int):
        for batch in shard_batches(tiles, rank, world, spec.crops.batch_size, read_val):
            yield forward(module, batch) + (None,)

    return Trainee(model, sampler.batches, forward,
                   lambda m: save_fctl(None, m, config, plan.class_names, plan.class_colors, plan.normalization),
                   validation, loss_terms=loss_terms)


TASK = Task(plan=plan, read_model=FctlModel.from_dict, trainee=trainee)

__all__ = ["TASK", "FctlModel", "context_trainee", "fused_trainee", "plan", "trainee"]
