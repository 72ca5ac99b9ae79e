"""The segmenter a job runs, from whatever the spec points at: a gigaseg checkpoint (or seeded weights), an ONNX
model, a torch.export program, or a user's factory with safetensors weights (``pipeline.workers.runtimes``).

On the driver, ``resolve_segmenter`` reads the weights once, finds the model card (``models.card``: in the
checkpoint, in ONNX ``metadata_props``, in a torch.export archive's extra files, or in a sidecar
``<weights>.model.yaml``), completes it with the spec's ``model.classes`` and ``model.card``, and checks the model
against it before any tile runs (``check_segmenter``: one tile through the model on the CPU: input bands, class
count, size). On a worker, ``load_segmenter`` builds the same model from the staged weights.

Which kind a file is: ``model.factory`` set → its weights are safetensors for that factory; a zip with
``archive_format: pt2`` → torch.export; a name ending in ``.onnx`` → ONNX; anything else a gigaseg checkpoint.
A TorchScript archive is refused: ``torch.jit.load`` compiles and runs the code the archive carries, and PyTorch
itself stopped loading TorchScript under ``torch.load(weights_only=True)`` after a crafted archive achieved code
execution (GHSA-53q9-r3pm-6pq6, CVE-2025-32434; ``torch/serialization.py``, ``_is_torchscript_zip``).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import yaml

from models.card import CARD_KEY, SIDECAR_SUFFIX, CardError, ModelCard, merge, parse_card
from models.checkpoint import read_info, seeded_checkpoint
from models.errors import CheckpointError
from models.fctl_checkpoint import is_fctl_checkpoint
from pipeline.errors import SpecError
from pipeline.frameworks.base import ModelSource, Resolution
from pipeline.storage import read_bytes
from pipeline.workers.predictor import DeviceConfig, TilePredictor
from pipeline.workers.runtimes import (
    ModulePredictor,
    OnnxPredictor,
    build_factory_model,
    check_export_archive,
    load_exported,
    open_onnx,
)

KINDS = ("gigaseg", "onnx", "export", "factory")


@dataclass(frozen=True)
class SegmenterRuntime:
    """How a worker builds the segmenter from its weights file: the kind, the (complete) card, the factory, and
    the input size and batch an ONNX model fixes (None: any)."""

    kind: str
    card: ModelCard
    factory: str | None = None
    fixed_size: tuple[int, int] | None = None
    fixed_batch: int | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What changes the output besides the weights (a gigaseg checkpoint carries its card in its bytes)."""
        if self.kind == "gigaseg":
            return {}
        return {"runtime": self.kind, "card": self.card.to_dict(), "factory": self.factory}


def kind_of(source: ModelSource) -> str:
    if source.factory:
        return "factory"
    data = source.checkpoint
    if data is None:
        return "gigaseg"
    if _zip_holds(data, "archive_format"):
        return "export"
    if (source.checkpoint_url or "").lower().endswith(".onnx"):
        return "onnx"
    return "gigaseg"


def _zip_holds(data: bytes, record: str) -> bool:
    """Whether ``data`` is a zip with a record named ``record`` (at its top or in its one top folder): what tells a
    torch.export archive (``archive_format``) and a TorchScript one (``constants.pkl``, as torch tells it) apart."""
    if data[:4] != b"PK\x03\x04":
        return False
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return False
    return any(n == record or n.endswith(f"/{record}") for n in names)


def resolve_segmenter(source: ModelSource, framework: str) -> Resolution:
    """The segmenter's weights, its card and its runtime (``Resolution.details["segmenter"]``)."""
    kind = kind_of(source)
    if kind == "gigaseg":
        return _gigaseg(source, framework)
    where = f"model.checkpoint: {source.checkpoint_url}"
    data = source.checkpoint
    try:
        fixed_size = fixed_batch = None
        channels = classes = None
        if kind == "onnx":
            _, facts = open_onnx(data)
            fixed_size, fixed_batch, channels, classes = facts["size"], facts["batch"], facts["channels"], facts["classes"]
            found = _card_json(facts["metadata"].get(CARD_KEY), f"{where} (metadata_props {CARD_KEY})")
        elif kind == "export":
            check_export_archive(data)
            found = _card_json(_export_extra(data, CARD_KEY), f"{where} (extra file {CARD_KEY})")
        else:
            found = _safetensors_card(data, where)
        card_where = where
        if found is None:
            found = _sidecar(source)
            card_where = (f"{source.checkpoint_url}{SIDECAR_SUFFIX}" if found is not None else
                          f"{where} (it has no model card, and there is no {SIDECAR_SUFFIX} beside it)")
        card = merge(found or {}, source.card, card_where, "the spec (model.classes / model.card)")
    except CardError as err:
        raise SpecError("model.card", [f"model: {err}"]) from None
    except CheckpointError as err:
        raise SpecError("model.checkpoint", [f"{where}: {err}"]) from None
    if channels is not None and channels != len(card.bands):
        raise SpecError("model.card", [
            f"model: {where}: the model takes {channels} input channels but {card_where} lists "
            f"{len(card.bands)} input bands ({', '.join(card.bands)}); give the card {channels} bands"])
    if len(card.bands) != source.in_channels and not source.any_bands:
        raise SpecError("inputs.bands", [
            f"inputs.bands: {card_where} lists {len(card.bands)} input bands ({', '.join(card.bands)}) but the job "
            f"feeds {source.feeds()}; set inputs.bands to {len(card.bands)} source channels in the model's order"])
    if classes is not None and classes != card.num_classes:
        raise SpecError("model.classes", [
            f"{where}: the model returns {classes} channels but its card lists {card.num_classes} classes "
            f"({', '.join(card.class_names)}); give {classes} class names"])
    runtime = SegmenterRuntime(kind, card, source.factory, fixed_size, fixed_batch)
    return Resolution(None, {"model": data}, {"segmenter": runtime}, card)


def _gigaseg(source: ModelSource, framework: str) -> Resolution:
    """A gigaseg checkpoint (``model.checkpoint``) or seeded weights of ``model.name``; an FCtL checkpoint is
    refused here (it needs its context windows: ``model.framework: fctl``)."""
    if source.checkpoint is None:
        data = seeded_checkpoint(source.architecture, len(source.class_names), list(source.class_names),
                                 seed=source.seed, width=source.width, in_channels=source.in_channels)
    else:
        data = source.checkpoint
        if _zip_holds(data, "constants.pkl"):  # TorchScript
            raise SpecError("model.checkpoint", [
                f"model.checkpoint: {source.checkpoint_url} is a TorchScript archive, which gigaseg does not load "
                "(torch.jit.load runs the code it carries; PyTorch refuses it under weights_only=True too). Fix: "
                "save the model with torch.export.save (.pt2) or export it to ONNX, or give its weights as "
                "safetensors with model.factory"])
        if is_fctl_checkpoint(data):
            raise SpecError("model.framework", [
                f"model.framework: {framework} but {source.checkpoint_url} holds an FCtL model (gigaseg train task "
                "fctl); set model.framework: fctl"])
    try:
        info = read_info(data)
    except CheckpointError as err:
        raise SpecError("model.checkpoint", [f"model.checkpoint: {source.checkpoint_url}: {err}"]) from None
    check_in_channels(info.config.in_channels, source)
    card = ModelCard.from_info(info)
    return Resolution(info, {"model": data}, {"segmenter": SegmenterRuntime("gigaseg", card)}, card)


def check_in_channels(in_channels: int, source: ModelSource) -> None:
    """A gigaseg network's input channels against the bands the job feeds (``SpecError`` naming both)."""
    if in_channels != source.in_channels and not source.any_bands:
        raise SpecError("inputs.bands", [
            f"inputs.bands: model.checkpoint {source.checkpoint_url} is a network of {in_channels} input "
            f"band(s) but the job feeds {source.feeds()}; set inputs.bands to {in_channels} source channels"])


def _card_json(text: str | None, where: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CardError(f"{where}: not JSON ({err})") from None
    return parse_card(data, where)


def _export_extra(data: bytes, name: str) -> str | None:
    archive = zipfile.ZipFile(io.BytesIO(data))
    for n in archive.namelist():
        if n.endswith(f"extra/{name}"):
            return archive.read(n).decode()
    return None


def _safetensors_card(data: bytes, where: str) -> dict[str, Any] | None:
    try:
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception:
        raise CheckpointError("not a safetensors file (model.factory needs its weights as safetensors)") from None
    return _card_json(meta.get(CARD_KEY), f"{where} (metadata {CARD_KEY})")


def _sidecar(source: ModelSource) -> dict[str, Any] | None:
    url = f"{source.checkpoint_url}{SIDECAR_SUFFIX}"
    try:
        text = read_bytes(url, source.storage_options).decode()
    except FileNotFoundError:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CardError(f"{url}: not YAML ({str(err).splitlines()[0]})") from None
    return parse_card(data, url)


def load_segmenter(data: bytes, runtime: SegmenterRuntime, device: DeviceConfig, on=None):
    """The segmenter as a tile predictor (``probabilities(tiles)``) on the worker's device (``on`` overrides)."""
    if runtime.kind == "gigaseg":
        return TilePredictor(data, device, on)
    if runtime.kind == "onnx":
        return OnnxPredictor(data, runtime.card, device, on)
    if runtime.kind == "export":
        return ModulePredictor(load_exported(data), runtime.card, device, on, exported=True)
    return ModulePredictor(build_factory_model(runtime.factory, data), runtime.card, device, on)


def check_segmenter(resolution: Resolution, tile: int) -> None:
    """The tile size against the model (its size multiple, an ONNX model's fixed size), then one tile of zeros
    through the model on the CPU: it must return one channel per class of its card at the tile's size."""
    runtime: SegmenterRuntime = resolution.details["segmenter"]
    card = runtime.card
    if runtime.fixed_size is not None and runtime.fixed_size != (tile, tile):
        raise SpecError("tiling.tile", [
            f"tiling.tile: {tile} but the ONNX model takes only {runtime.fixed_size[0]}×{runtime.fixed_size[1]} "
            f"inputs; set tiling.tile: {runtime.fixed_size[0]}" + (
                "" if runtime.fixed_size[0] == runtime.fixed_size[1] else " (gigaseg tiles are square)")])
    if tile % card.size_multiple:
        raise SpecError("tiling.tile", [
            f"tiling.tile: {tile} is not a multiple of {card.size_multiple}, the model's size multiple (its card); "
            f"use {tile // card.size_multiple * card.size_multiple or card.size_multiple}"])
    if runtime.kind == "gigaseg":
        return
    try:
        predictor = load_segmenter(resolution.weights["model"], runtime, DeviceConfig("fp32", 1, device="cpu"))
        predictor.probabilities(torch.from_numpy(np.zeros((1, len(card.bands), tile, tile), np.uint8)))
    except CheckpointError as err:
        raise SpecError("model.checkpoint", [f"model.checkpoint: {err}"]) from None
    except Exception as err:  # the user's own model failed on a tile: say so, before any worker starts
        raise SpecError("model.checkpoint", [
            f"model.checkpoint: the model fails on a {tile}×{tile} tile: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"]) from None


__all__ = ["KINDS", "SegmenterRuntime", "check_segmenter", "kind_of", "load_segmenter", "resolve_segmenter"]
