"""A model card: how to feed a segmentation model and read its output, carried with its weights.

Whatever format the weights come in (a gigaseg safetensors checkpoint, ONNX, a torch.export program, a user's
own module with safetensors weights), the pipeline needs the same few facts about the model, and only these:

- ``classes``: the output channels in order, with a name and an optional colour each;
- ``bands``: the input channels in order (gigaseg feeds red, green, blue, or the channels ``inputs.bands``
  selects: their count must be the card's);
- ``normalization``: per band, ``mean`` and ``std`` on a stated ``value_scale``: the model sees
  ``(v − mean) / std`` with ``v`` the pixel on that scale (``value_scale: 1`` → ``v`` in 0..1, ImageNet's
  convention; ``255`` → ``v`` in 0..255);
- ``size_multiple``: the multiple the input's height and width must be (the network's total stride);
- ``output``: whether the model returns ``logits`` (softmax is applied) or ``probabilities``.

Where a card lives: a gigaseg checkpoint's safetensors metadata holds it already (``from_info``); an ONNX model
in its ``metadata_props`` under ``CARD_KEY``, as JSON; anything else in a sidecar ``<weights>.model.yaml``. A job
spec may complete or override a card (``merge``), but not contradict the weights: a class or band count that
differs is an error naming both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models.info import IMAGENET_NORMALIZATION, CheckpointInfo, Normalization

#: The key of the card (JSON) in ONNX ``metadata_props`` and safetensors metadata.
CARD_KEY = "gigaseg.card"
#: The sidecar of a weights file ``w``: ``w`` + this suffix (YAML or JSON).
SIDECAR_SUFFIX = ".model.yaml"
RGB = ("red", "green", "blue")
OUTPUTS = ("logits", "probabilities")
_KEYS = {"classes", "bands", "normalization", "size_multiple", "output"}


def band_names(channels: int) -> tuple[str, ...]:
    """The bands of a gigaseg network of ``channels`` inputs: red, green, blue for 3, else ``band_0 …``
    (a gigaseg checkpoint records the count, not the names)."""
    return RGB if channels == 3 else tuple(f"band_{i}" for i in range(channels))


class CardError(ValueError):
    """A model card that is malformed, incomplete or contradicts the weights or the spec."""


@dataclass(frozen=True)
class ModelCard:
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...] | None = None
    bands: tuple[str, ...] = RGB
    normalization: Normalization = field(default=IMAGENET_NORMALIZATION)
    size_multiple: int = 1
    output: str = "logits"

    def __post_init__(self) -> None:
        names = list(self.class_names)
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise CardError(f"classes: need distinct non-empty names, got {names}")
        if self.class_colors is not None and len(self.class_colors) != len(names):
            raise CardError(f"classes: {len(self.class_colors)} colours for {len(names)} classes")
        if len(self.normalization.mean) != len(self.bands):
            raise CardError(f"normalization has {len(self.normalization.mean)} values per statistic for "
                            f"{len(self.bands)} bands ({', '.join(self.bands)})")
        if self.size_multiple < 1:
            raise CardError(f"size_multiple must be ≥ 1, got {self.size_multiple}")
        if self.output not in OUTPUTS:
            raise CardError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_info(cls, info: CheckpointInfo) -> ModelCard:
        """The card of a gigaseg checkpoint (its networks return logits; inputs a multiple of 32, or of any size for
        the reference architectures whose heads resample by size)."""
        return cls(tuple(info.class_names), info.class_colors, band_names(info.config.in_channels),
                   info.normalization, info.config.size_multiple, "logits")

    def to_dict(self) -> dict[str, Any]:
        classes = [{"name": n} if self.class_colors is None else {"name": n, "color": list(c)}
                   for n, c in zip(self.class_names, self.class_colors or [None] * self.num_classes)]
        return {"classes": classes, "bands": list(self.bands),
                "normalization": {**self.normalization.to_dict(), "value_scale": 1},
                "size_multiple": self.size_multiple, "output": self.output}


def parse_card(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields a card (or a spec's ``model.card``) gives, checked and in canonical form, as a partial card:
    ``class_names``, ``class_colors``, ``bands``, ``normalization``, ``size_multiple``, ``output`` — each only if
    given. ``where`` names the card in errors."""
    if not isinstance(data, Mapping):
        raise CardError(f"{where}: a model card is a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise CardError(f"{where}: unknown key(s) {', '.join(unknown)}; a card has {', '.join(sorted(_KEYS))}")
    out: dict[str, Any] = {}
    if "classes" in data:
        classes = data["classes"]
        if not isinstance(classes, list) or not classes:
            raise CardError(f"{where}: classes must be a non-empty list of names or {{name, color}} mappings")
        names, colors = [], []
        for c in classes:
            c = {"name": c} if isinstance(c, str) else c
            if not isinstance(c, Mapping) or not isinstance(c.get("name"), str):
                raise CardError(f"{where}: each class needs a name, got {c!r}")
            names.append(c["name"])
            color = c.get("color")
            if color is not None and (len(color) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in color)):
                raise CardError(f"{where}: class {c['name']!r} colour {color!r} is not [r, g, b] in 0..255")
            colors.append(tuple(color) if color is not None else None)
        out["class_names"] = tuple(names)
        if all(c is not None for c in colors):
            out["class_colors"] = tuple(colors)
    if "bands" in data:
        bands = data["bands"]
        if not isinstance(bands, list) or not bands or not all(isinstance(b, str) and b for b in bands):
            raise CardError(f"{where}: bands must be a non-empty list of band names, got {bands!r}")
        out["bands"] = tuple(bands)
    if "normalization" in data:
        norm = dict(data["normalization"])
        scale = float(norm.pop("value_scale", 1))
        if scale <= 0 or set(norm) != {"mean", "std"}:
            raise CardError(f"{where}: normalization needs mean and std (and optionally value_scale > 0), got "
                            f"{sorted(data['normalization'])}")
        try:
            out["normalization"] = Normalization(tuple(float(m) / scale for m in norm["mean"]),
                                                 tuple(float(s) / scale for s in norm["std"]))
        except ValueError as err:
            raise CardError(f"{where}: normalization on value_scale {scale:g}: {err}") from None
    if "size_multiple" in data:
        if not isinstance(data["size_multiple"], int) or data["size_multiple"] < 1:
            raise CardError(f"{where}: size_multiple must be an integer ≥ 1, got {data['size_multiple']!r}")
        out["size_multiple"] = data["size_multiple"]
    if "output" in data:
        if data["output"] not in OUTPUTS:
            raise CardError(f"{where}: output must be one of {', '.join(OUTPUTS)}, got {data['output']!r}")
        out["output"] = data["output"]
    return out


def merge(card: Mapping[str, Any], spec: Mapping[str, Any], card_where: str, spec_where: str) -> ModelCard:
    """A complete card from the weights' partial card and the spec's: the spec's fields win, but a class or band
    count that differs from the card's is an error naming both; classes must come from one of them."""
    for key, what in (("class_names", "classes"), ("bands", "bands")):
        if key in card and key in spec and len(card[key]) != len(spec[key]):
            raise CardError(f"{spec_where} lists {len(spec[key])} {what} ({', '.join(spec[key])}) but {card_where} "
                            f"has {len(card[key])} ({', '.join(card[key])}); list {len(card[key])} or leave them out")
    fields = {**card, **spec}  # the counts agree: the card's colours stay with the spec's names unless it gives its own
    if "class_names" not in fields:
        raise CardError(f"{card_where} names no classes: give them in the spec (model.classes) or in the card")
    bands = fields.get("bands", RGB)
    if "normalization" not in fields:
        if len(bands) != 3:
            raise CardError(f"{card_where}: {len(bands)} bands and no normalization; give normalization (mean and "
                            f"std per band) in the card or in model.card")
        fields["normalization"] = IMAGENET_NORMALIZATION
    return ModelCard(**fields)


__all__ = ["CARD_KEY", "OUTPUTS", "RGB", "SIDECAR_SUFFIX", "CardError", "ModelCard", "band_names", "merge", "parse_card"]
