"""Encoder + decoder + 1x1 classifier: the one model class the pipeline runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Segmenter(nn.Module):
    """Per-pixel class logits for a normalised image.

    ``encoder(x)`` must return a list of feature maps and expose ``in_channels``,
    ``out_channels`` and ``strides``;
    ``decoder(features)`` must return one map at stride ``decoder.stride`` with
    ``decoder.out_channels`` channels. Any pair honouring that contract plugs in.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.classifier = nn.Conv2d(decoder.out_channels, num_classes, 1)
        self.num_classes = num_classes
        self.in_channels: int = encoder.in_channels
        # H and W must be multiples of the coarsest stride so every stage halves exactly and the
        # decoder's x2 upsamplings land back on the stride-4 grid.
        self.input_multiple: int = max(encoder.strides)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is (B, in_channels, H, W), H, W multiples of input_multiple."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected a (B, {self.in_channels}, H, W) batch, got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        m = self.input_multiple
        if h % m or w % m:
            raise ValueError(
                f"input of shape {tuple(x.shape)} has H={h}, W={w}, which must both be "
                f"multiples of {m} (the encoder's coarsest stride); pad or crop tiles to a "
                f"multiple of {m}"
            )

    def forward_coarse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (coarse logits (B, K, H/s, W/s), fine features (B, D, H/s, W/s)).

        s = decoder.stride (4), K = num_classes, D = decoder.out_channels: the pair a point-based
        refiner (PointRend) samples at uncertain points.
        """
        self.check_input(x)
        features = self.decoder(self.encoder(x))
        return self.classifier(features), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) normalised float -> float32 logits (B, num_classes, H, W).

        float32 even under bf16/fp16 autocast: bf16's 8-bit mantissa makes near-equal logits tie
        after upsampling, and callers blend and argmax these.
        """
        logits, _ = self.forward_coarse(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.interpolate(
                logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False
            )
