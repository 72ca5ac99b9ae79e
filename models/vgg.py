"""VGG-16 (Simonyan & Zisserman 2015) as FCN-8s uses it (Long, Shelhamer & Darrell 2015), returning pool3..pool5.

The layout of FCN-8s' original Caffe model and of its PyTorch ports (FCtL's local model, github liqiokkk/FCtL,
``models/fcn.py``): torchvision's VGG-16 feature layers (13 3×3 convs with ReLU, five 2×2 max-pools), with

- the first conv padded by 100 px, so small inputs still reach pool5 and every crop the head takes fits;
- every max-pool in ``ceil_mode``, so map sizes round up and the head's upsamplings cover the input.

The maps are therefore not exactly ``H/8``, ``H/16``, ``H/32``: ``strides`` are nominal and the FCN-8s head
(``models.heads.fcn8s``) crops by the offsets the padding leaves. That head needs the input size for its last
crop, so ``forward_with_stem`` returns it as the "stem" (``InputSize``).

``width`` is the first block's channels (64 in the paper): blocks have ``width · (1, 2, 4, 8, 8)``. The
Sequential names and indices follow the reference (``pool3.0`` … ``pool5.4``) so its weights map one to one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

# convs per block of VGG-16 ("D")
_BLOCKS = (2, 2, 3, 3, 3)
FIRST_PADDING = 100


class InputSize(NamedTuple):
    """The input's (height, width): what the FCN-8s head needs to crop its output back to the input."""

    h: int
    w: int


def _block(in_ch: int, out_ch: int, convs: int, first_padding: int = 1) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=first_padding if i == 0 else 1),
                   nn.ReLU(inplace=True)]
    return [*layers, nn.MaxPool2d(2, stride=2, ceil_mode=True)]


class VGG16Encoder(nn.Module):
    """``(B, in_channels, H, W)`` → ``[pool3, pool4, pool5]`` with ``width·(4, 8, 8)`` channels, about
    ``(H + 198)/8``, ``/16``, ``/32`` a side (rounded up at each pool)."""

    def __init__(self, in_channels: int = 3, width: int = 64, output_stride: int = 32) -> None:
        super().__init__()
        if output_stride != 32:
            raise ValueError(f"VGG16Encoder has output stride 32 only, got {output_stride}")
        c = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        # pool3 = blocks 1-3 (torchvision's features[:17]), pool4 = block 4 ([17:24]), pool5 = block 5 ([24:])
        self.pool3 = nn.Sequential(*_block(in_channels, c[0], _BLOCKS[0], FIRST_PADDING),
                                   *_block(c[0], c[1], _BLOCKS[1]), *_block(c[1], c[2], _BLOCKS[2]))
        self.pool4 = nn.Sequential(*_block(c[2], c[3], _BLOCKS[3]))
        self.pool5 = nn.Sequential(*_block(c[3], c[4], _BLOCKS[4]))
        self.in_channels = in_channels
        self.out_channels: tuple[int, ...] = (c[2], c[3], c[4])
        self.strides: tuple[int, ...] = (8, 16, 32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.pool3(x)
        p4 = self.pool4(p3)
        return [p3, p4, self.pool5(p4)]

    def forward_with_stem(self, x: torch.Tensor) -> tuple[list[torch.Tensor], InputSize]:
        """The maps of ``forward`` and the input's size (the FCN-8s head's final crop)."""
        return self.forward(x), InputSize(*x.shape[-2:])


__all__ = ["FIRST_PADDING", "InputSize", "VGG16Encoder"]
