"""ResNet encoders (He et al. 2016) in plain torch, returning the four stage outputs.

The encoder contract every decoder relies on: ``forward(x)`` returns a list of 4 feature maps,
``in_channels`` is the input channel count, ``out_channels`` the maps' channel counts and
``strides`` their downsampling factors. With ``output_stride`` 16 or 8 the last stages trade their
stride for dilation (DeepLab style), so a decoder must read ``strides`` rather than assume
4, 8, 16, 32.

Heads that decode to stride 2 (U-Net, SegNet) also read the stem: ``forward_with_stem(x)`` returns
the same 4 maps plus an ``EncoderStem``, the stride-2 stem output (``stem_channels`` channels, at
``stem_stride``) and the indices of the stem's max-pool (the one max-pool a ResNet has), which
SegNet's decoder unpools with. ``forward(x)`` is unchanged and does not compute the indices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# output_stride -> which of layer2..layer4 replace their stride-2 by dilation.
_DILATE_STAGES: dict[int, tuple[bool, bool, bool]] = {
    32: (False, False, False),
    16: (False, False, True),
    8: (False, True, True),
}


class EncoderStem(NamedTuple):
    """The stem's output and where its max-pool took each value from."""

    features: torch.Tensor  # (B, stem_channels, H/2, W/2), after conv7x7-BN-ReLU, before the pool
    # (B, stem_channels, H/4, W/4) int64: flat index into the (H/2) x (W/2) plane of ``features``
    # of each pooled value (F.max_pool2d(..., return_indices=True)); kernel 3, stride 2, padding 1.
    pool_indices: torch.Tensor


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or projected) shortcut; used by resnet18/34."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, planes, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, torchvision "v1.5" placement), 1x1 expand x4; used by resnet50."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, 4*planes, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """Stem (conv7x7/2, BN, ReLU, maxpool/2) then four residual stages.

    ``width`` is the stem/first-stage channel count (64 in the paper); stage ``i`` has
    ``width * 2**i`` planes, so a narrow variant (16, 32) keeps the same shape at a fraction of the
    compute.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int = 3,
        width: int = 64,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if output_stride not in _DILATE_STAGES:
            raise ValueError(
                f"output_stride={output_stride} is not supported; use one of "
                f"{sorted(_DILATE_STAGES)}"
            )
        self.in_channels = in_channels
        self._in_ch = width
        self._dilation = 1
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stem_channels: int = width
        self.stem_stride: int = 2

        dilate = _DILATE_STAGES[output_stride]
        self.layer1 = self._make_stage(block, width, layers[0])
        self.layer2 = self._make_stage(block, width * 2, layers[1], 2, dilate[0])
        self.layer3 = self._make_stage(block, width * 4, layers[2], 2, dilate[1])
        self.layer4 = self._make_stage(block, width * 8, layers[3], 2, dilate[2])

        self.out_channels: tuple[int, ...] = tuple(width * 2**i * block.expansion for i in range(4))
        strides = [4]
        for dilated in dilate:
            strides.append(strides[-1] if dilated else strides[-1] * 2)
        self.strides: tuple[int, ...] = tuple(strides)
        self._init_weights()

    def _make_stage(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        # Same rule as torchvision's replace_stride_with_dilation: the first block of a dilated
        # stage keeps the previous dilation, later blocks use the increased one.
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._in_ch, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(self._in_ch, planes, stride, previous_dilation, downsample)]
        self._in_ch = planes * block.expansion
        stage += [block(self._in_ch, planes, dilation=self._dilation) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch (Goyal et al. 2017): every block starts as
        # its shortcut, so activations keep their scale through depth even in eval mode with fresh
        # running stats (where BN is the identity and cannot renormalise anything).
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, in_channels, H, W) -> 4 maps (B, out_channels[i], H/strides[i], W/strides[i])."""
        return self._stages(self.maxpool(self._stem(x)))

    def forward_with_stem(self, x: torch.Tensor) -> tuple[list[torch.Tensor], EncoderStem]:
        """(B, in_channels, H, W) -> (the 4 maps of ``forward``, the stem and its pool indices)."""
        stem = self._stem(x)
        m = self.maxpool
        pooled, indices = F.max_pool2d(
            stem, m.kernel_size, m.stride, m.padding, return_indices=True
        )
        return self._stages(pooled), EncoderStem(stem, indices)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


class ResNet10Encoder(ResNetEncoder):
    """One BasicBlock per stage: half of resnet18's depth, for models that train on a CPU."""

    def __init__(self, in_channels: int = 3, width: int = 64, output_stride: int = 32) -> None:
        super().__init__(BasicBlock, (1, 1, 1, 1), in_channels, width, output_stride)


class ResNet18Encoder(ResNetEncoder):
    def __init__(self, in_channels: int = 3, width: int = 64, output_stride: int = 32) -> None:
        super().__init__(BasicBlock, (2, 2, 2, 2), in_channels, width, output_stride)


class ResNet34Encoder(ResNetEncoder):
    def __init__(self, in_channels: int = 3, width: int = 64, output_stride: int = 32) -> None:
        super().__init__(BasicBlock, (3, 4, 6, 3), in_channels, width, output_stride)


class ResNet50Encoder(ResNetEncoder):
    def __init__(self, in_channels: int = 3, width: int = 64, output_stride: int = 32) -> None:
        super().__init__(Bottleneck, (3, 4, 6, 3), in_channels, width, output_stride)
