"""FCtL (Li et al., ACM MM 2021): a local segmenter whose deepest features attend to context views.

A tile ``x (B, 3, H, W)`` comes with ``n`` context views ``(B, n, 3, H, W)``: for factor ``c``
a ``c·H`` window centred on the tile (zeros outside the image), resized to ``H`` and normalised
like ``x``. The pipeline reads them; the model never sees the factors (``FctlConfig.contexts``
keeps them for the pipeline).

    features = local.encoder(x);  d = features[-1]                       (B, C, h, w)
    ctx_i    = context_encoders[i](contexts[:, i])[-1]                    (B, C, h', w')
    out_0    = Correlation(d, d)  (self);  out_i = Correlation(d, ctx_i)  (medium, large)
    features[-1] = d + Fusion(out_0, ..., out_n)
    logits   = upsample(classifier(decoder(features, stem)))              (B, K, H, W) float32

Every γ starts at 0, so a fresh FCtL is exactly its local segmenter, and any registry head works
since only ``features[-1]`` changes. Training is staged as in the reference: the local segmenter,
then one segmenter per context factor (``context_encoder_from`` takes their encoders), then the
fused model with ``freeze_context_encoders``. Checkpoints: ``models.fctl_checkpoint``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import ModelConfig, build_model
from models.pointrend import PointRend
from models.segmenter import Segmenter, _upsample

MAX_CONTEXTS = 2  # medium and large, as the reference


def _init_small(module: nn.Module) -> None:
    """The reference's init for the correlation and fusion convs: N(0, 0.01) weights, zero bias;
    small query/key weights start every attention near uniform."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Correlation(nn.Module):
    """One correlation block: ``x (B, C, h, w), ctx (B, C, h', w') -> γ·V·Aᵀ (B, C, h, w)``.

    ``Q = query(x)`` (B, k, N), ``K = key(ctx)`` (B, k, M), ``V = value(ctx)`` (B, C, M) with
    N = h·w, M = h'·w' and k = ``key_channels``; ``A = softmax_M(QᵀK)`` (B, N, M), no 1/√k scaling
    as in the reference, computed in float32 (so bf16 autocast cannot saturate it). ``γ`` starts
    at 0.
    """

    def __init__(self, channels: int, key_channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))
        _init_small(self)

    def attention(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w), (B, C, h', w') -> float32 A (B, h·w, h'·w'); each row sums to 1."""
        q = self.query(x).flatten(2)  # flatten, not view: channels_last maps are not contiguous
        k = self.key(ctx).flatten(2)
        return torch.softmax(torch.bmm(q.transpose(1, 2), k).float(), dim=-1)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        v = self.value(ctx).flatten(2)  # (B, C, M)
        a = self.attention(x, ctx).to(v.dtype)
        return self.gamma * torch.bmm(v, a.transpose(1, 2)).reshape(x.shape)


class Fusion(nn.Module):
    """Gated sum of n branch maps (B, C, h, w) -> Σ wᵢ·outᵢ (B, C, h, w), float32.

    As the reference: a 1×1 conv per branch, concatenation, a joint 1×1 conv to n·C, split into n,
    a 1×1 conv and a sigmoid per part, then a softmax across the branches per channel and position,
    so the weights wᵢ lie in (0, 1) and sum to 1.
    """

    def __init__(self, channels: int, branches: int) -> None:
        super().__init__()
        self.branches = branches
        self.inputs = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(branches))
        self.joint = nn.Conv2d(branches * channels, branches * channels, 1)
        self.outputs = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(branches))
        _init_small(self)

    def weights(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """n maps (B, C, h, w) -> float32 weights (n, B, C, h, w), summing to 1 over axis 0."""
        if len(outs) != self.branches:
            raise ValueError(f"Fusion was built for {self.branches} branches, got {len(outs)}")
        joint = self.joint(torch.cat([conv(o) for conv, o in zip(self.inputs, outs)], dim=1))
        parts = joint.chunk(self.branches, dim=1)
        gates = torch.stack([torch.sigmoid(conv(p)) for conv, p in zip(self.outputs, parts)])
        return torch.softmax(gates.float(), dim=0)

    def forward(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        w = self.weights(outs)
        return sum(wi * o.float() for wi, o in zip(w, outs))


class FCtL(nn.Module):
    """``forward(x (B, C_in, H, W), contexts (B, n, C_in, H, W)) -> float32 logits (B, K, H, W)``.

    Holds ``local`` (the Segmenter, used as is), ``context_encoders[i]`` (copies of its encoder, one
    per context), ``correlations[0]`` (self) and ``correlations[i + 1]`` (context i: 1 medium,
    2 large), and ``fusion``. With one context there are two branches (self, medium), no large one.

    Two variants of the reference's second training stage (github liqiokkk/FCtL, ``models/fcn.py`` mode 2):

    - ``fusion="none"`` (one context only): no self branch and no fusion, ``d + Correlation(d, ctx)``; then
      ``correlations[0]`` is the context's.
    - ``shared_encoder=True``: the contexts go through the local encoder itself (no ``context_encoders``), as
      the reference's stage 2 shares its VGG layers between the tile and the context.
    """

    def __init__(
        self, local: Segmenter | PointRend, num_contexts: int = 2, key_channels: int | None = None,
        fusion: str = "gated", shared_encoder: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(local, (Segmenter, PointRend)):
            raise ValueError(f"FCtL wraps a Segmenter or a PointRend, got {type(local).__name__}")
        if not 1 <= num_contexts <= MAX_CONTEXTS:
            raise ValueError(f"FCtL takes 1 or {MAX_CONTEXTS} contexts, got {num_contexts}")
        _check_fusion(fusion, num_contexts)
        seg = local.segmenter if isinstance(local, PointRend) else local
        channels = seg.encoder.out_channels[-1]
        key_channels = max(1, channels // 8) if key_channels is None else key_channels
        self.local = local
        self.shared_encoder = shared_encoder
        if not shared_encoder:
            self.context_encoders = nn.ModuleList(
                copy.deepcopy(seg.encoder) for _ in range(num_contexts)
            )
        self.self_branch = fusion == "gated"
        branches = num_contexts + self.self_branch
        self.correlations = nn.ModuleList(
            Correlation(channels, key_channels) for _ in range(branches)
        )
        if self.self_branch:
            self.fusion = Fusion(channels, branches)
        self.num_contexts = num_contexts
        self.num_classes = local.num_classes
        self.in_channels = local.in_channels
        self.input_multiple = local.input_multiple
        self.context_frozen = False

    def context_encoder(self, index: int) -> nn.Module:
        """The encoder context ``index`` goes through: its own, or the local encoder when shared."""
        return self.segmenter.encoder if self.shared_encoder else self.context_encoders[index]

    @property
    def segmenter(self) -> Segmenter:
        """The local segmenter (inside its PointRend when the local model has one)."""
        return self.local.segmenter if isinstance(self.local, PointRend) else self.local

    @classmethod
    def from_local(
        cls, segmenter: Segmenter | PointRend, num_contexts: int = 2, key_channels: int | None = None
    ) -> FCtL:
        """An FCtL around a copy of a trained local segmenter (the argument is left untouched);
        the context encoders start as copies of its encoder, every γ at 0."""
        return cls(copy.deepcopy(segmenter), num_contexts, key_channels)

    def context_encoder_from(self, segmenter: Segmenter, index: int) -> None:
        """Copy a trained context segmenter's encoder weights into ``context_encoders[index]``."""
        if not 0 <= index < self.num_contexts:
            raise ValueError(
                f"context index {index} is out of range: this FCtL has {self.num_contexts} "
                f"contexts (0 = medium{', 1 = large' if self.num_contexts > 1 else ''})"
            )
        if self.shared_encoder:
            raise ValueError("this FCtL shares the local encoder with its contexts (shared_encoder): it has no "
                             "context encoder of its own to load")
        encoder = (segmenter.segmenter if isinstance(segmenter, PointRend) else segmenter).encoder
        try:
            self.context_encoders[index].load_state_dict(encoder.state_dict())
        except RuntimeError as e:
            raise ValueError(
                f"the segmenter's encoder does not fit context encoder {index}: {e}\n"
                "Fix: train the context segmenter with the local model's name and width"
            ) from e

    def freeze_context_encoders(self) -> None:
        """No gradients for the context encoders, and their BatchNorm stays in eval mode through
        ``train()`` (the reference's last stage trains the fusion on frozen context features)."""
        if self.shared_encoder:
            raise ValueError("this FCtL shares the local encoder with its contexts (shared_encoder); freezing "
                             "the context encoder would freeze the local one")
        self.context_encoders.requires_grad_(False)
        self.context_frozen = True
        self.context_encoders.eval()

    def train(self, mode: bool = True) -> FCtL:
        super().train(mode)
        if self.context_frozen:
            self.context_encoders.eval()
        return self

    def check_input(self, x: torch.Tensor, contexts: torch.Tensor) -> None:
        """Raise ValueError unless x fits the local model and contexts is (B, n, C_in, H, W)."""
        self.local.check_input(x)
        b, c, h, w = x.shape
        want = (b, self.num_contexts, c, h, w)
        if tuple(contexts.shape) != want:
            raise ValueError(
                f"contexts of shape {tuple(contexts.shape)} do not go with a tile of shape "
                f"{tuple(x.shape)}: expected {want}, one view per context factor, each resized "
                "to the tile's size"
            )

    def correlate(self, deep: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """deep (B, C, h, w), contexts (B, n, C_in, H, W) -> deep + fused correlations (B, C, h, w).

        The correlation branches are self (deep, deep) and one per context view (deep, ctx_i); without the
        self branch (``fusion="none"``) the one context's correlation is added as it is.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.context_frozen):
            ctx = [self.context_encoder(i)(contexts[:, i])[-1] for i in range(self.num_contexts)]
        if not self.self_branch:
            return deep + self.correlations[0](deep, ctx[0])
        sources = [deep, *ctx]
        outs = [corr(deep, src) for corr, src in zip(self.correlations, sources)]
        # exact when every γ is 0: the fused sum is then 0.0 and deep + 0.0 == deep
        return deep + self.fusion(outs).to(deep.dtype)

    def _features(self, x: torch.Tensor, contexts: torch.Tensor):
        """The local encoder's maps with the deepest one correlated with the contexts, and the stem."""
        self.check_input(x, contexts)
        seg = self.segmenter
        features, stem = seg.encoder.forward_with_stem(x) if seg.uses_stem else (seg.encoder(x), None)
        return [*features[:-1], self.correlate(features[-1], contexts)], stem

    def forward_coarse(self, x: torch.Tensor, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coarse logits (B, K, H/s, W/s), fine features (B, D, H/s, W/s)) of the fused features, as
        ``Segmenter.forward_coarse`` (the pair PointRend refines)."""
        seg = self.segmenter
        out = seg.decoder(*self._features(x, contexts))
        return seg.classifier(out), out

    def forward(self, x: torch.Tensor, contexts: torch.Tensor, aux: bool = False) -> Any:
        """Logits as ``Segmenter.forward``; ``aux=True`` also returns the head's auxiliary logits
        ({name: (B, K, H, W)}), as ``Segmenter.forward_aux``. With a PointRend local model: its
        ``PointRendOutput`` in train mode, its subdivided logits in eval mode."""
        size = x.shape[-2:]
        if isinstance(self.local, PointRend):
            coarse, fine = self.forward_coarse(x, contexts)
            return self.local.train_outputs(coarse, fine) if self.training else self.local.infer(coarse, fine, size)
        local = self.local
        features, stem = self._features(x, contexts)
        if not aux:
            return _upsample(local.classifier(local.decoder(features, stem)), size)
        out, extra = local.decoder.forward_aux(features, stem)
        return _upsample(local.classifier(out), size), {
            name: _upsample(a, size) for name, a in extra.items()
        }


@dataclass(frozen=True)
class FctlConfig:
    """An FCtL's architecture: its local model, its context factors and its key width.

    ``contexts``: one or two factors, each > 1, increasing: medium then large (the reference uses
    (2, 3) on Inria; DeepGlobe's "whole image" context is a large factor here). With one factor
    the large branch is absent. ``key_channels`` None: C/8 of the deepest map (C = its channels; the
    reference's is C). ``fusion`` "gated" (self branch and gated fusion) or "none" (one context, its
    correlation added as is: the reference's stage 2); ``shared_encoder``: contexts go through the local
    encoder (the reference's stage 2).
    """

    local: ModelConfig
    contexts: tuple[float, ...] = (2.0, 4.0)
    key_channels: int | None = None
    fusion: str = "gated"
    shared_encoder: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.local, ModelConfig):
            raise ValueError(f"FctlConfig.local must be a ModelConfig, got {self.local!r}")
        factors = self.contexts
        if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
            raise ValueError(f"FctlConfig.contexts must be a list of factors, got {factors!r}")
        if not 1 <= len(factors) <= MAX_CONTEXTS:
            raise ValueError(
                f"FctlConfig.contexts={list(factors)} needs 1 or {MAX_CONTEXTS} factors "
                "(medium, large), e.g. [2, 4]"
            )
        for f in factors:
            number = isinstance(f, (int, float)) and not isinstance(f, bool)
            if not number or not math.isfinite(f) or f <= 1:
                raise ValueError(
                    f"FctlConfig.contexts factor {f!r} must be a number > 1 (a context window "
                    "is that many tiles wide)"
                )
        if list(factors) != sorted(set(factors)):
            raise ValueError(
                f"FctlConfig.contexts={list(factors)} must increase: medium first, then large"
            )
        object.__setattr__(self, "contexts", tuple(float(f) for f in factors))
        k = self.key_channels
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1024):
            raise ValueError(f"FctlConfig.key_channels={k!r} must be None or an int in [1, 1024]")
        _check_fusion(self.fusion, len(factors))
        if not isinstance(self.shared_encoder, bool):
            raise ValueError(f"FctlConfig.shared_encoder={self.shared_encoder!r} must be true or false")

    def to_dict(self) -> dict[str, Any]:
        data = {
            "local": self.local.to_dict(),
            "contexts": list(self.contexts),
            "key_channels": self.key_channels,
        }
        # the reference variants only when set: configs (and checkpoints) of gigaseg's own FCtL stay as they were
        data.update({k: v for k, v in (("fusion", self.fusion), ("shared_encoder", self.shared_encoder))
                     if v != FctlConfig.__dataclass_fields__[k].default})
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FctlConfig:
        """Inverse of ``to_dict``; unknown keys or a missing ``local`` are an error naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"FctlConfig needs a mapping, got {type(data).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown FctlConfig keys {unknown}; valid keys: {', '.join(fields)}")
        if "local" not in data:
            raise ValueError("FctlConfig is missing required key 'local'")
        return cls(**{**data, "local": ModelConfig.from_dict(data["local"])})


def build_fctl(config: FctlConfig, seed: int | None = None) -> FCtL:
    """A train-mode FCtL: the local model as ``build_model(config.local, seed)`` builds it, context
    encoders copied from its encoder, every γ at 0. With ``seed`` deterministic, and the caller's
    RNG state is kept."""
    variant = {"fusion": config.fusion, "shared_encoder": config.shared_encoder}
    if seed is None:
        return FCtL(build_model(config.local), len(config.contexts), config.key_channels, **variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # for the correlation and fusion convs, after the local model
        local = build_model(config.local, seed=seed)
        return FCtL(local, len(config.contexts), config.key_channels, **variant)


FUSIONS = ("gated", "none")


def _check_fusion(fusion: str, num_contexts: int) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"FCtL fusion {fusion!r} is not one of {', '.join(FUSIONS)}")
    if fusion == "none" and num_contexts != 1:
        raise ValueError(f"FCtL fusion 'none' (the context's correlation added as is) takes one context, got "
                         f"{num_contexts}; with two contexts the branches are fused ('gated')")


__all__ = ["Correlation", "FCtL", "FctlConfig", "Fusion", "build_fctl"]
