"""DeepLab v3 head (Chen et al. 2017): atrous spatial pyramid pooling on an atrous ResNet.

ASPP on the encoder's last map, five parallel branches concatenated and projected by a 1x1
conv-BN-ReLU: a 1x1 conv, three 3x3 convs at atrous rates 6, 12, 18 (doubled to 12, 24, 36 at
output stride 8, as the paper does), and image pooling (global average -> 1x1 conv -> ReLU ->
broadcast back). Then a 3x3 conv-BN-ReLU (torchvision's DeepLabHead) gives the features the
Segmenter's classifier maps to classes, at the encoder's output stride (16 or 8 only).

The image-pooling branch has a bias instead of BatchNorm: it sees one value per channel and
image, which train-mode BN cannot normalise at batch size 1.

Global context: the image-pooling branch averages over the whole input, so with tiled inference a
pixel's prediction depends on the tile it is in (as in the paper, which also evaluates on crops);
tiled and whole-image predictions differ everywhere, not only near tile borders.
"""

from __future__ import annotations

import torch
from torch import nn

from models.heads.base import ConvBNReLU, EncoderSpec, Head, init_convs

BASE_RATES = (6, 12, 18)  # at output stride 16


class _ImagePooling(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, h, w) -> (B, out_ch, h, w), constant over (h, w)."""
        pooled = self.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return pooled.expand(-1, -1, *x.shape[-2:])


class DeepLabV3Head(Head):
    """Last encoder map (stride 16 or 8) -> (B, 4 * width, H/s, W/s), s = its stride."""

    output_strides = (16, 8)

    def __init__(self, encoder: EncoderSpec, num_classes: int, width: int = 64) -> None:
        super().__init__()
        stride = encoder.strides[-1]
        if stride not in self.output_strides:
            raise ValueError(
                f"DeepLabV3Head needs an encoder of output stride 16 or 8, got {stride}; build "
                "the encoder with output_stride=16 (or 8)"
            )
        in_ch, ch = encoder.channels[-1], 4 * width
        self.rates = tuple(r * 16 // stride for r in BASE_RATES)
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_ch, ch, kernel=1)]
            + [ConvBNReLU(in_ch, ch, dilation=r) for r in self.rates]
            + [_ImagePooling(in_ch, ch)]
        )
        self.project = nn.Sequential(ConvBNReLU(5 * ch, ch, kernel=1), nn.Dropout(0.1))
        self.conv = ConvBNReLU(ch, ch)
        self.out_channels = ch
        self.stride = stride
        init_convs(self)

    def forward(self, features: list[torch.Tensor], stem: object = None) -> torch.Tensor:
        """features[-1]: (B, C, H/s, W/s) -> (B, 4 * width, H/s, W/s)."""
        x = features[-1]
        x = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.conv(self.project(x))
