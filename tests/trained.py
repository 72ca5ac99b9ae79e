"""A tiny segmenter and MagNet refiner trained in seconds on the demo scene, for tests whose argmax must
be decisive (untrained networks give near-uniform probabilities, whose argmax flips under any noise).

Plain torch, seeded, no Ray: the training pipeline has its own tests.

Tests read the weights from ``tests/data/tiny_magnet-{segmenter,refiner}.safetensors``, written by
``python -m tests.trained`` (``train_tiny_magnet``). They are files, not trained at test time, because the
same seeded fp32 training ends at other weights on another CPU: oneDNN and ATen pick other kernels (and
summation orders) on AVX2 than on AVX-512, and 60 Adam steps amplify the rounding differences. A test
that compares a tiled run with a whole-image run of a network whose receptive field exceeds the tile
measures a property of the weights; with the weights fixed it measures the code, the same on every CPU.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from models.checkpoint import IMAGENET_NORMALIZATION, save_checkpoint
from models.magnet import Refiner, save_refiner
from pipeline.synth.land_cover import LAND_COVER_CLASSES, land_cover, land_cover_labels

SIZE = 1024
DATA = Path(__file__).resolve().parent / "data"
TINY_MAGNET = (DATA / "tiny_magnet-segmenter.safetensors", DATA / "tiny_magnet-refiner.safetensors")


def _batch(image, labels, rng, n, crop, scale):
    """n random crops of ``crop`` px at ``scale`` (image mean-pooled, labels nearest)."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    y = torch.from_numpy(labels.astype(np.int64))[None, None].float()
    if scale > 1:
        x = F.avg_pool2d(x, scale)
        y = y[:, :, ::scale, ::scale]
    h = x.shape[-1]
    xs, ys = [], []
    for _ in range(n):
        i, j = rng.integers(0, h - crop + 1, 2)
        xs.append(x[0, :, i : i + crop, j : j + crop])
        ys.append(y[0, 0, i : i + crop, j : j + crop])
    return torch.stack(xs), torch.stack(ys).long()


@functools.lru_cache(maxsize=1)
def tiny_magnet() -> tuple[bytes, bytes]:
    """``(segmenter checkpoint, refiner)`` bytes: fpn_resnet10 width 8 and a width-16 refiner, as stored."""
    return TINY_MAGNET[0].read_bytes(), TINY_MAGNET[1].read_bytes()


def train_tiny_magnet(steps: int = 60) -> tuple[bytes, bytes]:
    """Train ``tiny_magnet``'s weights (about 10 s on 2 cores)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    image = land_cover(0, 0, SIZE, SIZE, seed=31)
    labels = land_cover_labels(0, 0, SIZE, SIZE, seed=31)
    mean = torch.tensor(IMAGENET_NORMALIZATION.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_NORMALIZATION.std).view(1, 3, 1, 1) * 255
    config = ModelConfig(name="fpn_resnet10", num_classes=len(LAND_COVER_CLASSES), width=8)
    seg = build_model(config, seed=0).train()
    opt = torch.optim.Adam(seg.parameters(), lr=5e-3)
    for step in range(steps):
        x, y = _batch(image, labels, rng, 8, 128, [1, 2, 4][step % 3])
        loss = F.cross_entropy(seg((x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seg.eval()
    refiner = Refiner(len(LAND_COVER_CLASSES), width=16).train()
    opt = torch.optim.Adam(refiner.parameters(), lr=5e-3)
    for step in range(steps):
        scale = [1, 2][step % 2]
        x, y = _batch(image, labels, rng, 8, 128, scale)
        with torch.no_grad():
            fine = torch.softmax(seg((x - mean) / std), 1)
            coarse_in = F.avg_pool2d(x, 2)
            coarse = F.interpolate(torch.softmax(seg((coarse_in - mean) / std), 1), scale_factor=2,
                                   mode="bilinear", align_corners=False)
        loss = F.cross_entropy(refiner(fine, coarse), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = [c["name"] for c in LAND_COVER_CLASSES]
    colors = [tuple(c["color"]) for c in LAND_COVER_CLASSES]
    ckpt = save_checkpoint(None, seg, config, names, colors)
    return ckpt, save_refiner(refiner.eval(), width=16)


if __name__ == "__main__":  # python -m tests.trained: rewrite the stored weights
    DATA.mkdir(exist_ok=True)
    for path, data in zip(TINY_MAGNET, train_tiny_magnet(), strict=True):
        path.write_bytes(data)
        print(f"wrote {path} ({len(data)} bytes)", file=sys.stderr)
