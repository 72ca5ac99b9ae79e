"""ImageNet ResNets in torchvision's layout (pytorch/vision, ``torchvision/models/resnet.py``) → gigaseg encoders.

torchvision's ``ResNet`` names its layers as gigaseg's ``models.resnet.ResNetEncoder`` does (``conv1``, ``bn1``,
``layer1..4.<block>.conv1/bn1/conv2/bn2[/conv3/bn3]/downsample.0/1``; the 3×3 conv strided in bottlenecks, the
"v1.5" placement), so the encoder's tensors map one to one; ``fc`` (the ImageNet classifier) is set aside. Which
ResNet a file holds is read off its keys: blocks per stage and whether they have a ``conv3``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from models import ENCODERS
from models.errors import CheckpointError
from models.reference.common import Keys, fit, unwrap

# (blocks per stage, bottleneck) → gigaseg encoder
_DEPTHS: dict[tuple[tuple[int, ...], bool], str] = {
    ((1, 1, 1, 1), False): "resnet10",
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
}
_NAMES = {((3, 4, 23, 3), True): "ResNet-101", ((3, 8, 36, 3), True): "ResNet-152"}


def encoder_of(state: Mapping[str, torch.Tensor], where: str) -> tuple[str, int]:
    """``(encoder name, width)`` of a torchvision-layout ResNet state dict."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        blocks.append(len(ids))
    bottleneck = any(k.endswith(".conv3.weight") for k in state)
    if "conv1.weight" not in state or not all(blocks):
        raise CheckpointError(
            f"{where}: not a ResNet in torchvision's layout (needs conv1.weight and layer1..layer4; found "
            f"{blocks} blocks per stage)")
    key = (tuple(blocks), bottleneck)
    if key not in _DEPTHS:
        name = _NAMES.get(key, f"a ResNet of {tuple(blocks)} {'bottleneck' if bottleneck else 'basic'} blocks")
        raise CheckpointError(
            f"{where}: {name} has no gigaseg encoder; gigaseg's ResNets are "
            + ", ".join(f"{v} {k[0]}{' bottleneck' if k[1] else ''}" for k, v in _DEPTHS.items()))
    return _DEPTHS[key], int(state["conv1.weight"].shape[0])


def convert_resnet(state: Mapping[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], str, int, Keys]:
    """The encoder's state dict (gigaseg's names, no prefix), its encoder name and width, and the record."""
    state = unwrap(state)
    name, width = encoder_of(state, where)
    with torch.device("meta"):
        expected = ENCODERS[name](width=width).state_dict()
    keys = Keys(state, where, f"torchvision's {name}")
    out = {}
    for k in expected:
        if k.endswith("num_batches_tracked"):
            out[k] = keys.take_or(k, torch.zeros((), dtype=torch.long),
                                  "BatchNorm's num_batches_tracked (older torchvision files lack it): set to 0")
        else:
            out[k] = keys.take(k)
    keys.ignore(lambda k: k.startswith("fc."), "the ImageNet classifier (1000 classes), replaced by the head")
    keys.check()
    fit(out, expected, where, {k: k for k in expected})
    return out, name, width, keys


__all__ = ["convert_resnet", "encoder_of"]
