"""MagNet's FPN decoder (Huynh et al., CVPR 2021; github VinAIResearch/MagNet, ``magnet/model/fpn.py``).

The segmenter of MagNet's DeepGlobe results, kept layer for layer so its published weights load
(``models.reference.magnet``). It differs from gigaseg's semantic FPN (``models.heads.fpn``):

- laterals: a 1×1 conv per encoder map to ``4·width`` channels (256 at width 64);
- top-down: ``p_i = bilinear(p_{i+1}, size of c_i) + lateral(c_i)`` (align_corners=False; by size, so any
  input size works);
- per level two 3×3 convs, ``4·width → 4·width → 2·width``, no BatchNorm and no ReLU between them;
- the four levels, coarsest first (``p5, p4, p3, p2``), upsampled bilinearly to ``p2``'s size and
  concatenated (``4 · 2·width`` channels), then a 3×3 conv to the class logits at stride 4.

It emits logits; the Segmenter upsamples them bilinearly to the input size, as the reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.base import EncoderSpec, Head


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class MagnetFPNHead(Head):
    """4 encoder maps ``(B, channels[i], h_i, w_i)`` → logits ``(B, K, h_0, w_0)`` (``h_0``: the finest map's)."""

    emits_logits = True
    any_input_size = True  # every resampling is by size: the reference runs on 508², 612², 2448² alike
    output_strides = (32,)

    def __init__(self, encoder: EncoderSpec, num_classes: int, width: int = 64) -> None:
        super().__init__()
        if len(encoder.channels) != 4:
            raise ValueError(f"MagnetFPNHead needs 4 encoder maps, got strides {encoder.strides}")
        pyramid, level = 4 * width, 2 * width
        self.lateral = nn.ModuleList(nn.Conv2d(c, pyramid, 1) for c in encoder.channels)
        self.smooth1 = nn.ModuleList(nn.Conv2d(pyramid, pyramid, 3, padding=1) for _ in encoder.channels)
        self.smooth2 = nn.ModuleList(nn.Conv2d(pyramid, level, 3, padding=1) for _ in encoder.channels)
        self.classify = nn.Conv2d(4 * level, num_classes, 3, padding=1)
        self.out_channels = num_classes
        self.stride = encoder.strides[0]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor], stem: object = None) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = _resize(laterals[i], laterals[i - 1].shape[-2:]) + laterals[i - 1]
        levels = [s2(s1(p)) for s1, s2, p in zip(self.smooth1, self.smooth2, laterals, strict=True)]
        size = levels[0].shape[-2:]
        # coarsest first, as the reference concatenates (p5, p4, p3, p2): the classifier's weights follow it
        stacked = torch.cat([_resize(p, size) if p.shape[-2:] != size else p for p in reversed(levels)], dim=1)
        return self.classify(stacked)
