"""``gigaseg import-checkpoint``'s work below the command line: reference files in, gigaseg files out (bytes).

Each ``import_*`` takes the source files as ``(name, bytes)`` in the order given and a ``classes(n)`` callback
that names the ``n`` classes the weights predict (read off the file), and returns the gigaseg files to write
with what each source contributed. Every model is rebuilt from the converted tensors and loaded strictly
before it is saved, and each checkpoint carries its model card (``models.card``: classes, colours, bands, the
reference's input normalisation) and the names and SHA-256 of the files it came from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from models import build_model
from models.card import CARD_KEY, ModelCard
from models.checkpoint import rebuild, save_checkpoint
from models.encoder_checkpoint import EncoderWeights, save_encoder
from models.errors import CheckpointError
from models.fctl import FctlConfig, build_fctl
from models.fctl_checkpoint import save_fctl
from models.info import IMAGENET_NORMALIZATION, CheckpointInfo
from models.magnet import Refiner, save_refiner
from models.reference import fctl as fctl_ref
from models.reference import magnet as magnet_ref
from models.reference.common import Keys, read_torch_state
from models.reference.torchvision import convert_resnet

Classes = Callable[[int], tuple[list[str], list[tuple[int, int, int]] | None]]
SOURCE_KEY = "gigaseg.imported_from"


@dataclass(frozen=True)
class Imported:
    """The files to write (name → bytes; ``kinds[name]``: segmenter, refiner, fctl or encoder) and a record per
    source file of what was taken and set aside."""

    files: dict[str, bytes]
    kinds: dict[str, str]
    records: list[Keys] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _provenance(sources: Sequence[tuple[str, bytes]], reference: str) -> str:
    return json.dumps({"reference": reference,
                       "files": [{"name": n, "sha256": hashlib.sha256(d).hexdigest()} for n, d in sources]})


def _extra(info: CheckpointInfo, sources, reference: str) -> dict[str, str]:
    return {CARD_KEY: json.dumps(ModelCard.from_info(info).to_dict()), SOURCE_KEY: _provenance(sources, reference)}


def import_magnet(sources: Sequence[tuple[str, bytes]], classes: Classes) -> Imported:
    """MagNet's segmenter (at most one) and refiners (one per refinement stage, in order) → ``segmenter.safetensors``
    and ``refiner.safetensors`` (or ``refiner-1…n.safetensors``)."""
    segmenters, refiners, records = [], [], []
    for name, data in sources:
        state = read_torch_state(data, name)
        kind = magnet_ref.kind(state)
        if kind == "hrnet":
            raise CheckpointError(
                f"{name}: MagNet's Cityscapes segmenter (HRNet-W18 + OCR) has no gigaseg architecture; import its "
                "refiners alone and run them with a segmenter gigaseg has (model.checkpoint)")
        if kind == "unknown":
            raise CheckpointError(
                f"{name}: neither MagNet's ResNet-50 FPN segmenter (resnet_backbone.*, classify.*) nor its refinement "
                f"module (seg_conv.*, residual.*); keys start with {sorted({k.split('.')[0] for k in state})[:8]}")
        (segmenters if kind == "segmenter" else refiners).append((name, state))
    if len(segmenters) > 1:
        raise CheckpointError(f"{len(segmenters)} segmenters given ({', '.join(n for n, _ in segmenters)}); a MagNet "
                              "model has one (then its refiners, one per refinement stage)")
    files, kinds, notes = {}, {}, []
    num_classes = None
    if segmenters:
        name, state = segmenters[0]
        tensors, config, keys = magnet_ref.convert_segmenter(state, name)
        records.append(keys)
        names, colors = classes(config.num_classes)
        info = CheckpointInfo(config, tuple(names), None if colors is None else tuple(map(tuple, colors)),
                              IMAGENET_NORMALIZATION)
        model = rebuild(lambda: build_model(config), tensors, f"{config.name}", "import-checkpoint")
        files["segmenter.safetensors"] = save_checkpoint(
            None, model, config, names, colors, IMAGENET_NORMALIZATION,
            extra=_extra(info, [s for s in sources if s[0] == name], "VinAIResearch/MagNet magnet/model/fpn.py"))
        kinds["segmenter.safetensors"] = "segmenter"
        num_classes = config.num_classes
    for i, (name, state) in enumerate(refiners):
        tensors, k, width, keys = magnet_ref.convert_refiner(state, name)
        records.append(keys)
        if num_classes is not None and k != num_classes:
            raise CheckpointError(f"{name}: a refiner for {k} classes, but the segmenter predicts {num_classes}")
        num_classes = k
        refiner = rebuild(lambda k=k, width=width: Refiner(k, width), tensors, f"refiner of {k} classes",
                          "import-checkpoint")
        out = "refiner.safetensors" if len(refiners) == 1 else f"refiner-{i + 1}.safetensors"
        files[out], kinds[out] = save_refiner(refiner, width), "refiner"
    if len(refiners) > 1:
        notes.append(f"{len(refiners)} refiners: refiner-s.safetensors refines stage s (model.magnet.scales: "
                     f"{len(refiners) + 1})")
    return Imported(files, kinds, records, notes)


def import_fctl(sources: Sequence[tuple[str, bytes]], classes: Classes,
                contexts: Sequence[float] | None = None) -> Imported:
    """FCtL's local model (mode 1), one-context model (mode 2) or fused model with its two context models
    (mode 3, then 2, 2) → ``fcn8s_vgg16`` or an FCtL checkpoint. Inputs ToTensor only, as the reference."""
    states = [read_torch_state(d, n) for n, d in sources]
    names_ = [n for n, _ in sources]
    tensors, config, records = fctl_ref.convert(states, names_, contexts)
    local = config if not isinstance(config, FctlConfig) else config.local
    names, colors = classes(local.num_classes)
    color_t = None if colors is None else tuple(map(tuple, colors))
    info = CheckpointInfo(local, tuple(names), color_t, fctl_ref.TO_TENSOR)
    extra = _extra(info, sources, "liqiokkk/FCtL models/fcn.py, models/FCtL.py (main)")
    if not isinstance(config, FctlConfig):
        model = rebuild(lambda: build_model(config), tensors, config.name, "import-checkpoint")
        data = save_checkpoint(None, model, config, names, colors, fctl_ref.TO_TENSOR, extra=extra)
        return Imported({"model.safetensors": data}, {"model.safetensors": "segmenter"}, records)
    model = rebuild(lambda: build_fctl(config), tensors, "FCtL", "import-checkpoint")
    data = save_fctl(None, model, config, names, colors, fctl_ref.TO_TENSOR, extra=extra)
    return Imported({"model.safetensors": data}, {"model.safetensors": "fctl"}, records)


def import_torchvision_resnet(sources: Sequence[tuple[str, bytes]]) -> Imported:
    """One torchvision ResNet file → an encoder checkpoint (``model.init`` of a training spec)."""
    if len(sources) != 1:
        raise CheckpointError(f"--from torchvision-resnet converts one file, got {len(sources)}")
    (name, data), = sources
    tensors, encoder, width, keys = convert_resnet(read_torch_state(data, name), name)
    weights = EncoderWeights(encoder, width, tensors, IMAGENET_NORMALIZATION,
                             _provenance(sources, "pytorch/vision torchvision/models/resnet.py"))
    return Imported({"encoder.safetensors": save_encoder(None, weights)}, {"encoder.safetensors": "encoder"}, [keys])


IMPORTERS: dict[str, Callable[..., Imported]] = {
    "magnet": import_magnet,
    "fctl": import_fctl,
    "torchvision-resnet": import_torchvision_resnet,
}


__all__ = ["IMPORTERS", "SOURCE_KEY", "Imported", "import_fctl", "import_magnet", "import_torchvision_resnet"]
