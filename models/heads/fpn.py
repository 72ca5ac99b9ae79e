"""Semantic FPN decoder: the semantic branch of Panoptic FPN (Kirillov et al. 2019).

Lateral 1x1 convs bring every encoder map to ``pyramid_channels`` (2 * width); a top-down pass
adds each coarser level, upsampled, to the next finer one; a 3x3 conv smooths each sum. Each pyramid
level is then brought to stride 4 by a stack of conv3x3-BatchNorm-ReLU blocks (``width`` channels),
each followed by a bilinear x2 upsampling while the level is still coarser than stride 4, and the
levels are summed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.base import ConvBNReLU, EncoderSpec, Head


class _SegmentationLevel(nn.Module):
    """conv-BN-ReLU blocks taking one pyramid level from ``stride`` to stride 4."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.n_upsamples = int(math.log2(stride // 4))
        n_blocks = max(1, self.n_upsamples)
        self.blocks = nn.ModuleList(
            [ConvBNReLU(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, h, w) -> (B, out_ch, h * 2**n_upsamples, w * 2**n_upsamples)."""
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < self.n_upsamples:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return x


class FPNDecoder(Head):
    """Encoder feature maps -> one stride-4 map of ``width`` channels (pyramid: 2 * width).

    The coarse head PointRend wraps (``Segmenter.forward_coarse``). ``num_classes`` is unused: FPN
    emits features and the Segmenter's classifier maps them to classes.
    """

    def __init__(self, encoder: EncoderSpec, num_classes: int, width: int = 64) -> None:
        super().__init__()
        encoder_channels, encoder_strides = encoder.channels, encoder.strides
        pyramid_channels, segmentation_channels = 2 * width, width
        if encoder_strides[0] != 4 or any(s < 4 or s & (s - 1) for s in encoder_strides):
            raise ValueError(
                "FPNDecoder needs power-of-two encoder strides starting at 4, "
                f"got {encoder_strides}"
            )
        self.lateral = nn.ModuleList(
            [nn.Conv2d(c, pyramid_channels, 1) for c in encoder_channels]
        )
        self.smooth = nn.ModuleList(
            [nn.Conv2d(pyramid_channels, pyramid_channels, 3, padding=1) for _ in encoder_channels]
        )
        self.levels = nn.ModuleList(
            [
                _SegmentationLevel(pyramid_channels, segmentation_channels, s)
                for s in encoder_strides
            ]
        )
        self.out_channels = segmentation_channels
        self.stride = 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)  # detectron2's c2_xavier_fill
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor], stem: object = None) -> torch.Tensor:
        """features[i]: (B, channels[i], H/strides[i], W/strides[i]) -> (B, width, H/4, W/4)."""
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            coarse = laterals[i]
            if coarse.shape[-2:] != laterals[i - 1].shape[-2:]:
                # Nearest as in the FPN paper; by size, not scale, so dilated (same-size) levels
                # and any power-of-two gap both work.
                coarse = F.interpolate(coarse, size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + coarse
        pyramid = [conv(p) for conv, p in zip(self.smooth, laterals, strict=True)]
        out = self.levels[0](pyramid[0])
        for level, p in zip(self.levels[1:], pyramid[1:], strict=True):
            out = out + level(p)
        return out
