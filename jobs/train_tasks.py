"""What each training task feeds the loop: a ``Trainee`` (model, batches, forward, weights, validation, losses),
built on every Ray Train worker; the plain and PointRend segmenters here, MagNet's refiner and FCtL's stages in
``jobs.train_refiner`` and ``jobs.train_fctl``; and the validation scores."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.train_loop import Plan, _all_sum, init_weights, normalizer, shard_batches
from jobs.train_spec import TrainSpec
from jobs.train_store import read_url

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Trainee:
    """What differs between tasks. ``forward(model, batch) → (logits, target)``; ``validation(module, rank,
    world)`` yields ``(logits, target, baseline probabilities or None)`` over this rank's share."""

    model: Any
    batches: Callable[[int, int], Iterator]
    forward: Callable[[Any, Any], tuple[Any, Any]]
    weights: Callable[[Any], bytes]
    validation: Callable[[Any, int, int], Iterator[tuple[Any, Any, Any]]]
    baseline: bool = False  # validation also scores the frozen segmenter alone (segmenter_miou)
    # The task's own loss, ``(out, target) → {term name: scalar}``, summed (each term logged as train_<name>);
    # None: the spec's loss on the logits (and the auxiliary heads' logits).
    loss_terms: Callable[[Any, Any], dict[str, Any]] | None = None


def segmenter_trainee(spec: TrainSpec, plan: Plan, rank: int, device, weights: bytes | None) -> Trainee:
    """Task segmenter: ``model.*`` on random multi-scale crops (``pipeline.crops.CropSampler``)."""
    from models import ModelConfig
    from pipeline.crops import CropConfig, CropSampler, read_crop, validation_windows
    from pipeline.datasets import TrainingDataset

    dataset = TrainingDataset(spec.dataset.url, spec.dataset.storage_options)
    c = spec.crops
    crop_config = CropConfig(c.size, tuple(c.scales), c.batch_size, spec.augment.flips, spec.augment.rot90)
    windows = [(n, lvl, w) for n in plan.val_names
               for lvl, w in validation_windows(dataset.shapes(n), c.size, spec.dataset.validation.scale)]

    def pairs(r: int, epoch: int, n: int):
        return CropSampler(dataset, plan.train_names, crop_config, seed=spec.seed, rank=r).batches(epoch, n)

    return image_mask_trainee(spec, plan, ModelConfig.from_dict(plan.model), rank, device, weights, spec.model.init,
                              pairs, windows, lambda item: read_crop(dataset, *item, c.size))


def image_mask_trainee(spec: TrainSpec, plan: Plan, config, rank: int, device, weights: bytes | None,
                       init: str | None, pairs: Callable[[int, int, int], Iterator[tuple[np.ndarray, np.ndarray]]],
                       val_items: list, read_val: Callable[[Any], tuple[np.ndarray, np.ndarray]]) -> Trainee:
    """A segmenter (``config``; with ``refine``, the PointRend around it) trained on ``pairs(rank, epoch, n)``:
    ``n`` batches of images ``(B, 3, T, T)`` uint8 and masks ``(B, T, T)``; validated on ``read_val(item) → (image,
    mask)`` over this rank's share of ``val_items``. Starts from ``weights`` (a resume), else from the checkpoint at
    ``init`` when given."""
    import torch

    from models import build_model
    from models.checkpoint import load_state_into, save_checkpoint
    from models.heads.dupsampling import DUpsamplingHead, fit_dupsampling

    model = build_model(config, seed=spec.seed)
    if weights is not None:
        load_state_into(model, weights)
    elif init:
        done = init_weights(model, read_url(init, spec.dataset.storage_options), config, plan.class_names)
        log.info("initialised from %s: %s", init, done)
    to_input = normalizer(plan.normalization, device)
    segmenter = getattr(model, "segmenter", model)  # a PointRend wraps it
    loss_terms = None
    if config.refine is not None:
        from jobs.train_pointrend import configure_training, pointrend_loss_terms

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


def spec_loss(spec: TrainSpec, plan: Plan):
    """The loss module ``loss.*`` names, with the plan's ignore index and class weights."""
    from models.losses import LossConfig, build_loss

    c = spec.loss
    return build_loss(LossConfig(c.name, plan.ignore_index, c.threshold, c.min_kept, c.gamma, plan.class_weights))


def score(items: Iterable, k: int, ignore: int, exclude: list[int], baseline: bool = False) -> dict:
    """Validation loss (CE), mIoU and pixel accuracy of ``(logits, target, baseline)`` items, confusion
    matrices summed over ranks with all-reduce; ``segmenter_miou`` of the baseline's argmax when asked."""
    import torch
    import torch.nn.functional as F

    from pipeline.metrics import mean_iou, pixel_accuracy

    cms = torch.zeros(2, k * k, dtype=torch.float64)
    loss_sum = count = 0.0
    for logits, y, base in items:
        valid = y != ignore
        loss_sum += float(F.cross_entropy(logits.float(), y, ignore_index=ignore, reduction="sum"))
        count += float(valid.sum())
        for i, pred in enumerate([logits] + ([base] if baseline else [])):
            cms[i] += torch.bincount((y[valid] * k + pred.argmax(1)[valid]).cpu(), minlength=k * k).double()
    totals = _all_sum([loss_sum, count, *cms.flatten().tolist()])
    matrices = np.asarray(totals[2:]).reshape(2, k, k)
    out = {"val_loss": totals[0] / totals[1] if totals[1] else float("nan"),
           "miou": mean_iou(matrices[0], exclude=exclude), "pixel_accuracy": pixel_accuracy(matrices[0])}
    if baseline:
        out["segmenter_miou"] = mean_iou(matrices[1], exclude=exclude)
    return out


__all__ = ["Trainee", "image_mask_trainee", "score", "segmenter_trainee", "spec_loss"]
