"""FCN-8s as published (Long, Shelhamer & Darrell, CVPR 2015), on VGG-16 (``models.vgg``).

The original architecture, in the layout of FCtL's local model (github liqiokkk/FCtL, ``models/fcn.py``), so
its weights load (``models.reference.fctl``); ``models.heads.fcn`` is gigaseg's FCN-8s for ResNets. With the
VGG maps ``pool3`` (C3), ``pool4`` (C4), ``pool5`` (C5), ``K`` classes and the input ``H × W``::

    score  = output(pool5)                      conv6 7×7 (no padding) → ReLU → Dropout → conv7 1×1 → ReLU →
                                                Dropout → 1×1 to K  (fc6/fc7 as convs; 64·width channels)
    up     = up_output(score)                   transposed conv 4×4, stride 2
    s4     = up_pool4_out(adj_pool4(0.01 · pool4)[5:, 5:] + up)              crop to up's size
    final  = up_final(adj_pool3(0.0001 · pool3)[9:, 9:] + s4)                crop to s4's size; 16×16, stride 8
    logits = final[31 : 31 + H, 31 : 31 + W]

The offsets 5, 9, 31 undo VGG's 100 px padding; the 0.01 and 0.0001 scales on pool4 and pool3 are FCN's
"at-once" training trick. The three transposed convs are bilinear upsampling and stay fixed (buffers, as the
reference freezes them). Any input size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.base import EncoderSpec, Head
from models.heads.fcn import bilinear_kernel

POOL4_SCALE, POOL3_SCALE = 0.01, 0.0001
POOL4_OFFSET, POOL3_OFFSET, FINAL_OFFSET = 5, 9, 31


class FixedUpsample(nn.Module):
    """A transposed conv (``k × k``, stride ``s``, no bias) whose weight is a buffer, not a parameter: FCN-8s'
    fixed bilinear upsampling (the reference freezes it). ``weight`` (K, K, k, k) keeps the state-dict name of
    the reference's ``ConvTranspose2d``."""

    def __init__(self, channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.register_buffer("weight", bilinear_kernel(channels, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight.to(x.dtype), stride=self.stride)


class FCN8sHead(Head):
    """``[pool3, pool4, pool5]`` and the input size → logits ``(B, K, H, W)``."""

    emits_logits = True
    uses_stem = True  # the "stem" of models.vgg.VGG16Encoder is the input size, for the last crop
    any_input_size = True
    output_strides = (32,)

    def __init__(self, encoder: EncoderSpec, num_classes: int, width: int = 64) -> None:
        super().__init__()
        if len(encoder.channels) != 3:
            raise ValueError(f"FCN8sHead needs VGG's pool3, pool4, pool5; got {len(encoder.channels)} maps")
        c3, c4, c5 = encoder.channels
        fc = 8 * c5  # 4096 at width 64
        k = num_classes
        self.output = nn.Sequential(nn.Conv2d(c5, fc, 7), nn.ReLU(inplace=True), nn.Dropout(),
                                    nn.Conv2d(fc, fc, 1), nn.ReLU(inplace=True), nn.Dropout(),
                                    nn.Conv2d(fc, k, 1))
        self.adj_pool3 = nn.Conv2d(c3, k, 1)
        self.adj_pool4 = nn.Conv2d(c4, k, 1)
        self.up_output = FixedUpsample(k, 4, 2)
        self.up_pool4_out = FixedUpsample(k, 4, 2)
        self.up_final = FixedUpsample(k, 16, 8)
        self.out_channels = k
        self.stride = 1
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor], stem=None) -> torch.Tensor:
        if stem is None:
            raise ValueError("FCN8sHead crops its output to the input size: call it with the encoder's "
                             "forward_with_stem (models.vgg.VGG16Encoder), whose stem is that size")
        pool3, pool4, pool5 = features
        up = self.up_output(self.output(pool5))
        h, w = up.shape[-2:]
        a = POOL4_OFFSET
        s4 = self.up_pool4_out(self.adj_pool4(POOL4_SCALE * pool4)[:, :, a : a + h, a : a + w] + up)
        h, w = s4.shape[-2:]
        a = POOL3_OFFSET
        final = self.up_final(self.adj_pool3(POOL3_SCALE * pool3)[:, :, a : a + h, a : a + w] + s4)
        a = FINAL_OFFSET
        return final[:, :, a : a + stem[0], a : a + stem[1]].contiguous()


__all__ = ["FCN8sHead"]
