"""FCtL checkpoints: safetensors with the local model's config, the context factors and the classes.

``__metadata__`` = {"gigaseg_format": "gigaseg-fctl-1", "config" (the local ModelConfig),
"contexts", "key_channels", "class_names", "class_colors", "normalization"}, each value JSON, plus
"fusion" and "shared_encoder" for the reference's variants (``FctlConfig``; absent: gated fusion, own
context encoders). The keys are a plain checkpoint's plus two, and the format differs, so
``load_checkpoint`` refuses an FCtL file by its format and ``load_fctl`` refuses a plain one with a
message saying which it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from models import ModelConfig

# the plain checkpoint's header reader, tensor loader, writer and loader: one implementation of each
from models.checkpoint import FORMAT_VERSION, _load_tensors, _read_header, rebuild, serialise
from models.errors import CheckpointError
from models.fctl import FCtL, FctlConfig, build_fctl
from models.info import CheckpointInfo, Normalization, default_normalization

FCTL_FORMAT = "gigaseg-fctl-1"
FCTL_METADATA_KEYS = (
    "gigaseg_format", "config", "contexts", "key_channels",
    "class_names", "class_colors", "normalization",
)
#: ``FctlConfig`` fields written only when not their defaults (the reference's variants), read when present.
VARIANT_KEYS = ("fusion", "shared_encoder")


def save_fctl(
    path: str | os.PathLike[str] | None,
    model: nn.Module,
    config: FctlConfig,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]] | None = None,
    normalization: Normalization | Mapping[str, Sequence[float]] | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise an FCtL with its metadata (and ``extra`` JSON strings); write it to ``path`` (atomically) when
    given.

    ``normalization`` defaults to ImageNet's (contexts are normalised the same way). Raises
    CheckpointError when ``model`` is not the FCtL ``config`` describes, ValueError for bad
    metadata.
    """
    with torch.device("meta"):  # shapes only
        expected = build_fctl(config).state_dict()
    return serialise(path, model, expected, gigaseg_format=FCTL_FORMAT, config=config.local,
                     what=f"the FCtL its config describes ({_describe(config)})",
                     fix="pass the FctlConfig the model was built from.", class_names=class_names,
                     class_colors=class_colors, normalization=normalization,
                     extra={"contexts": json.dumps(list(config.contexts)),
                            "key_channels": json.dumps(config.key_channels),
                            **{k: json.dumps(v) for k, v in config.to_dict().items() if k in VARIANT_KEYS},
                            **(extra or {})})


def is_fctl_checkpoint(data: bytes) -> bool:
    """Whether ``data`` is an FCtL checkpoint, from its header alone (False for anything else)."""
    try:
        metadata = _read_header(data).get("__metadata__")
    except CheckpointError:
        return False
    return isinstance(metadata, dict) and metadata.get("gigaseg_format") == FCTL_FORMAT


def read_fctl_info(data: bytes) -> tuple[CheckpointInfo, FctlConfig]:
    """Parse and validate an FCtL checkpoint's metadata without loading its weights."""
    metadata = _read_header(data).get("__metadata__")
    if not isinstance(metadata, dict) or "gigaseg_format" not in metadata:
        raise CheckpointError(
            "safetensors file has no gigaseg metadata: it is not an FCtL checkpoint; create one "
            "with models.fctl_checkpoint.save_fctl"
        )
    found = metadata["gigaseg_format"]
    if found == FORMAT_VERSION:
        raise CheckpointError(
            "this is a plain segmenter checkpoint (gigaseg_format '1'), not an FCtL one: load it "
            "with models.checkpoint.load_checkpoint, or turn it into an FCtL with "
            "FCtL.from_local(load_checkpoint(data)[0]), train the fusion and save with save_fctl"
        )
    if found != FCTL_FORMAT:
        raise CheckpointError(
            f"checkpoint gigaseg_format={found!r} is not an FCtL checkpoint ({FCTL_FORMAT!r}); "
            "create one with models.fctl_checkpoint.save_fctl"
        )
    missing = [k for k in FCTL_METADATA_KEYS if k not in metadata]
    if missing:
        raise CheckpointError(
            f"FCtL checkpoint metadata lacks keys {missing} (has {sorted(metadata)}); "
            "re-save it with models.fctl_checkpoint.save_fctl"
        )
    try:
        fields = {k: json.loads(metadata[k]) for k in FCTL_METADATA_KEYS[1:]}
        local = ModelConfig.from_dict(fields["config"])
        variant = {k: json.loads(metadata[k]) for k in VARIANT_KEYS if k in metadata}
        config = FctlConfig(local, tuple(fields["contexts"]), fields["key_channels"], **variant)
        colors = fields["class_colors"]
        info = CheckpointInfo(
            config=local,
            class_names=tuple(fields["class_names"]),
            class_colors=None if colors is None else tuple(tuple(c) for c in colors),
            normalization=Normalization.from_dict(fields["normalization"]),
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"FCtL checkpoint metadata is invalid: {e}") from e
    return info, config


def load_fctl(data: bytes) -> tuple[FCtL, CheckpointInfo, FctlConfig]:
    """Rebuild the FCtL a checkpoint describes, load its weights and return it in eval mode.

    ``info.config`` is the local model's config; ``config.contexts`` the factors the pipeline reads.
    """
    info, config = read_fctl_info(data)
    model = rebuild(lambda: build_fctl(config), _load_tensors(data), f"FCtL, {_describe(config)}",
                    "save_fctl and the FctlConfig")
    return model, info, config


def seeded_fctl(
    name: str,
    num_classes: int,
    class_names: Sequence[str],
    contexts: Sequence[float] = (2.0, 4.0),
    seed: int = 0,
    width: int = 64,
    gamma: float | None = None,
    refine: str | None = None,
    key_channels: int | None = None,
    fusion: str = "gated",
    shared_encoder: bool = False,
    normalization: Normalization | None = None,
    in_channels: int = 3,
) -> bytes:
    """FCtL checkpoint bytes with seeded random weights; same arguments -> same bytes.

    ``gamma`` sets every correlation's γ (None keeps 0, where the model equals its local segmenter),
    so tests can make the contexts matter; ``refine="pointrend"`` gives the local model a point head.
    ``key_channels``, ``fusion`` and ``shared_encoder`` as ``FctlConfig``; ``normalization`` defaults to
    ImageNet's.
    """
    config = FctlConfig(ModelConfig(name, num_classes, width=width, refine=refine, in_channels=in_channels),
                        tuple(contexts), key_channels, fusion, shared_encoder)
    model = build_fctl(config, seed=seed).eval()
    if gamma is not None:
        with torch.no_grad():
            for corr in model.correlations:
                corr.gamma.fill_(gamma)
    return save_fctl(None, model, config, class_names,
                     normalization=normalization or default_normalization(in_channels))


def _describe(config: FctlConfig) -> str:
    local = config.local
    return (
        f"local model {local.name!r}, {local.num_classes} classes, width {local.width}, "
        f"contexts {list(config.contexts)}"
        + (f", fusion {config.fusion}" if config.fusion != "gated" else "")
        + (", shared encoder" if config.shared_encoder else "")
    )


__all__ = [
    "FCTL_FORMAT",
    "is_fctl_checkpoint",
    "load_fctl",
    "read_fctl_info",
    "save_fctl",
    "seeded_fctl",
]
