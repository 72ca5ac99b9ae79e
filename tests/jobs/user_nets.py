"""A user's own network, as a package of theirs would hold it: ``model.factory: "tests.jobs.user_nets:build"``."""

from __future__ import annotations

import torch
from torch import nn


class PixelNet(nn.Module):
    """Per-pixel logits: a 1×1 convolution of the normalised bands (so every tile agrees on every pixel)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def build() -> nn.Module:
    return PixelNet(3)
