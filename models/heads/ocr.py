"""OCRNet head (Yuan, Chen & Wang 2020): object-contextual representations.

As mmsegmentation's ResNet OCRNet: an auxiliary FCN head on the second-to-last encoder map
predicts soft object regions (K = num_classes logits); the last map, after a 3x3 conv-BN-ReLU, is
the pixel representation. Then:

1. object region representations: f_k = sum_p softmax_p(region logits_k)[p] * x_p, the
   representation averaged over each class's spatial softmax (one D-vector per class);
2. pixel-region relation: w_pk = softmax_k(q(x_p) . k(f_k) / sqrt(Dk)), with q and k two
   1x1 conv-BN-ReLU each (key channels Dk = 2 * width);
3. object contextual representation: y_p = up(sum_k w_pk v(f_k)), v and up 1x1 conv-BN-ReLU;
4. augmented representation: 1x1 conv-BN-ReLU of concat(y_p, x_p), D = 4 * width channels, which
   the Segmenter's classifier maps to classes.

``forward_aux`` returns the soft-region logits as ``"soft_regions"`` (at the stride of the map they
are computed from); train them with cross-entropy against the labels (weight 0.4 in the paper),
as the paper supervises them.

Global context: the region representations average over the whole input, so with tiled inference
a pixel's prediction depends on the tile it is in (as in the paper), everywhere, not only near
tile borders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.base import ConvBNReLU, EncoderSpec, Head, init_convs


class OCRHead(Head):
    """Last two encoder maps -> (B, 4 * width, H/s, W/s) and soft-region logits; s = last stride."""

    aux_outputs = ("soft_regions",)

    def __init__(self, encoder: EncoderSpec, num_classes: int, width: int = 64) -> None:
        super().__init__()
        if len(encoder.channels) < 2:
            raise ValueError(f"OCRHead needs 2 encoder maps, got strides {encoder.strides}")
        c4, c5 = encoder.channels[-2:]
        ch, key = 4 * width, 2 * width
        self.aux = nn.Sequential(ConvBNReLU(c4, ch), nn.Conv2d(ch, num_classes, 1))
        self.bottleneck = ConvBNReLU(c5, ch)
        self.query = nn.Sequential(ConvBNReLU(ch, key, 1), ConvBNReLU(key, key, 1))
        self.key = nn.Sequential(ConvBNReLU(ch, key, 1), ConvBNReLU(key, key, 1))
        self.value = ConvBNReLU(ch, key, 1)
        self.up = ConvBNReLU(key, ch, 1)
        self.fuse = nn.Sequential(ConvBNReLU(2 * ch, ch, 1), nn.Dropout(0.05))
        self.key_channels = key
        self.out_channels = ch
        self.stride = encoder.strides[-1]
        init_convs(self)

    def forward_aux(
        self, features: list[torch.Tensor], stem: object = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """features[-2:]: (B, C4, H/s4, W/s4), (B, C5, H/s, W/s) ->
        ((B, D, H/s, W/s), {"soft_regions": (B, K, H/s4, W/s4)})."""
        regions_logits = self.aux(features[-2])
        x = self.bottleneck(features[-1])
        b, _, h, w = x.shape
        logits = regions_logits
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        weights = torch.softmax(logits.flatten(2).float(), dim=2).to(x.dtype)  # (B, K, N)
        regions = torch.bmm(weights, x.flatten(2).transpose(1, 2))  # (B, K, D)
        regions = regions.transpose(1, 2).unsqueeze(-1)  # (B, D, K, 1)
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, Dk)
        k = self.key(regions).flatten(2)  # (B, Dk, K)
        v = self.value(regions).flatten(2).transpose(1, 2)  # (B, K, Dk)
        relation = torch.softmax(torch.bmm(q, k).float() * self.key_channels**-0.5, dim=-1)
        context = torch.bmm(relation.to(v.dtype), v)  # (B, N, Dk)
        context = self.up(context.transpose(1, 2).reshape(b, self.key_channels, h, w))
        return self.fuse(torch.cat([context, x], dim=1)), {"soft_regions": regions_logits}
