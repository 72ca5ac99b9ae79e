"""What a checkpoint says about itself besides its weights: classes, colours, normalisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from models import ModelConfig


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std in 0..1 units: the model sees ``(pixel / 255 - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"normalization mean {self.mean} and std {self.std} need equal, non-zero lengths"
            )
        in_unit = all(0.0 <= m <= 1.0 for m in self.mean) and all(0.0 < s <= 1.0 for s in self.std)
        if not in_unit:
            raise ValueError(
                f"normalization mean {self.mean} / std {self.std} must be in 0..1 units "
                "(divide 0..255 values by 255), with std > 0"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> Normalization:
        if set(data) != {"mean", "std"}:
            raise ValueError(
                f"normalization needs exactly the keys 'mean' and 'std', got {sorted(data)}"
            )
        return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


IMAGENET_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: torchvision's ``ToTensor`` alone (pixel / 255): FCtL's reference feeds its networks so.
TO_TENSOR_NORMALIZATION = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def default_normalization(channels: int) -> Normalization:
    """ImageNet's statistics for 3 (RGB) channels; for any other count, mean 0.5 and std 0.25 per band (0..1
    units): a neutral choice for a seeded model, which has no training data to take statistics from."""
    if channels == 3:
        return IMAGENET_NORMALIZATION
    return Normalization(mean=(0.5,) * channels, std=(0.25,) * channels)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself, besides the weights."""

    config: ModelConfig
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...] | None
    normalization: Normalization

    def __post_init__(self) -> None:
        k = self.config.num_classes
        names = list(self.class_names)
        if len(names) != k:
            raise ValueError(f"{len(names)} class names {names} for num_classes={k}")
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != k:
            raise ValueError(f"class names must be distinct non-empty strings, got {names}")
        if self.class_colors is not None:
            if len(self.class_colors) != k:
                raise ValueError(f"{len(self.class_colors)} class colors for num_classes={k}")
            for c in self.class_colors:
                if len(c) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in c):
                    raise ValueError(
                        f"class color {c!r} is not an (r, g, b) triple of ints in 0..255"
                    )
        if len(self.normalization.mean) != self.config.in_channels:
            raise ValueError(
                f"normalization has {len(self.normalization.mean)} channels, the model takes "
                f"in_channels={self.config.in_channels}"
            )
