"""The ``magnet_refiner`` task of ``gigaseg train``: MagNet's refiner with the segmenter of ``refiner.segmenter``
frozen, on pairs (``pipeline.crops_refiner.RefinerSampler``). For a crop at level L the refiner sees
``O = softmax(segmenter(crop))`` and ``Y_up`` = the ×2 bilinear upsampling of
``softmax(segmenter(coarse view at L+1))`` over the crop — what ``pipeline/magnet.py`` feeds it at inference —
and learns the mask; weights written with ``models.magnet.save_refiner``. The loop is ``jobs.train_loop``'s.
"""

from __future__ import annotations

import numpy as np

from jobs.train_loop import Plan, normalizer
from jobs.train_tasks import Trainee
from jobs.train_spec import TrainSpec
from jobs.train_store import read_url


def upsample_taps_t(probs, rows, row_weights, cols, col_weights):
    """``(C, S, S)`` coarse probabilities → ``(C, h, w)``: along y ``(1 − λ)·P[i0] + λ·P[i1]`` with ``rows
    (2, h)`` = (i0, i1) and ``row_weights (h,)`` = λ, then the same along x — the arithmetic of
    ``pipeline.reader.upsample2x_window``, in the same order."""
    r = probs[:, rows[0]] * (1 - row_weights)[None, :, None] + probs[:, rows[1]] * row_weights[None, :, None]
    return r[:, :, cols[0]] * (1 - col_weights)[None, None, :] + r[:, :, cols[1]] * col_weights[None, None, :]


def augment_t(x, flip_y: bool, flip_x: bool, rot90: int):
    """``pipeline.crops.augment`` for a ``(C, h, w)`` tensor: flip y, flip x, rotate ``rot90 · 90°``."""
    import torch

    if flip_y:
        x = torch.flip(x, [1])
    if flip_x:
        x = torch.flip(x, [2])
    return torch.rot90(x, rot90, dims=(1, 2)) if rot90 % 4 else x


def refiner_inputs(segmenter, batch, to_input):
    """A ``pipeline.crops_refiner.RefinerBatch`` → ``(fine (B, C, c, c), coarse_up (B, C, c, c), target (B, c, c))``:
    ``fine = softmax(segmenter(crop))``, ``coarse_up`` = the upsampled ``softmax(segmenter(coarse view))`` over
    the crop, augmented like the crop; the frozen ``segmenter`` runs without gradients."""
    import torch

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


def refiner_trainee(spec: TrainSpec, plan: Plan, rank: int, device, weights: bytes | None) -> Trainee:
    import torch

    from models.checkpoint import load_checkpoint
    from models.magnet import Refiner, load_refiner, save_refiner
    from pipeline.crops import CropConfig
    from pipeline.crops_refiner import RefinerSampler, read_pairs, refiner_validation_draws
    from pipeline.datasets import TrainingDataset

    r, k, c = spec.refiner, len(plan.class_names), spec.crops
    segmenter, _ = load_checkpoint(read_url(r.segmenter, spec.dataset.storage_options))
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


__all__ = ["augment_t", "refiner_inputs", "refiner_trainee", "upsample_taps_t"]
