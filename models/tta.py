"""Test-time augmentation over the dihedral group of the square: the 4 rotations by 90°, each with and without a
horizontal flip (FCtL's test procedure, github liqiokkk/FCtL ``helper.py`` ``Evaluator``: ``flip_range`` ×
``rotate_range``).

``dihedral_mean(fn, x, *views)`` = ``(1/8) Σ_g g⁻¹(fn(g(x), g(views)…))`` for ``g`` = flip^f ∘ rot90^k, applied to the
last two axes of every tensor (so a context stack ``(B, n, C, H, W)`` turns with its tile). The reference sums the
raw network outputs (logits) over the 8 views and takes the argmax; the mean has the same argmax. Square inputs
only (a rotation must keep the shape).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: (rotations by 90°, flip) of the 8 views; the first is the identity.
VIEWS = tuple((k, flip) for flip in (False, True) for k in range(4))


def transform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate the last two axes by ``k``·90° (counter-clockwise, ``torch.rot90``), then flip the last axis."""
    y = torch.rot90(x, k, dims=(-2, -1)) if k else x
    return y.flip(-1) if flip else y


def untransform(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """The inverse of ``transform(·, k, flip)``."""
    y = y.flip(-1) if flip else y
    return torch.rot90(y, -k, dims=(-2, -1)) if k else y


def dihedral_mean(fn: Callable[..., torch.Tensor], x: torch.Tensor, *views: torch.Tensor) -> torch.Tensor:
    """``(1/8) Σ_g g⁻¹(fn(g(x), *g(views)))``: ``fn`` maps ``(B, C, H, W)`` (and views ``(…, H, W)``) to
    ``(B, K, H, W)``; ``H == W``."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"flips and rotations need square inputs, got {tuple(x.shape[-2:])}")
    total = None
    for k, flip in VIEWS:
        out = untransform(fn(transform(x, k, flip), *(transform(v, k, flip) for v in views)), k, flip)
        total = out if total is None else total + out
    return total / len(VIEWS)


__all__ = ["VIEWS", "dihedral_mean", "transform", "untransform"]
