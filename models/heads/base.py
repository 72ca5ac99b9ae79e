"""The head contract: what every head gets from its encoder and what it gives the Segmenter.

A head is built as ``Head(encoder: EncoderSpec, num_classes, width)`` and called as
``head(features, stem)``:

- ``features[i]``: (B, encoder.channels[i], H/encoder.strides[i], W/encoder.strides[i]), the
  encoder's maps from fine (stride 4) to coarse; ``stem`` is the encoder's stride-2 stem output and
  its max-pool indices (``models.resnet.EncoderStem``) for heads with ``uses_stem``, else None.
- It returns one map (B, out_channels, H/stride, W/stride). With ``emits_logits`` False that map is
  features and the Segmenter's 1x1 ``classifier`` turns them into class logits; heads whose design
  works in class space (FCN's score fusion, DUpsampling's label reconstruction) set
  ``emits_logits`` and return the logits themselves (out_channels == num_classes).
- ``forward_aux`` also returns auxiliary logits for training losses (OCRNet's soft object
  regions), by name; heads without any return an empty dict.
- ``output_strides`` lists the encoder output strides the head supports, its default first.
- ``any_input_size``: the head resamples by size, so the model takes inputs of any height and width (the
  reference architectures MagNet-FPN and FCN-8s on VGG do); otherwise inputs are multiples of the
  encoder's coarsest stride.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderSpec:
    """What a head needs to know of its encoder: the maps' channels and strides, and its stem's."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    stem_channels: int | None = None
    stem_stride: int | None = None

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError(
                f"encoder channels {self.channels} and strides {self.strides} must have one "
                "entry per feature map"
            )
        if any(b not in (a, 2 * a) for a, b in zip(self.strides, self.strides[1:])):
            raise ValueError(
                f"encoder strides {self.strides} must each equal or double the previous one"
            )

    @classmethod
    def of(cls, encoder: nn.Module) -> EncoderSpec:
        return cls(
            tuple(encoder.out_channels),
            tuple(encoder.strides),
            getattr(encoder, "stem_channels", None),
            getattr(encoder, "stem_stride", None),
        )


class Head(nn.Module):
    """Base class of every head: the contract's class attributes and a default ``forward_aux``."""

    emits_logits: ClassVar[bool] = False
    uses_stem: ClassVar[bool] = False
    aux_outputs: ClassVar[tuple[str, ...]] = ()  # names forward_aux returns, for training losses
    output_strides: ClassVar[tuple[int, ...]] = (32, 16, 8)
    any_input_size: ClassVar[bool] = False
    out_channels: int
    stride: int

    def forward(self, features: list[torch.Tensor], stem: Any = None) -> torch.Tensor:
        return self.forward_aux(features, stem)[0]

    def forward_aux(
        self, features: list[torch.Tensor], stem: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(output of ``forward``, {name: auxiliary logits (B, num_classes, h, w)})."""
        return self(features, stem), {}


class ConvBNReLU(nn.Sequential):
    """conv (k x k, 'same' padding, optional dilation) - BatchNorm - ReLU.

    BatchNorm, never GroupNorm/LayerNorm over spatial dims: at inference BN is a fixed per-channel
    affine, so a head stays local and tiled inference equals whole-image inference away from tile
    borders (heads with global context say so in their docstrings).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, dilation: int = 1) -> None:
        pad = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


def init_convs(module: nn.Module) -> None:
    """He-normal (fan_out) conv weights and zero biases, as the encoders; BN to identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
