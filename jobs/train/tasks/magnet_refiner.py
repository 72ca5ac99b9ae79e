"""Task ``magnet_refiner``: MagNet's refiner with the segmenter of ``refiner.segmenter`` frozen, on pairs
(``pipeline.training.crops_refiner.RefinerSampler``). For a crop at level L the refiner sees
``O = softmax(segmenter(crop))`` and ``Y_up`` = the ×2 bilinear upsampling of
``softmax(segmenter(coarse view at L+1))`` over the crop — what MagNet's stages feed it at inference
(``pipeline.frameworks.magnet``) — and learns the mask; weights written with ``models.magnet.save_refiner``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from jobs.train.common import normalizer
from jobs.train.contract import Task, Trainee, TrainPlan
from jobs.train.spec import TrainSpec
from jobs.train.store import REFINER_FINAL
from models.checkpoint import load_checkpoint, read_info
from models.errors import CheckpointError
from models.magnet import Refiner, load_refiner, save_refiner
from pipeline.storage import read_bytes
from pipeline.training.crops import CropConfig
from pipeline.training.crops_refiner import RefinerSampler, read_pairs, refiner_validation_draws
from pipeline.training.datasets import TrainingDataset


@dataclass(frozen=True)
class RefinerModel:
    """The plan's model section of task magnet_refiner; ``segmenter_sha256`` makes a resume with another
    (frozen) segmenter a conflict."""

    num_classes: int
    width: int
    scales: int
    residual: bool
    segmenter_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"task": "magnet_refiner", **asdict(self)}
        if self.segmenter_sha256 is None:
            del data["segmenter_sha256"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RefinerModel:
        return cls(**{k: v for k, v in data.items() if k != "task"})


def plan(spec: TrainSpec, info, problems: list[str]) -> tuple[RefinerModel, dict[str, list[float]]]:
    """The refiner's model section (the segmenter's hash in it) and the segmenter's normalisation, which both
    of its inputs get."""
    r = spec.refiner
    model = RefinerModel(info.num_classes, r.width, r.scales, r.residual)
    try:
        data = read_bytes(r.segmenter, spec.dataset.storage_options)
        seg = read_info(data)
    except FileNotFoundError:
        problems.append(f"refiner.segmenter: {r.segmenter} does not exist; point it at the model.safetensors "
                        "of a finished `gigaseg train` run")
        return model, info.normalization
    except CheckpointError as err:
        problems.append(f"refiner.segmenter: {r.segmenter}: {err}")
        return model, info.normalization
    if tuple(seg.class_names) != tuple(info.class_names):
        problems.append(
            f"refiner.segmenter: {r.segmenter} predicts {list(seg.class_names)} but the dataset's classes are "
            f"{list(info.class_names)}; the refiner learns the dataset's masks from the segmenter's "
            "probabilities, so train it on a dataset with the segmenter's class table")
    return (RefinerModel(info.num_classes, r.width, r.scales, r.residual, hashlib.sha256(data).hexdigest()),
            seg.normalization.to_dict())


def upsample_taps_t(probs, rows, row_weights, cols, col_weights):
    """``(C, S, S)`` coarse probabilities → ``(C, h, w)``: along y ``(1 − λ)·P[i0] + λ·P[i1]`` with ``rows
    (2, h)`` = (i0, i1) and ``row_weights (h,)`` = λ, then the same along x — the arithmetic of
    ``pipeline.reader.upsample2x_window``, in the same order."""
    r = probs[:, rows[0]] * (1 - row_weights)[None, :, None] + probs[:, rows[1]] * row_weights[None, :, None]
    return r[:, :, cols[0]] * (1 - col_weights)[None, None, :] + r[:, :, cols[1]] * col_weights[None, None, :]


def augment_t(x, flip_y: bool, flip_x: bool, rot90: int):
    """``pipeline.training.crops.augment`` for a ``(C, h, w)`` tensor: flip y, flip x, rotate ``rot90 · 90°``."""
    if flip_y:
        x = torch.flip(x, [1])
    if flip_x:
        x = torch.flip(x, [2])
    return torch.rot90(x, rot90, dims=(1, 2)) if rot90 % 4 else x


def refiner_inputs(segmenter, batch, to_input):
    """A ``pipeline.training.crops_refiner.RefinerBatch`` → ``(fine (B, C, c, c), coarse_up (B, C, c, c), target
    (B, c, c))``: ``fine = softmax(segmenter(crop))``, ``coarse_up`` = the upsampled ``softmax(segmenter(coarse
    view))`` over the crop, augmented like the crop; the frozen ``segmenter`` runs without gradients."""
    with torch.no_grad():
        fine = torch.softmax(segmenter(to_input(batch.fine)).float(), dim=1)
        coarse = torch.softmax(segmenter(to_input(batch.coarse)).float(), dim=1)
        dev = coarse.device
        rows, row_w, cols, col_w = (torch.from_numpy(a).to(dev) for a in (batch.rows, batch.row_weights, batch.cols,
                                                                          batch.col_weights))
        ups = []
        for b in range(len(batch.fine)):
            up = upsample_taps_t(coarse[b], rows[b], row_w[b], cols[b], col_w[b])
            ups.append(augment_t(up, bool(batch.flips[b, 0]), bool(batch.flips[b, 1]), int(batch.rot90[b])))
    return fine, torch.stack(ups), torch.from_numpy(batch.masks.astype(np.int64)).to(dev)


def trainee(spec: TrainSpec, plan: TrainPlan, rank: int, device, weights: bytes | None) -> Trainee:
    r, k, c = spec.refiner, len(plan.class_names), spec.crops
    segmenter, _ = load_checkpoint(read_bytes(r.segmenter, spec.dataset.storage_options))
    segmenter = segmenter.to(device).eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Refiner(k, width=r.width, residual=r.residual)
    if weights is not None:
        model.load_state_dict(load_refiner(weights, k).state_dict())
    to_input = normalizer(plan.normalization, device)
    dataset = TrainingDataset(spec.dataset.url, spec.dataset.storage_options)
    levels = list(range(r.scales - 1))
    sampler = RefinerSampler(dataset, plan.train_names, CropConfig(c.size, (1.0,), c.batch_size, spec.augment.flips,
                                                                   spec.augment.rot90), levels, spec.seed, rank)

    def forward(m, batch):
        fine, coarse_up, target = refiner_inputs(segmenter, batch, to_input)
        return m(fine, coarse_up), target

    def validation(module, rank: int, world: int):
        draws = [d for n in plan.val_names for d in refiner_validation_draws(n, dataset.shapes(n), c.size, levels)]
        mine = draws[rank::world]
        for i in range(0, len(mine), c.batch_size):
            fine, coarse_up, target = refiner_inputs(segmenter, read_pairs(dataset, mine[i : i + c.batch_size], c.size),
                                                     to_input)
            yield module(fine, coarse_up), target, fine

    return Trainee(model, lambda epoch, n: sampler.batches(epoch, n), forward, lambda m: save_refiner(m, r.width),
                   validation, baseline=True)


TASK = Task(plan=plan, read_model=RefinerModel.from_dict, trainee=trainee, weights=REFINER_FINAL)

__all__ = ["TASK", "RefinerModel", "augment_t", "plan", "refiner_inputs", "trainee", "upsample_taps_t"]
