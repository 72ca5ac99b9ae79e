"""FCN-8s (Long, Shelhamer & Darrell 2015) on a ResNet: class scores fused across three strides.

FCN's pool3 / pool4 / pool5 are the encoder's last three maps here (strides 8, 16, 32 at output
stride 32). A conv3x3-BN-ReLU block on the coarsest map plays fc6/fc7 (as torchvision's FCNHead),
then each of the three maps gets a 1x1 score layer (-> num_classes). Fusion is in class space:
the coarsest scores are upsampled x2 by a learned transposed conv initialised to bilinear
interpolation and added to the next finer scores, twice, giving logits at stride 8 (the Segmenter's
bilinear upsampling is FCN's fixed final x8 deconvolution). Where a dilated encoder (output stride
16 or 8) keeps two maps at one stride, their scores are added without upsampling.

The two skip score layers start at zero, as FCN-16s/8s initialise their new score layers, so
training starts from the FCN-32s prediction.
"""

from __future__ import annotations

import torch
from torch import nn

from models.heads.base import ConvBNReLU, EncoderSpec, Head, init_convs


def bilinear_kernel(channels: int, kernel: int) -> torch.Tensor:
    """(channels, channels, kernel, kernel) transposed-conv weight: per-channel bilinear upsampling.

    w(y, x) = (1 - |y - c| / f) (1 - |x - c| / f), f = ceil(kernel / 2),
    c = f - 1 if kernel is odd else f - 0.5; channel i maps only to channel i. With
    kernel = 2 * factor, stride = factor, padding = factor // 2 it upsamples by ``factor``.
    """
    f = (kernel + 1) // 2
    c = f - 1 if kernel % 2 == 1 else f - 0.5
    r = torch.arange(kernel, dtype=torch.float32)
    w1 = 1 - (r - c).abs() / f
    weight = torch.zeros(channels, channels, kernel, kernel)
    idx = torch.arange(channels)
    weight[idx, idx] = w1[:, None] * w1[None, :]
    return weight


class FCNHead(Head):
    """Last three encoder maps -> logits (B, num_classes, H/s, W/s), s = their finest stride."""

    emits_logits = True

    def __init__(self, encoder: EncoderSpec, num_classes: int, width: int = 64) -> None:
        super().__init__()
        if len(encoder.channels) < 3:
            raise ValueError(f"FCNHead needs 3 encoder maps, got strides {encoder.strides}")
        c3, c4, c5 = encoder.channels[-3:]
        self._strides = encoder.strides[-3:]
        hidden = max(c5 // 4, 8)
        self.fc = ConvBNReLU(c5, hidden)
        self.score = nn.ModuleList(
            [nn.Conv2d(c, num_classes, 1) for c in (c3, c4)] + [nn.Conv2d(hidden, num_classes, 1)]
        )
        # up[i] brings the fused scores from strides[i + 1] to strides[i].
        self.up = nn.ModuleList(
            [
                nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
                if coarse == 2 * fine
                else nn.Identity()
                for fine, coarse in zip(self._strides, self._strides[1:])
            ]
        )
        self.out_channels = num_classes
        self.stride = self._strides[0]
        init_convs(self)
        with torch.no_grad():
            for layer in self.score[:2]:
                nn.init.zeros_(layer.weight)
            for up in self.up:
                if isinstance(up, nn.ConvTranspose2d):
                    up.weight.copy_(bilinear_kernel(num_classes, 4))

    def forward(self, features: list[torch.Tensor], stem: object = None) -> torch.Tensor:
        """features[-3:]: maps at strides (s, 2s or s, ...) -> logits (B, K, H/s, W/s)."""
        f3, f4, f5 = features[-3:]
        scores = self.score[2](self.fc(f5))
        for i in (1, 0):
            scores = self.up[i](scores) + self.score[i]((f3, f4)[i])
        return scores
