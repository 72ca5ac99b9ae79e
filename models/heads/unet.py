"""U-Net decoder (Ronneberger et al. 2015) on a ResNet encoder, as segmentation_models.pytorch.

The encoder is U-Net's contracting path; the decoder has four up stages. Each takes the map so far,
upsamples it x2 (nearest) where the skip map is finer, concatenates the skip and applies
conv3x3-BN-ReLU twice. The skips are the encoder maps at strides 16, 8, 4 and the stem's stride-2
output, so the head ends at stride 2 with ``width // 2`` channels; the Segmenter's 1x1 classifier
and bilinear x2 upsampling finish it. Stage widths are 4w, 2w, w, w/2 (w = width): 256 ... 32 at
the published width 64, like smp's (256, 128, 64, 32) before its last, skip-less stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.base import ConvBNReLU, EncoderSpec, Head, init_convs
from models.resnet import EncoderStem


class _UpStage(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_ch + skip_ch, out_ch)
        self.conv2 = ConvBNReLU(out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, h, w), skip (B, skip_ch, h or 2h, w or 2w) -> (B, out_ch, *skip's size)."""
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class UNetDecoder(Head):
    """4 encoder maps + stem -> (B, width // 2, H/2, W/2)."""

    uses_stem = True

    def __init__(self, encoder: EncoderSpec, num_classes: int, width: int = 64) -> None:
        super().__init__()
        if len(encoder.channels) != 4 or encoder.stem_channels is None:
            raise ValueError(
                "UNetDecoder needs an encoder with 4 maps and a stem (forward_with_stem), got "
                f"{encoder}"
            )
        # Skips from coarse to fine: c4, c3, c2, stem.
        skips = (*encoder.channels[-2::-1], encoder.stem_channels)
        widths = (4 * width, 2 * width, width, width // 2)
        ins = (encoder.channels[-1], *widths[:-1])
        self.stages = nn.ModuleList(
            [_UpStage(i, s, o) for i, s, o in zip(ins, skips, widths, strict=True)]
        )
        self.out_channels = widths[-1]
        self.stride = encoder.stem_stride
        init_convs(self)

    def forward(
        self, features: list[torch.Tensor], stem: EncoderStem | None = None
    ) -> torch.Tensor:
        """features: 4 maps (fine to coarse), stem: EncoderStem -> (B, width // 2, H/2, W/2)."""
        if stem is None:
            raise ValueError("UNetDecoder needs the encoder's stem: call head(features, stem)")
        x = features[-1]
        for stage, skip in zip(self.stages, (*features[-2::-1], stem.features), strict=True):
            x = stage(x, skip)
        return x
