"""Encoder + head (+ 1x1 classifier): the one model class the pipeline runs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Segmenter(nn.Module):
    """Per-pixel class logits for a normalised image.

    ``encoder(x)`` must return a list of feature maps and expose ``in_channels``,
    ``out_channels`` and ``strides`` (and ``forward_with_stem`` for heads with ``uses_stem``);
    ``decoder(features, stem)`` follows the head contract of ``models.heads.base``: one map at
    stride ``decoder.stride`` with ``decoder.out_channels`` channels. A head that emits features
    gets a 1x1 ``classifier`` to ``num_classes``; one that emits logits (``emits_logits``) gets
    none (``classifier`` is the identity). Any pair honouring that contract plugs in.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.emits_logits: bool = getattr(decoder, "emits_logits", False)
        self.uses_stem: bool = getattr(decoder, "uses_stem", False)
        if self.emits_logits and decoder.out_channels != num_classes:
            raise ValueError(
                f"{type(decoder).__name__} emits {decoder.out_channels} logits per pixel, "
                f"the model has num_classes={num_classes}; build the head with num_classes"
            )
        if self.uses_stem and not hasattr(encoder, "forward_with_stem"):
            raise ValueError(
                f"{type(decoder).__name__} reads the encoder's stem; "
                f"{type(encoder).__name__} has no forward_with_stem"
            )
        self.classifier: nn.Module = (
            nn.Identity() if self.emits_logits else nn.Conv2d(decoder.out_channels, num_classes, 1)
        )
        self.num_classes = num_classes
        self.in_channels: int = encoder.in_channels
        # H and W must be multiples of the coarsest stride so every stage halves exactly and the
        # decoder's x2 upsamplings (and unpoolings) land back on the finer grids; a head that resamples
        # by size (``any_input_size``) takes any size.
        self.input_multiple: int = 1 if getattr(decoder, "any_input_size", False) else max(encoder.strides)

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

    def _decode(self, x: torch.Tensor, aux: bool = False) -> Any:
        """The head's output (and, with ``aux``, its auxiliary logits) for the checked input."""
        self.check_input(x)
        features, stem = (
            self.encoder.forward_with_stem(x) if self.uses_stem else (self.encoder(x), None)
        )
        return self.decoder.forward_aux(features, stem) if aux else self.decoder(features, stem)

    def forward_coarse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (coarse logits (B, K, H/s, W/s), fine features (B, D, H/s, W/s)).

        s = decoder.stride (4 for FPN), K = num_classes, D = decoder.out_channels: the pair a
        point-based refiner (PointRend) samples at uncertain points. Needs a head that emits
        features (not logits).
        """
        if self.emits_logits:
            raise ValueError(
                f"forward_coarse needs a head that emits features; {type(self.decoder).__name__} "
                "emits logits: use forward, or a head such as FPNDecoder"
            )
        features = self._decode(x)
        return self.classifier(features), features

    def forward_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, in_channels, H, W) -> (forward's logits, {name: auxiliary logits (B, K, H, W)}).

        For training losses on auxiliary outputs (OCRNet's ``"soft_regions"``); float32, at the
        input size, like ``forward``. Heads without auxiliary outputs give an empty dict.
        """
        out, aux = self._decode(x, aux=True)
        size = x.shape[-2:]
        logits = _upsample(self.classifier(out), size)
        return logits, {name: _upsample(a, size) for name, a in aux.items()}

    def forward(self, x: torch.Tensor, aux: bool = False):
        """(B, in_channels, H, W) normalised float -> float32 logits (B, num_classes, H, W).

        float32 even under bf16/fp16 autocast: bf16's 8-bit mantissa makes near-equal logits tie
        after upsampling, and callers blend and argmax these. ``aux=True`` returns ``forward_aux(x)``
        instead, through ``forward`` so a DistributedDataParallel wrapper still syncs its gradients.
        """
        if aux:
            return self.forward_aux(x)
        return _upsample(self.classifier(self._decode(x)), x.shape[-2:])


def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """(B, K, h, w) -> float32 (B, K, *size), bilinear (align_corners=False), autocast off."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        if logits.shape[-2:] == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
