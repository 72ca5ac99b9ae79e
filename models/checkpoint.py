"""Safetensors checkpoints that carry their own model config, class names and normalisation.

A checkpoint is the safetensors serialisation of the state dict (BN running stats included) with
``__metadata__`` = {"gigaseg_format": "1", "config", "class_names", "class_colors",
"normalization"}, each value JSON. Loading takes bytes, so the caller fetches them from any URL.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from models import ModelConfig, build_model
from models.errors import CheckpointError
from models.info import IMAGENET_NORMALIZATION, CheckpointInfo, Normalization, default_normalization
from models.segmenter import Segmenter
from models.state import StateDiff, diff_state

FORMAT_VERSION = "1"
METADATA_KEYS = ("gigaseg_format", "config", "class_names", "class_colors", "normalization")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def save_checkpoint(
    path: str | os.PathLike[str] | None,
    model: nn.Module,
    config: ModelConfig,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]] | None = None,
    normalization: Normalization | Mapping[str, Sequence[float]] | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise ``model`` with its metadata (and ``extra`` strings, e.g. the model card or where imported
    weights came from); write it to ``path`` (atomically) when given.

    ``normalization`` defaults to ImageNet's. Raises CheckpointError when ``model`` is not the
    architecture ``config`` describes, ValueError for bad metadata.
    """
    return serialise(path, model, _expected_state(config), gigaseg_format=FORMAT_VERSION, config=config,
                     what=f"the architecture its config describes ({_describe_config(config)})",
                     fix="pass the ModelConfig the model was built from.", class_names=class_names,
                     class_colors=class_colors, normalization=normalization, extra=extra)


def serialise(
    path: str | os.PathLike[str] | None,
    model: nn.Module,
    expected: Mapping[str, torch.Tensor],
    *,
    gigaseg_format: str,
    config: ModelConfig,
    what: str,
    fix: str,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]] | None = None,
    normalization: Normalization | Mapping[str, Sequence[float]] | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """A checkpoint of any gigaseg format: ``model``'s weights, checked against ``expected`` (the state the
    architecture has; ``what`` names it, ``fix`` says how to mend a mismatch), and the metadata every format
    carries (``config``, class table, normalisation, ImageNet's by default) plus ``extra`` (JSON strings).
    Written to ``path`` atomically when given."""
    if normalization is None:
        normalization = IMAGENET_NORMALIZATION
    elif not isinstance(normalization, Normalization):
        normalization = Normalization.from_dict(normalization)
    colors = None if class_colors is None else tuple(tuple(int(v) for v in c) for c in class_colors)
    info = CheckpointInfo(config, tuple(class_names), colors, normalization)  # validates

    # contiguous + CPU: safetensors refuses strided views (e.g. a channels_last model's weights).
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    diff = diff_state(state, expected)
    if not diff.ok:
        raise CheckpointError(f"cannot save: the model is not {what}:\n{diff.describe()}\nFix: {fix}")
    metadata = {
        "gigaseg_format": gigaseg_format,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "class_names": json.dumps(list(info.class_names)),
        "class_colors": json.dumps(None if colors is None else [list(c) for c in colors]),
        "normalization": json.dumps(normalization.to_dict()),
        **(extra or {}),
    }
    data = canonical_bytes(st_save(state, metadata=metadata))
    if path is not None:
        _atomic_write(Path(path), data)
    return data


def load_checkpoint(data: bytes) -> tuple[Segmenter, CheckpointInfo]:
    """Rebuild the model a checkpoint describes, load its weights and return it in eval mode."""
    info = read_info(data)
    model = rebuild(lambda: build_model(info.config), _load_tensors(data), _describe_config(info.config),
                    "save_checkpoint and the ModelConfig")
    return model, info


def rebuild(build, state: Mapping[str, torch.Tensor], described: str, saver: str) -> nn.Module:
    """``build()`` on the meta device (its weights are about to be replaced: no allocation, no init), then
    ``state`` loaded in place; eval mode. A state that does not fit raises CheckpointError naming the
    tensors; ``described`` is the architecture, ``saver`` what re-saves it ("save_fctl and the FctlConfig")."""
    with torch.device("meta"):
        model = build()
    diff = diff_state(state, model.state_dict())
    if not diff.ok:
        raise CheckpointError(
            f"checkpoint weights do not match the architecture in its own metadata ({described}):\n"
            f"{diff.describe()}\nFix: the file was edited or saved with a wrong config; re-save it with "
            f"{saver} the model was trained with."
        )
    model.load_state_dict(state, strict=True, assign=True)
    assert not any(t.is_meta for t in model.state_dict().values()), "tensor left on meta device"
    return model.eval()


def load_state_into(
    model: nn.Module, data: bytes | Mapping[str, torch.Tensor], strict: bool = True
) -> StateDiff:
    """Copy checkpoint weights into an existing ``model`` (e.g. to fine-tune from it).

    strict: any missing, unexpected or mis-shaped tensor raises CheckpointError naming them.
    Not strict: only tensors present in both with equal shapes are copied (so a checkpoint with a
    different class count still seeds the encoder and decoder); the returned diff says what was not.
    """
    state = _load_tensors(data) if isinstance(data, (bytes, bytearray, memoryview)) else dict(data)
    diff = diff_state(state, model.state_dict())
    if strict and not diff.ok:
        saved_for = ""
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                saved = read_info(bytes(data)).config
                saved_for = f" (checkpoint saved for {_describe_config(saved)})"
            except CheckpointError:
                pass
        raise CheckpointError(
            f"checkpoint does not fit the model{saved_for}:\n{diff.describe()}\n"
            "Fix: check that the spec's model name, width and class count match the checkpoint's; "
            "or load with strict=False to copy only the matching tensors (e.g. to fine-tune on "
            "new classes)."
        )
    skip = set(diff.unexpected) | {n for n, _, _ in diff.mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    return diff


def seeded_checkpoint(
    name: str, num_classes: int, class_names: Sequence[str], seed: int = 0, width: int = 64, in_channels: int = 3
) -> bytes:
    """Checkpoint bytes of a registry model with seeded random init (runs without trained weights), taking
    ``in_channels`` input bands (normalised by ``models.info.default_normalization``).

    Same arguments -> same bytes, in any process.
    """
    config = ModelConfig(name=name, num_classes=num_classes, width=width, in_channels=in_channels)
    model = build_model(config, seed=seed).eval()
    return save_checkpoint(None, model, config, class_names, normalization=default_normalization(in_channels))


def read_info(data: bytes) -> CheckpointInfo:
    """Parse and validate a checkpoint's metadata without loading its weights."""
    metadata = _read_header(data).get("__metadata__")
    if not isinstance(metadata, dict):
        raise CheckpointError(
            "safetensors file has no __metadata__: it is not a gigaseg checkpoint; "
            "create one with models.checkpoint.save_checkpoint"
        )
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise CheckpointError(
            f"checkpoint metadata lacks keys {missing} (has {sorted(metadata)}); "
            "re-save it with models.checkpoint.save_checkpoint"
        )
    if metadata["gigaseg_format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint gigaseg_format={metadata['gigaseg_format']!r}, this version reads "
            f"{FORMAT_VERSION!r}"
        )
    try:
        fields = {k: json.loads(metadata[k]) for k in METADATA_KEYS[1:]}
        colors = fields["class_colors"]
        return CheckpointInfo(
            config=ModelConfig.from_dict(fields["config"]),
            class_names=tuple(fields["class_names"]),
            class_colors=None if colors is None else tuple(tuple(c) for c in colors),
            normalization=Normalization.from_dict(fields["normalization"]),
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint metadata is invalid: {e}") from e


def _read_header(data: bytes) -> dict[str, Any]:
    """safetensors layout: u64 little-endian header length N, N bytes of JSON, then the tensors."""
    not_st = "not a safetensors file"
    if len(data) < 8:
        raise CheckpointError(f"{not_st}: only {len(data)} bytes")
    n = int.from_bytes(data[:8], "little")
    if n > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise CheckpointError(f"{not_st}: header length {n} does not fit in {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{not_st}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_st}: header is not a JSON object")
    return header


def _load_tensors(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    _read_header(data)
    try:
        return st_load(bytes(data))
    except Exception as e:  # safetensors raises its own SafetensorError and assorted builtins
        raise CheckpointError(f"not a valid safetensors file: {e}") from e


def canonical_bytes(data: bytes) -> bytes:
    """Re-emit the header with sorted keys: safetensors writes metadata in hash-map order, which
    varies between processes, and a seeded checkpoint must be byte-identical everywhere."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)  # tensor data stays 8-byte aligned, as safetensors pads it
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def _expected_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: no memory, no init
        return build_model(config).state_dict()


def _describe_config(config: ModelConfig) -> str:
    return f"model {config.name!r}, {config.num_classes} classes, width {config.width}"


def _atomic_write(path: Path, data: bytes) -> None:
    # temp file in the same directory + rename: a reader never sees a half-written checkpoint.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "IMAGENET_NORMALIZATION",
    "CheckpointInfo",
    "Normalization",
    "StateDiff",
    "load_checkpoint",
    "load_state_into",
    "read_info",
    "save_checkpoint",
    "seeded_checkpoint",
]
