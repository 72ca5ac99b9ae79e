"""SegNet decoder (Badrinarayanan et al. 2017) on a ResNet encoder: unpooling with max indices.

SegNet's decoder upsamples by placing each value where the encoder's max-pool took its maximum
from (zeros elsewhere), then densifies with convs. A ResNet downsamples four times after its stem
conv: once by its stem max-pool and three times by strided convs (layer2..4). So:

- stride 4 -> 2 unpools with the encoder's real max-pool indices (``EncoderStem.pool_indices``:
  kernel 3, stride 2, padding 1, over the stem's stride-2 output);
- stride 32 -> 16, 16 -> 8 and 8 -> 4 have no pool to take indices from, so the decoder derives
  them: it max-pools (kernel 2, stride 2, ``return_indices``) the encoder map at the finer stride
  (c4, c3, c2: each strided stage's input) and unpools with those indices. Each value is placed at
  the position of the strongest response, per channel, in its 2x2 window of the encoder's finer
  map, which is what SegNet's indices record. As in SegNet, only the indices of the encoder maps
  are used, not their values (no skip concatenation: that is U-Net).

Before each unpooling the decoder's map is brought to the channel count of the map whose indices it
uses (indices are per channel); after it, two conv3x3-BN-ReLU. Where a dilated encoder (output
stride 16 or 8) keeps two maps at one stride there is nothing to unpool and only the convs run.
The head ends at stride 2 with ``stem_channels`` channels; the Segmenter's classifier and bilinear
x2 upsampling finish it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.base import ConvBNReLU, EncoderSpec, Head, init_convs
from models.resnet import EncoderStem


def unpool_like(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, 2h, 2w): x unpooled at the 2x2 argmax positions of target.

    target: (B, C, 2h, 2w). Out[b, c, p] = x[b, c, q] where p is the argmax of target[b, c] over
    the 2x2 window of q, zero elsewhere.
    """
    _, indices = F.max_pool2d(target, 2, 2, return_indices=True)
    return F.max_unpool2d(x, indices, 2, 2, output_size=target.shape[-2:])


class SegNetDecoder(Head):
    """4 encoder maps + stem -> (B, stem_channels, H/2, W/2)."""

    uses_stem = True

    def __init__(self, encoder: EncoderSpec, num_classes: int, width: int = 64) -> None:
        super().__init__()
        if len(encoder.channels) != 4 or encoder.stem_channels is None:
            raise ValueError(
                "SegNetDecoder needs an encoder with 4 maps and a stem (forward_with_stem), got "
                f"{encoder}"
            )
        # Maps whose grids (and indices) the decoder climbs, coarse to fine: c4, c3, c2, stem.
        targets = (*encoder.channels[-2::-1], encoder.stem_channels)
        self.entry = ConvBNReLU(encoder.channels[-1], targets[0])
        outs = (*targets[1:], encoder.stem_channels)
        self.stages = nn.ModuleList(
            [
                nn.Sequential(ConvBNReLU(t, t), ConvBNReLU(t, o))
                for t, o in zip(targets, outs, strict=True)
            ]
        )
        self.out_channels = encoder.stem_channels
        self.stride = encoder.stem_stride
        init_convs(self)

    def forward(
        self, features: list[torch.Tensor], stem: EncoderStem | None = None
    ) -> torch.Tensor:
        """features: 4 maps (fine to coarse), stem: EncoderStem -> (B, stem_channels, H/2, W/2)."""
        if stem is None:
            raise ValueError("SegNetDecoder needs the encoder's stem: call head(features, stem)")
        x = self.entry(features[-1])
        for stage, target in zip(self.stages[:3], features[-2::-1], strict=True):
            if x.shape[-2:] != target.shape[-2:]:
                x = unpool_like(x, target)
            x = stage(x)
        x = F.max_unpool2d(x, stem.pool_indices, 3, 2, 1, output_size=stem.features.shape[-2:])
        return self.stages[3](x)
