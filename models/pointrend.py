"""PointRend for semantic segmentation (Kirillov et al. 2020; detectron2 projects/PointRend).

A plug-in around a ``Segmenter`` whose head emits features (``Segmenter.forward_coarse``: coarse
logits and fine features at the head's stride, 4 for FPN). A small MLP, the ``PointHead``, re-predicts
the class at chosen points from the fine features and the coarse logits sampled there.

- Training samples points where the coarse prediction is uncertain (``sample_training_points``); the
  loss is CE on the upsampled coarse logits + CE on the points (``point_rend_loss``).
- Inference (eval ``forward``) subdivides: from the coarse logits, ``subdivision_steps`` times
  upsample x2, re-predict the ``subdivision_points`` most uncertain cells, scatter them back. The
  default, log2(stride) steps, ends exactly at the input resolution (stride 4: 2 steps).

Locality: the refined cells are the N most uncertain *of the tile*, so a pixel's output depends on
the rest of the tile (which cells compete with it), not only on its receptive field, as with DeepLab's
image pooling. Overlapping tiles therefore disagree slightly more than with the bare coarse head; the
blend averages them.

Points are ``(x, y)`` in [0, 1] of the image (0 = left/top edge, 1 = right/bottom edge), so one set of
points addresses maps of any resolution alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.segmenter import Segmenter

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure point functions


def point_sample(features: torch.Tensor, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """features (B, C, H, W), points (B, N, 2) normalised (x, y) in [0, 1] -> float32 (B, C, N).

    Pixel (i, j) covers [j/W, (j+1)/W) x [i/H, (i+1)/H), so its centre is ((j + 0.5)/W, (i + 0.5)/H)
    (grid_sample with align_corners=False). Outside the outermost centres values are clamped to the
    border (detectron2 pads with zeros, which fades the outer half-pixel toward 0). Computed in
    float32 with autocast off: bf16 coordinates would be off by up to half a cell on a 512 grid.
    """
    with _fp32(features):
        grid = (2.0 * points.float() - 1.0).unsqueeze(2)  # (B, N, 1, 2) in [-1, 1]
        out = F.grid_sample(
            features.float(), grid, mode=mode, padding_mode="border", align_corners=False
        )
    return out.squeeze(3)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, K, ...) -> (B, ...) = -(top1 - top2): 0 where the best two classes tie, K >= 2."""
    top2 = logits.topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def sample_training_points(
    coarse_logits: torch.Tensor,
    num_points: int,
    oversample: float = 3.0,
    importance: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """coarse_logits (B, K, h, w) -> points (B, N, 2), N = num_points, uncertain ones first.

    Draws M = int(oversample * N) uniform candidates, keeps the U = int(importance * N) with the
    highest ``uncertainty`` of the bilinearly interpolated logits (in descending order), then fills
    the other N - U uniformly. The candidates are drawn from ``generator`` before the fill.
    """
    num_sampled = int(oversample * num_points)
    num_uncertain = int(importance * num_points)
    if not 0 <= num_uncertain <= min(num_points, num_sampled):
        raise ValueError(
            f"importance={importance} and oversample={oversample} must keep "
            f"0 <= importance*N <= min(N, oversample*N) (N={num_points})"
        )
    b, device = coarse_logits.shape[0], coarse_logits.device
    with torch.no_grad():
        candidates = torch.rand(b, num_sampled, 2, generator=generator, device=device)
        scores = uncertainty(point_sample(coarse_logits.detach(), candidates))  # (B, M)
        idx = scores.topk(num_uncertain, dim=1).indices  # (B, U)
        chosen = candidates.gather(1, idx.unsqueeze(2).expand(-1, -1, 2))
        rest = torch.rand(b, num_points - num_uncertain, 2, generator=generator, device=device)
    return torch.cat([chosen, rest], dim=1)


def uncertain_grid_points(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, K, H, W) -> (indices (B, n'), points (B, n', 2)), n' = min(n, H * W).

    The n' most uncertain cells, most uncertain first; index = i * W + j for cell (i, j), its point
    the cell centre ((j + 0.5) / W, (i + 0.5) / H).
    """
    _, _, h, w = logits.shape
    scores = uncertainty(logits).flatten(1)  # (B, H*W)
    indices = scores.topk(min(n, h * w), dim=1).indices
    x = ((indices % w).float() + 0.5) / w
    y = (torch.div(indices, w, rounding_mode="floor").float() + 0.5) / h
    return indices, torch.stack([x, y], dim=2)


# ---------------------------------------------------------------- the point head


class PointHead(nn.Module):
    """Point features -> point logits: detectron2's StandardPointHead, coarse_pred_each_layer.

    ``forward(fine (B, D, N), coarse (B, K, N)) -> (B, K, N)``: three Conv1d(. + K -> channels) with
    ReLU, the coarse logits concatenated again before each layer and before the final Conv1d -> K.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, layers: int = 3):
        super().__init__()
        dims = [in_channels] + [channels] * layers
        self.layers = nn.ModuleList(
            [nn.Conv1d(a + num_classes, b, 1) for a, b in zip(dims, dims[1:])]
        )
        self.predictor = nn.Conv1d(channels + num_classes, num_classes, 1)
        for conv in self.layers:  # detectron2's c2_msra_fill
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)  # starts near "no opinion"
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        x = fine
        for conv in self.layers:
            x = F.relu(conv(torch.cat([x, coarse.to(x.dtype)], dim=1)), inplace=True)
        return self.predictor(torch.cat([x, coarse.to(x.dtype)], dim=1))


# ---------------------------------------------------------------- the refiner


class PointRendOutput(NamedTuple):
    """Training forward: coarse (B, K, h, w), point_logits (B, K, N), points (B, N, 2)."""

    coarse: torch.Tensor
    point_logits: torch.Tensor
    points: torch.Tensor


class PointRend(nn.Module):
    """A Segmenter with a point head: train mode -> ``PointRendOutput``; eval -> logits (B, K, H, W).

    Eval logits are float32 at the input size, like ``Segmenter.forward``. Fewer steps than
    log2(stride) end short of the input resolution: the rest is bilinear upsampling (logged at
    construction). More steps would overshoot it and are an error.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        point_channels: int = 256,
        subdivision_steps: int | None = None,
        subdivision_points: int = 8192,
        train_points: int = 2048,
        oversample: float = 3.0,
        importance: float = 0.75,
    ) -> None:
        super().__init__()
        head = type(segmenter.decoder).__name__
        if segmenter.emits_logits:
            raise ValueError(
                f"PointRend needs a head that exposes fine features (Segmenter.forward_coarse); "
                f"{head} emits class logits. Use a feature head such as FPN (fpn_*)"
            )
        if segmenter.num_classes < 2:
            raise ValueError(
                f"PointRend ranks points by the gap between the two best classes; "
                f"num_classes={segmenter.num_classes} has no second class"
            )
        stride = segmenter.decoder.stride
        if stride < 1 or stride & (stride - 1):
            raise ValueError(f"PointRend subdivides by x2 steps; {head} has stride {stride}")
        full = int(math.log2(stride))
        steps = full if subdivision_steps is None else subdivision_steps
        if not 0 <= steps <= full:
            raise ValueError(
                f"subdivision_steps={steps}: {head} emits stride {stride}, which x2 steps bring to "
                f"the input resolution in {full}; more would overshoot it. Use 0..{full} (or None)"
            )
        if steps < full:
            log.info("PointRend: %d of %d subdivision steps; the last x%d to the input is bilinear",
                     steps, full, 2 ** (full - steps))
        self.segmenter = segmenter
        self.point_head = PointHead(segmenter.decoder.out_channels, segmenter.num_classes,
                                    point_channels)
        self.stride = stride
        self.subdivision_steps = steps
        self.subdivision_points = subdivision_points
        self.train_points, self.oversample, self.importance = train_points, oversample, importance
        self.num_classes = segmenter.num_classes
        self.in_channels = segmenter.in_channels
        self.input_multiple = segmenter.input_multiple

    def check_input(self, x: torch.Tensor) -> None:
        self.segmenter.check_input(x)

    def forward_coarse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.segmenter.forward_coarse(x)

    def point_logits(
        self, coarse: torch.Tensor, features: torch.Tensor, points: torch.Tensor
    ) -> torch.Tensor:
        """coarse (B, K, h, w), features (B, D, h, w), points (B, N, 2) -> logits (B, K, N)."""
        return self.point_head(point_sample(features, points), point_sample(coarse, points))

    def forward_train(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> PointRendOutput:
        """(B, C, H, W) -> coarse logits and point logits at ``train_points`` sampled points."""
        coarse, features = self.segmenter.forward_coarse(x)
        return self.train_outputs(coarse, features, generator)

    def train_outputs(
        self, coarse: torch.Tensor, features: torch.Tensor, generator: torch.Generator | None = None
    ) -> PointRendOutput:
        """Training points sampled on ``coarse`` (B, K, h, w) and their point logits from ``features``."""
        points = sample_training_points(
            coarse, self.train_points, self.oversample, self.importance, generator
        )
        return PointRendOutput(coarse, self.point_logits(coarse, features, points), points)

    def subdivision_step(
        self, logits: torch.Tensor, coarse: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, K, h, w) -> (float32 (B, K, 2h, 2w), refined cell indices (B, n)).

        Bilinear x2, then the n = min(subdivision_points, 4hw) most uncertain cells are replaced by
        the point head's prediction from ``features`` and ``coarse`` sampled at their centres.
        """
        with _fp32(logits):
            up = F.interpolate(logits.float(), scale_factor=2.0, mode="bilinear",
                               align_corners=False)
            indices, points = uncertain_grid_points(up, self.subdivision_points)
        refined = self.point_logits(coarse, features, points)  # the caller's autocast applies
        with _fp32(logits):
            b, k, h, w = up.shape
            flat = up.reshape(b, k, h * w).scatter(
                2, indices.unsqueeze(1).expand(-1, k, -1), refined.float()
            )
        return flat.view(b, k, h, w), indices

    def forward(self, x: torch.Tensor) -> torch.Tensor | PointRendOutput:
        if self.training:
            return self.forward_train(x)
        coarse, features = self.segmenter.forward_coarse(x)
        return self.infer(coarse, features, x.shape[-2:])

    def infer(self, coarse: torch.Tensor, features: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Subdivision from ``coarse`` (B, K, h, w) with ``features`` to float32 logits (B, K, *size).

        Any model that yields the (coarse logits, fine features) pair of this PointRend's segmenter can
        be refined with it (FCtL computes them from its fused features)."""
        logits = coarse
        for _ in range(self.subdivision_steps):
            logits, _ = self.subdivision_step(logits, coarse, features)
        with _fp32(logits):
            logits = logits.float()
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def point_ce(outputs: PointRendOutput, target: torch.Tensor, ignore_index: int,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """CE of the point logits against ``target`` (B, H, W) sampled nearest at the points; with class
    ``weight`` (K,), the weighted mean ``Σ w_y · CE / Σ w_y`` (``models.losses``)."""
    labels = point_sample(target.unsqueeze(1).float(), outputs.points, mode="nearest")
    return _ce(outputs.point_logits, labels.squeeze(1).long(), ignore_index, weight)


def point_rend_loss(outputs: PointRendOutput, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """CE of the coarse logits upsampled (bilinear) to ``target`` (B, H, W) + ``point_ce``."""
    with _fp32(outputs.coarse):
        coarse = F.interpolate(outputs.coarse.float(), size=target.shape[-2:], mode="bilinear",
                               align_corners=False)
    return _ce(coarse, target, ignore_index) + point_ce(outputs, target, ignore_index)


def _ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
        weight: torch.Tensor | None = None) -> torch.Tensor:
    # Mean over kept pixels (weighted by class); an all-ignored batch gives 0 still tied to the graph (DDP
    # needs grads).
    kept = target != ignore_index
    if weight is None:
        total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        return total / kept.sum().clamp(min=1)
    weight = weight.to(logits.device, torch.float32)
    total = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index, reduction="sum")
    return total / weight[target[kept]].sum().clamp(min=torch.finfo(torch.float32).tiny)


def _fp32(t: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=t.device.type, enabled=False)


__all__ = [
    "PointHead",
    "PointRend",
    "PointRendOutput",
    "point_ce",
    "point_rend_loss",
    "point_sample",
    "sample_training_points",
    "uncertain_grid_points",
    "uncertainty",
]
