"""Segmentation models in plain torch: registries, the model config and ``build_model``.

This package knows nothing of Ray, Zarr or S3. ``build_model`` is the only place a ``ModelConfig``
becomes constructor arguments; checkpoints (``models.checkpoint``) store the config next to the
weights so a checkpoint rebuilds its own model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from models.heads import (
    DeepLabV3Head,
    DUpsamplingHead,
    EncoderSpec,
    FCN8sHead,
    FCNHead,
    FPNDecoder,
    Head,
    MagnetFPNHead,
    OCRHead,
    SegNetDecoder,
    UNetDecoder,
)
from models.pointrend import PointRend
from models.resnet import ResNet10Encoder, ResNet18Encoder, ResNet34Encoder, ResNet50Encoder
from models.segmenter import Segmenter
from models.vgg import VGG16Encoder

ENCODERS: dict[str, type[nn.Module]] = {
    "resnet10": ResNet10Encoder,
    "resnet18": ResNet18Encoder,
    "resnet34": ResNet34Encoder,
    "resnet50": ResNet50Encoder,
    "vgg16": VGG16Encoder,
}

# Head name -> class; every class is built as cls(EncoderSpec, num_classes=..., width=...) and
# lists the encoder output strides it supports in ``output_strides`` (its default first).
DECODERS: dict[str, type[Head]] = {
    "deeplabv3": DeepLabV3Head,
    "dupsampling": DUpsamplingHead,
    "fcn": FCNHead,
    "fcn8s": FCN8sHead,
    "fpn": FPNDecoder,
    "magnet_fpn": MagnetFPNHead,
    "ocrnet": OCRHead,
    "segnet": SegNetDecoder,
    "unet": UNetDecoder,
}

# Architecture name -> (encoder name, decoder name): every ResNet head on every ResNet, and FCN-8s as published
# on its VGG-16. ``magnet_fpn_resnet50`` (MagNet's DeepGlobe segmenter) and ``fcn8s_vgg16`` (FCtL's local
# model) are the reference architectures whose published weights ``models.reference`` converts.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "deeplabv3_resnet10": ("resnet10", "deeplabv3"),
    "deeplabv3_resnet18": ("resnet18", "deeplabv3"),
    "deeplabv3_resnet34": ("resnet34", "deeplabv3"),
    "deeplabv3_resnet50": ("resnet50", "deeplabv3"),
    "dupsampling_resnet10": ("resnet10", "dupsampling"),
    "dupsampling_resnet18": ("resnet18", "dupsampling"),
    "dupsampling_resnet34": ("resnet34", "dupsampling"),
    "dupsampling_resnet50": ("resnet50", "dupsampling"),
    "fcn_resnet10": ("resnet10", "fcn"),
    "fcn_resnet18": ("resnet18", "fcn"),
    "fcn_resnet34": ("resnet34", "fcn"),
    "fcn_resnet50": ("resnet50", "fcn"),
    "fcn8s_vgg16": ("vgg16", "fcn8s"),
    "fpn_resnet10": ("resnet10", "fpn"),
    "fpn_resnet18": ("resnet18", "fpn"),
    "fpn_resnet34": ("resnet34", "fpn"),
    "fpn_resnet50": ("resnet50", "fpn"),
    "magnet_fpn_resnet10": ("resnet10", "magnet_fpn"),
    "magnet_fpn_resnet18": ("resnet18", "magnet_fpn"),
    "magnet_fpn_resnet34": ("resnet34", "magnet_fpn"),
    "magnet_fpn_resnet50": ("resnet50", "magnet_fpn"),
    "ocrnet_resnet10": ("resnet10", "ocrnet"),
    "ocrnet_resnet18": ("resnet18", "ocrnet"),
    "ocrnet_resnet34": ("resnet34", "ocrnet"),
    "ocrnet_resnet50": ("resnet50", "ocrnet"),
    "segnet_resnet10": ("resnet10", "segnet"),
    "segnet_resnet18": ("resnet18", "segnet"),
    "segnet_resnet34": ("resnet34", "segnet"),
    "segnet_resnet50": ("resnet50", "segnet"),
    "unet_resnet10": ("resnet10", "unet"),
    "unet_resnet18": ("resnet18", "unet"),
    "unet_resnet34": ("resnet34", "unet"),
    "unet_resnet50": ("resnet50", "unet"),
}

# Point head name -> class wrapped around the Segmenter (``ModelConfig.refine``, the checkpoints' key); built as
# cls(segmenter, point_channels=..., subdivision_steps=..., subdivision_points=...). A point head refines a
# segmenter's own logits at uncertain points; MagNet's refiner (``models.magnet.Refiner``) is another thing: a
# network of its own that merges two scales' probabilities.
POINT_HEADS: dict[str, type[nn.Module]] = {
    "pointrend": PointRend,
}
PointHead = Literal["pointrend"]
# ModelConfig fields that only a point head reads, with their defaults; to_dict leaves them out when
# refine is None, so plain configs (and their checkpoints' bytes) are what they were before point heads.
POINT_HEAD_FIELDS = ("point_channels", "subdivision_steps", "subdivision_points")

OUTPUT_STRIDES = (8, 16, 32)
MIN_WIDTH, MAX_WIDTH = 8, 256


def _check_name(name: object, registry: Mapping[str, object], what: str) -> None:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; valid names: {', '.join(sorted(registry))}")


def _check_int(field: str, value: object, low: int, high: int | None = None) -> None:
    # bool is an int subclass; a JSON `true` must not pass for 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"ModelConfig.{field} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"ModelConfig.{field}={value} must be {bound}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's architecture (not its weights).

    ``width`` is the encoder's base channel count (64 = the published ResNets); the head scales
    with it (e.g. FPN: pyramid 2*width, segmentation width channels) so narrow variants are cheap
    end to end. ``output_stride`` None (the default) becomes the head's default: 16 for DeepLab v3
    (which needs an atrous encoder), 32 for every other head.

    ``refine="pointrend"`` wraps the segmenter in ``PointRend`` (heads that emit features only):
    ``point_channels`` is its point head's width, ``subdivision_steps`` (None: log2 of the head's
    stride, which ends at the input resolution) and ``subdivision_points`` drive its inference.
    """

    name: str
    num_classes: int
    in_channels: int = 3
    width: int = 64
    output_stride: int | None = None
    refine: PointHead | None = None
    point_channels: int = 256
    subdivision_steps: int | None = None
    subdivision_points: int = 8192

    def __post_init__(self) -> None:
        _check_name(self.name, ARCHITECTURES, "model name")
        _check_int("num_classes", self.num_classes, 1)
        _check_int("in_channels", self.in_channels, 1)
        _check_int("width", self.width, MIN_WIDTH, MAX_WIDTH)
        if self.width % 8:
            raise ValueError(f"ModelConfig.width={self.width} must be a multiple of 8")
        head = ARCHITECTURES[self.name][1]
        allowed = DECODERS[head].output_strides
        if self.output_stride is None:
            object.__setattr__(self, "output_stride", allowed[0])
        elif self.output_stride not in OUTPUT_STRIDES or self.output_stride not in allowed:
            raise ValueError(
                f"ModelConfig.output_stride={self.output_stride!r} is not supported by "
                f"{self.name!r}; its head {head!r} takes one of {allowed}"
            )
        self._check_refine(head)

    def _check_refine(self, head: str) -> None:
        if self.refine is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [n for n in POINT_HEAD_FIELDS if getattr(self, n) != defaults[n]]
            if changed:
                raise ValueError(
                    f"ModelConfig.{changed[0]} is a refiner option but refine is None; "
                    f"set refine to one of {sorted(POINT_HEADS)} or drop {changed}"
                )
            return
        _check_name(self.refine, POINT_HEADS, "refine")
        if DECODERS[head].emits_logits:
            feature_heads = sorted(h for h, cls in DECODERS.items() if not cls.emits_logits)
            raise ValueError(
                f"ModelConfig.refine={self.refine!r} needs a head that exposes fine features; "
                f"{self.name!r} has head {head!r} ({DECODERS[head].__name__}), which emits class "
                f"logits. Use a model with one of the heads {feature_heads} (e.g. fpn_resnet18)"
            )
        if self.num_classes < 2:
            raise ValueError(
                f"ModelConfig.refine={self.refine!r} ranks points by the gap between the two best "
                f"classes; num_classes={self.num_classes} needs to be >= 2"
            )
        _check_int("point_channels", self.point_channels, 8, 1024)
        _check_int("subdivision_points", self.subdivision_points, 1)
        if self.subdivision_steps is not None:  # its upper bound is the head's stride: PointRend checks
            _check_int("subdivision_steps", self.subdivision_steps, 0, 8)

    @property
    def size_multiple(self) -> int:
        """The multiple the input's height and width must be: 1 for heads that resample by size
        (``any_input_size``), else 32, the encoders' coarsest stride."""
        return 1 if DECODERS[ARCHITECTURES[self.name][1]].any_input_size else 32

    def same_architecture(self, other: ModelConfig) -> bool:
        """Whether ``other`` has this encoder and head (name, width, output stride, input channels): its
        weights then fit this model's, but for the class-dependent tensors and a point head."""
        return (self.name, self.width, self.output_stride, self.in_channels) == (
            other.name, other.width, other.output_stride, other.in_channels)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.refine is None:
            for name in ("refine", *POINT_HEAD_FIELDS):
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown or missing keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"ModelConfig needs a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown ModelConfig keys {unknown}; valid keys: {', '.join(fields)}"
            )
        required = [
            n for n, f in fields.items()
            if f.default is dataclasses.MISSING and n not in data
        ]
        if required:
            raise ValueError(f"ModelConfig is missing required keys {required}")
        return cls(**data)


def build_model(config: ModelConfig, seed: int | None = None) -> Segmenter | PointRend:
    """Build the (randomly initialised, train-mode) model ``config`` names.

    A ``refine`` config wraps the segmenter in its refiner; the segmenter's initialisation is the
    same as without it (it is built first from the same seed).

    With ``seed`` the initialisation is deterministic; the global RNG state of the caller is
    restored afterwards, so seeding here never changes what the caller draws next.
    """
    _check_name(config.name, ARCHITECTURES, "model name")
    encoder_name, decoder_name = ARCHITECTURES[config.name]
    _check_name(encoder_name, ENCODERS, "encoder")
    _check_name(decoder_name, DECODERS, "decoder")
    if seed is None:
        return _construct(config, encoder_name, decoder_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(config, encoder_name, decoder_name)


def _construct(
    config: ModelConfig, encoder_name: str, decoder_name: str
) -> Segmenter | PointRend:
    encoder = ENCODERS[encoder_name](
        in_channels=config.in_channels, width=config.width, output_stride=config.output_stride
    )
    decoder = DECODERS[decoder_name](
        EncoderSpec.of(encoder), num_classes=config.num_classes, width=config.width
    )
    segmenter = Segmenter(encoder, decoder, config.num_classes)
    if config.refine is None:
        return segmenter
    return POINT_HEADS[config.refine](
        segmenter,
        point_channels=config.point_channels,
        subdivision_steps=config.subdivision_steps,
        subdivision_points=config.subdivision_points,
    )


__all__ = [
    "ARCHITECTURES",
    "OUTPUT_STRIDES",
    "DECODERS",
    "ENCODERS",
    "ModelConfig",
    "PointRend",
    "POINT_HEADS",
    "Segmenter",
    "build_model",
]
