"""Encoder checkpoints: an encoder's weights alone, to start training from (``model.init`` of a training spec).

An encoder checkpoint is safetensors of one encoder's state dict (gigaseg's names, no prefix) with
``__metadata__`` = {"gigaseg_format": "gigaseg-encoder-1", "encoder" (a ``models.ENCODERS`` name), "width",
"normalization" (what the weights were trained with, JSON), "source" (where they came from)}.
``gigaseg import-checkpoint --from torchvision-resnet`` writes one; ``encoder_weights`` also reads a torchvision
ResNet file (``torch.save``, read with ``weights_only=True``) directly, converting it the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from models import ENCODERS
from models.checkpoint import _atomic_write, _load_tensors, _read_header, canonical_bytes
from models.errors import CheckpointError
from models.info import IMAGENET_NORMALIZATION, Normalization
from models.reference.common import looks_like_torch_file, read_torch_state
from models.reference.torchvision import convert_resnet
from models.state import diff_state

ENCODER_FORMAT = "gigaseg-encoder-1"


@dataclass(frozen=True)
class EncoderWeights:
    """One encoder's weights: ``state`` fits ``ENCODERS[encoder](width=width)``."""

    encoder: str
    width: int
    state: dict[str, torch.Tensor]
    normalization: Normalization
    source: str


def save_encoder(path: str | os.PathLike[str] | None, weights: EncoderWeights) -> bytes:
    """Serialise encoder weights with their metadata; write them to ``path`` (atomically) when given."""
    with torch.device("meta"):
        expected = ENCODERS[weights.encoder](width=weights.width).state_dict()
    diff = diff_state(weights.state, expected)
    if not diff.ok:
        raise CheckpointError(f"cannot save: the weights are not a {weights.encoder} of width {weights.width}:\n"
                              f"{diff.describe()}")
    metadata = {"gigaseg_format": ENCODER_FORMAT, "encoder": weights.encoder, "width": str(weights.width),
                "normalization": json.dumps(weights.normalization.to_dict()), "source": weights.source}
    data = canonical_bytes(st_save({k: v.contiguous() for k, v in weights.state.items()}, metadata=metadata))
    if path is not None:
        _atomic_write(Path(path), data)
    return data


def is_encoder_checkpoint(data: bytes) -> bool:
    try:
        metadata = _read_header(data).get("__metadata__")
    except CheckpointError:
        return False
    return isinstance(metadata, dict) and metadata.get("gigaseg_format") == ENCODER_FORMAT


def encoder_weights(data: bytes, where: str) -> EncoderWeights | None:
    """The encoder weights in ``data`` when it is an encoder checkpoint or a torchvision ResNet file (converted);
    None for anything else (e.g. a whole gigaseg checkpoint). CheckpointError when it is one of the two kinds
    but does not fit."""
    if is_encoder_checkpoint(data):
        metadata = _read_header(data)["__metadata__"]
        try:
            weights = EncoderWeights(metadata["encoder"], int(metadata["width"]), _load_tensors(data),
                                     Normalization.from_dict(json.loads(metadata["normalization"])),
                                     metadata.get("source", ""))
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{where}: encoder checkpoint metadata is invalid: {err}") from None
        if weights.encoder not in ENCODERS:
            raise CheckpointError(f"{where}: unknown encoder {weights.encoder!r}; valid: {', '.join(sorted(ENCODERS))}")
        return weights
    if looks_like_torch_file(data):
        state, name, width, _ = convert_resnet(read_torch_state(data, where), where)
        return EncoderWeights(name, width, state, IMAGENET_NORMALIZATION, f"torchvision {name}: {where}")
    return None


def describe(weights: EncoderWeights) -> str:
    return f"{weights.encoder} of width {weights.width} ({weights.source})"


__all__ = ["ENCODER_FORMAT", "EncoderWeights", "describe", "encoder_weights", "is_encoder_checkpoint", "save_encoder"]
