"""FCtL's published checkpoints (github liqiokkk/FCtL, branch main) → gigaseg's ``fcn8s_vgg16`` and FCtL.

The reference trains in three modes of one class (``models/fcn.py`` ``FCN8``, saved through ``DataParallel``, so
keys start ``module.``); every file also holds torchvision's ``vgg.features``/``vgg.classifier`` (the VGG the
layers were taken from: ``vgg.features`` are the same tensors as ``pool3``..``pool5``, ``vgg.classifier`` is the
unused ImageNet classifier).

- **mode 1** (the local model, ``Bfcn``): FCN-8s on VGG-16 → a plain ``fcn8s_vgg16`` checkpoint::

      pool3.*, pool4.*, pool5.*                       → local encoder (models.vgg, same indices)
      output.0/3/6, adj_pool3, adj_pool4, up_output, up_pool4_out, up_final → decoder.*

- **mode 2** (one context, ``B10``/``B15``): the same plus ``big_pool3..5`` (the *same layers* as
  ``pool3..5``: the tile and the context share the encoder) and ``big_attention`` (``FCtL(512, 512)``), of
  which mode 2 runs one branch, ``x + γ·out`` with Q from the tile, K and V from the context → an FCtL with one
  context, ``fusion: none``, ``shared_encoder``::

      big_attention.conv_query / conv_key / conv_value / gamma → correlations.0.query / key / value / gamma

- **mode 3** (fused, ``all``), with the two mode-2 files of its contexts (the reference's ``MiniFCN8`` takes their
  ``big_pool*``): three branches and the gated fusion → an FCtL with two contexts::

      conv_*_2, gamma_2 (self: Q, K, V from the tile)     → correlations.0
      conv_*,   gamma   (medium: K, V from context 1)     → correlations.1
      conv_*_1, gamma_1 (large:  K, V from context 2)     → correlations.2
      in_3, in_1, in_2 / out_3, out_1, out_2              → fusion.inputs.0..2 / fusion.outputs.0..2
      trans (3C → 3C, blocks medium, large, self)         → fusion.joint, blocks permuted to self, medium, large
      context files' big_pool3..5                         → context_encoders.0 / .1

The key width is the reference's ``planes`` (C = 512 at width 64). Inputs are ``ToTensor`` only (0..1, no mean
or std), as the reference's ``images_transform``. The DeepGlobe branch (mean-centred correlation, a whole-image
global branch) is a different model and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from models import ModelConfig, build_model
from models.errors import CheckpointError
from models.fctl import FctlConfig, build_fctl
from models.info import TO_TENSOR_NORMALIZATION
from models.reference.common import Keys, fit, unwrap

LOCAL = "fcn8s_vgg16"
#: The reference's images_transform: ToTensor only (pixel / 255).
TO_TENSOR = TO_TENSOR_NORMALIZATION
#: The context factors of the reference's scripts (main branch): medium ×2 (B10), large ×3 (B15).
DEFAULT_CONTEXTS = (2.0, 3.0)
_ENCODER_PARTS = ("pool3", "pool4", "pool5")
# gigaseg branch → the reference's suffix of conv_query/conv_key/conv_value/gamma (self, medium, large)
_BRANCH_SUFFIX = ("_2", "", "_1")
# gigaseg fusion block i ← reference block _FUSION_BLOCK[i] (the reference orders medium, large, self)
_FUSION_BLOCK = (2, 0, 1)
_VGG_ALIAS = "torchvision's VGG module the layers came from: the same tensors as pool3..pool5"
_VGG_CLASSIFIER = "VGG-16's ImageNet classifier, which FCN-8s does not use"


def mode(state: Mapping[str, torch.Tensor]) -> int:
    """The reference's training mode a file was saved in: 1 local, 2 one context, 3 fused; 0 for the DeepGlobe
    branch's layout, -1 when it is not FCtL's ``FCN8`` at all."""
    keys = set(unwrap(state))
    if any(k.startswith(("local.", "medium.", "large.", "big.")) for k in keys):
        return 0
    if not any(k.startswith("pool5.") for k in keys) or "output.6.weight" not in keys:
        return -1 if not any(k.startswith("big_pool5.") for k in keys) else 2
    if any(k.startswith("big_pool3.") for k in keys):
        return 2
    return 3 if any(k.startswith("big_attention.") for k in keys) else 1


def _refuse_deepglobe(where: str) -> None:
    raise CheckpointError(
        f"{where}: FCtL's DeepGlobe branch (keys local./medium./big.: a mean-centred correlation and a "
        "whole-image global branch) is a different model from the main branch's, which gigaseg imports")


def _local_config(state: Mapping[str, torch.Tensor], where: str) -> ModelConfig:
    for key in ("output.6.weight", "pool3.0.weight"):
        if key not in state:
            raise CheckpointError(f"{where}: no {key}: not FCtL's FCN8 (FCN-8s on VGG-16)")
    return ModelConfig(LOCAL, int(state["output.6.weight"].shape[0]), width=int(state["pool3.0.weight"].shape[0]))


def _vgg_aliases(keys: Keys, prefix: str, parts: Sequence[str] = _ENCODER_PARTS) -> None:
    """``vgg.features.i`` is ``pool3``..``pool5`` (or ``big_pool*``) saved again: check and ignore; ignore the
    ImageNet classifier."""
    offsets = {"pool3": 0, "pool4": 17, "pool5": 24}
    for k in list(keys.state):
        if k.startswith("vgg.features."):
            index, _, param = k.removeprefix("vgg.features.").partition(".")
            part = max((p for p in parts if offsets[p] <= int(index)), key=lambda p: offsets[p])
            keys.same(k, f"{prefix}{part}.{int(index) - offsets[part]}.{param}", _VGG_ALIAS)
    keys.ignore(lambda k: k.startswith("vgg.classifier."), _VGG_CLASSIFIER)


def _take_local(keys: Keys, config: ModelConfig, target: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The local FCN-8s tensors under ``target`` (``""`` or ``local.``), and their reference names."""
    with torch.device("meta"):
        names = build_model(config).state_dict()
    out, origin = {}, {}
    for name in names:
        ref = name.split(".", 1)[1]  # encoder.pool3.0.weight → pool3.0.weight; decoder.output.0.weight → output.0…
        out[target + name], origin[target + name] = keys.take(ref), ref
    return out, origin


def _take_correlation(keys: Keys, suffix: str, target: str, out: dict, origin: dict) -> None:
    for ours, theirs in (("query", "conv_query"), ("key", "conv_key"), ("value", "conv_value")):
        for param in ("weight", "bias") if ours != "value" else ("weight",):
            ref = f"big_attention.{theirs}{suffix}.{param}"
            out[f"{target}.{ours}.{param}"], origin[f"{target}.{ours}.{param}"] = keys.take(ref), ref
    ref = f"big_attention.gamma{suffix}"
    out[f"{target}.gamma"], origin[f"{target}.gamma"] = keys.take(ref), ref


def _permute_blocks(w: torch.Tensor, branches: int, order: Sequence[int], dims: Sequence[int]) -> torch.Tensor:
    """``w`` with its ``dims`` cut into ``branches`` equal blocks, block ``i`` of the result = block ``order[i]``."""
    for d in dims:
        w = torch.cat([w.chunk(branches, dim=d)[j] for j in order], dim=d)
    return w


def convert_local(state: Mapping[str, torch.Tensor], where: str) -> tuple[dict, ModelConfig, Keys]:
    """A mode-1 file → the ``fcn8s_vgg16`` state dict and config."""
    state = unwrap(state)
    config = _local_config(state, where)
    keys = Keys(state, where, "FCtL's local FCN-8s (mode 1)")
    out, origin = _take_local(keys, config, "")
    _vgg_aliases(keys, "")
    keys.check()
    with torch.device("meta"):
        fit(out, build_model(config).state_dict(), where, origin)
    return out, config, keys


def convert_single(state: Mapping[str, torch.Tensor], where: str, factor: float) -> tuple[dict, FctlConfig, Keys]:
    """A mode-2 file → an FCtL with one context (``factor``), ``fusion: none``, the local encoder shared."""
    state = unwrap(state)
    local = _local_config(state, where)
    config = FctlConfig(local, (float(factor),), int(state["pool5.0.weight"].shape[0]), "none", True)
    keys = Keys(state, where, "FCtL's one-context model (mode 2)")
    out, origin = _take_local(keys, local, "local.")
    _take_correlation(keys, "", "correlations.0", out, origin)
    for k in list(state):
        if k.startswith("big_pool"):
            keys.same(k, k.removeprefix("big_"), "the context encoder: in mode 2 the same layers as pool3..pool5")
    _vgg_aliases(keys, "")
    keys.ignore(lambda k: k.startswith("big_attention."),
                "branches of FCtL(512, 512) that mode 2 never runs (it has one context: no self branch, no fusion)")
    keys.check()
    with torch.device("meta"):
        fit(out, build_fctl(config).state_dict(), where, origin)
    return out, config, keys


def convert_fused(fused: Mapping[str, torch.Tensor], contexts: Sequence[Mapping[str, torch.Tensor]],
                  where: Sequence[str], factors: Sequence[float]) -> tuple[dict, FctlConfig, list[Keys]]:
    """A mode-3 file and the two mode-2 files of its contexts (medium, large) → an FCtL with two contexts."""
    fused = unwrap(fused)
    if len(contexts) != 2 or len(factors) != 2:
        raise CheckpointError(
            f"{where[0]}: FCtL's fused model (mode 3) reads two context encoders: give it followed by the files of "
            f"its medium and large context models (the reference's B10 and B15, mode 2), and two --contexts; got "
            f"{len(contexts)} file(s) and contexts {list(factors)}")
    local = _local_config(fused, where[0])
    channels = int(fused["pool5.0.weight"].shape[0])
    config = FctlConfig(local, tuple(float(f) for f in factors), channels)
    keys = Keys(fused, where[0], "FCtL's fused model (mode 3)")
    out, origin = _take_local(keys, local, "local.")
    for i, suffix in enumerate(_BRANCH_SUFFIX):
        _take_correlation(keys, suffix, f"correlations.{i}", out, origin)
    for ours, theirs in (("inputs", "in_"), ("outputs", "out_")):
        for i, block in enumerate(_FUSION_BLOCK):
            for param in ("weight", "bias"):
                ref = f"big_attention.{theirs}{block + 1}.{param}"
                out[f"fusion.{ours}.{i}.{param}"], origin[f"fusion.{ours}.{i}.{param}"] = keys.take(ref), ref
    w, b = keys.take("big_attention.trans.weight"), keys.take("big_attention.trans.bias")
    if w.numel() and b.numel():
        out["fusion.joint.weight"] = _permute_blocks(w, 3, _FUSION_BLOCK, (0, 1))
        out["fusion.joint.bias"] = _permute_blocks(b, 3, _FUSION_BLOCK, (0,))
    origin.update({"fusion.joint.weight": "big_attention.trans.weight", "fusion.joint.bias": "big_attention.trans.bias"})
    _vgg_aliases(keys, "")
    keys.check()
    records = [keys]
    for i, (state, name) in enumerate(zip(contexts, where[1:], strict=True)):
        state = unwrap(state)
        ctx = Keys(state, name, f"the {('medium', 'large')[i]} context model of FCtL (mode 2, or its MiniFCN8)")
        for key in [k for k in state if k.startswith("big_pool")]:
            target = f"context_encoders.{i}.{key.removeprefix('big_')}"
            out[target], origin[target] = ctx.take(key), key
        if not ctx.taken:
            ctx.take("big_pool3.0.weight")  # a file without any: say which key was looked for
        else:
            _vgg_aliases(ctx, "big_")
            ctx.ignore(lambda k: not k.startswith("big_pool"),
                       "the context model's own tile branch and head: the fused model keeps only its encoder")
        ctx.check()
        records.append(ctx)
    with torch.device("meta"):
        fit(out, build_fctl(config).state_dict(), where[0], origin)
    return out, config, records


#: What ``mode`` returns → what to do with the file(s).
MODES: dict[int, str] = {1: "local FCN-8s", 2: "one-context FCtL", 3: "fused FCtL"}


def convert(states: Sequence[Mapping[str, torch.Tensor]], where: Sequence[str], factors: Sequence[float] | None,
            ) -> tuple[dict, ModelConfig | FctlConfig, list[Keys]]:
    """The files of one FCtL model, in order (a mode-1 file; a mode-2 file; or a mode-3 file then its two
    context files) → gigaseg state dict and config (``ModelConfig`` for a plain local model)."""
    modes = [mode(s) for s in states]
    for m, name in zip(modes, where, strict=True):
        if m == 0:
            _refuse_deepglobe(name)
        if m < 0:
            raise CheckpointError(f"{name}: not a checkpoint of FCtL's FCN8 (no pool5.* and output.6.weight, nor "
                                  "big_pool*): check --from and the file")
    if modes[0] == 3:
        return convert_fused(states[0], states[1:], where, factors or DEFAULT_CONTEXTS)
    if len(states) != 1:
        raise CheckpointError(
            f"{where[0]}: a {MODES[modes[0]]} (mode {modes[0]}) stands alone; only the fused model (mode 3) takes "
            f"its context models after it ({len(states) - 1} more file(s) given)")
    if modes[0] == 1:
        out, config, keys = convert_local(states[0], where[0])
        return out, config, [keys]
    factors = list(factors or DEFAULT_CONTEXTS[:1])
    if len(factors) != 1:
        raise CheckpointError(f"{where[0]}: a one-context model (mode 2) has one context factor, got {factors}")
    out, config, keys = convert_single(states[0], where[0], factors[0])
    return out, config, [keys]


__all__ = ["DEFAULT_CONTEXTS", "LOCAL", "MODES", "TO_TENSOR", "convert", "convert_fused", "convert_local",
           "convert_single", "mode"]
