"""MagNet's published checkpoints (github VinAIResearch/MagNet) → gigaseg's ``magnet_fpn_resnet50`` and refiner.

- **Segmenter** (``deepglobe_fpn.pth``: ``ResnetFPN`` in ``magnet/model/fpn.py``, saved by its backbone
  trainer inside a ``FullModel``, so keys start ``model.``, with the loss's class weights under ``loss.``).
  ``resnet_backbone.*`` is torchvision's ResNet-50 layout and maps 1:1 to ``encoder.*``; the FPN maps level
  by level (``models.heads.magnet_fpn``)::

      toplayer, latlayer1, latlayer2, latlayer3  → decoder.lateral.3, .2, .1, .0
      smooth1_k, smooth2_k, smooth3_k, smooth4_k → decoder.smooth{k}.3, .2, .1, .0      (k = 1, 2)
      classify                                   → decoder.classify

- **Refiner** (``deepglobe_refinement.pth``, ``cityscapes_refinement_*.pth``: ``RefinementMagNet`` with
  ``use_bn=True``, ``magnet/model/refinement.py``)::

      bn0, conv1, bn1, conv2, bn2           → net.0, net.1, net.2, net.4, net.5
      residual.{0,1}.conv1/bn1/conv2/bn2/conv3/bn3 → net.{7,8}.body.0/1/3/4/6/7
      residual.0.downsample.0/1            → net.7.skip.0/1
      seg_conv.weight                      → net.9.weight   (gigaseg's last conv has a bias: set to zero)

The Cityscapes segmenter (HRNet-W18 + OCR) has no gigaseg architecture; its refiners import alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from models import ModelConfig, build_model
from models.errors import CheckpointError
from models.magnet import Refiner
from models.reference.common import Keys, fit, unwrap

SEGMENTER = "magnet_fpn_resnet50"
# gigaseg level i (0 = stride 4) ← the reference's names for it
_LATERAL = ("latlayer3", "latlayer2", "latlayer1", "toplayer")
_SMOOTH = ("smooth4", "smooth3", "smooth2", "smooth1")
_REFINER_LAYERS = {"net.0": "bn0", "net.1": "conv1", "net.2": "bn1", "net.4": "conv2", "net.5": "bn2", "net.9": "seg_conv"}
_BOTTLENECK = {"body.0": "conv1", "body.1": "bn1", "body.3": "conv2", "body.4": "bn2", "body.6": "conv3",
               "body.7": "bn3", "skip.0": "downsample.0", "skip.1": "downsample.1"}
_NO_BATCHES = "BatchNorm's num_batches_tracked (counts training steps; not read at inference): set to 0"


def kind(state: Mapping[str, torch.Tensor]) -> str:
    """``segmenter`` (ResNet-50 FPN), ``refiner``, ``hrnet`` (the Cityscapes segmenter) or ``unknown``, by keys."""
    keys = set(unwrap(state, lambda k: not k.startswith("loss.")))
    if any(k.startswith("resnet_backbone.") for k in keys) and "classify.weight" in keys:
        return "segmenter"
    if "seg_conv.weight" in keys and any(k.startswith("residual.") for k in keys):
        return "refiner"
    if any(k.startswith(("stage4.", "ocr_", "cls_head", "aux_head", "conv_bn_relu")) for k in keys):
        return "hrnet"
    return "unknown"


def _reference_segmenter_name(key: str) -> str:
    """The reference's key of gigaseg's ``key`` in ``magnet_fpn_resnet50``."""
    part, _, rest = key.partition(".")
    if part == "encoder":
        return f"resnet_backbone.{rest}"
    head, _, rest = rest.partition(".")  # decoder.<lateral|smooth1|smooth2|classify>...
    if head == "classify":
        return f"classify.{rest}"
    level, _, param = rest.partition(".")
    if head == "lateral":
        return f"{_LATERAL[int(level)]}.{param}"
    return f"{_SMOOTH[int(level)]}_{head[-1]}.{param}"


def convert_segmenter(state: Mapping[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], ModelConfig, Keys]:
    """The ``magnet_fpn_resnet50`` state dict, its config (classes and width read off the shapes) and the
    record of what was taken and ignored. Raises CheckpointError naming unexpected, missing or mis-shaped keys."""
    state = unwrap(state, lambda k: not k.startswith("loss."))
    keys = Keys(state, where, "MagNet's ResNet-50 FPN segmenter")
    if "classify.weight" not in state or "resnet_backbone.conv1.weight" not in state:
        keys.take("classify.weight"), keys.take("resnet_backbone.conv1.weight")
        keys.check()
    config = ModelConfig(SEGMENTER, int(state["classify.weight"].shape[0]),
                         width=int(state["resnet_backbone.conv1.weight"].shape[0]))
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    out, origin = {}, {}
    for name in expected:
        ref = _reference_segmenter_name(name)
        origin[name] = ref
        if name.endswith("num_batches_tracked"):
            out[name] = keys.take_or(ref, torch.zeros((), dtype=torch.long), _NO_BATCHES)
        else:
            out[name] = keys.take(ref)
    keys.ignore(lambda k: k.startswith("loss."), "the training loss's own tensors (class weights), not the model's")
    keys.check()
    fit(out, expected, where, origin)
    return out, config, keys


def _reference_refiner_name(key: str) -> str:
    for ours, theirs in _REFINER_LAYERS.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    block = {"net.7.": "residual.0.", "net.8.": "residual.1."}[key[:6]]
    rest = key[6:]
    for ours, theirs in _BOTTLENECK.items():
        if rest.startswith(ours + "."):
            return block + theirs + rest[len(ours):]
    raise AssertionError(f"no reference name for refiner key {key}")


def convert_refiner(state: Mapping[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], int, int, Keys]:
    """The gigaseg ``Refiner`` state dict (``residual=False``: the reference's refiner), its class count and width."""
    state = unwrap(state)
    keys = Keys(state, where, "MagNet's refinement module (RefinementMagNet with use_bn=True)")
    if "seg_conv.weight" not in state or "conv1.weight" not in state:
        keys.take("seg_conv.weight"), keys.take("conv1.weight")
        keys.check()
    num_classes, width = int(state["seg_conv.weight"].shape[0]), int(state["conv1.weight"].shape[0])
    if "bn0.weight" not in state:
        raise CheckpointError(
            f"{where}: a refinement module without its input BatchNorm (bn0: trained with use_bn=False); MagNet's "
            "test.py builds it with use_bn=True and would leave bn0 at its initial values. gigaseg refuses the "
            "file rather than guess")
    with torch.device("meta"):
        expected = Refiner(num_classes, width).state_dict()
    out, origin = {}, {}
    for name in expected:
        if name == "net.9.bias":
            out[name] = torch.zeros(num_classes)
            keys.ignored["seg_conv.bias (absent)"] = "the reference's last conv has no bias: gigaseg's is set to 0"
            continue
        ref = _reference_refiner_name(name)
        origin[name] = ref
        if name.endswith("num_batches_tracked"):
            out[name] = keys.take_or(ref, torch.zeros((), dtype=torch.long), _NO_BATCHES)
        else:
            out[name] = keys.take(ref)
    keys.check()
    fit(out, expected, where, origin)
    return out, num_classes, width, keys


__all__ = ["SEGMENTER", "convert_refiner", "convert_segmenter", "kind"]
