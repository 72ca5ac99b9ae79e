"""The training output of ``gigaseg train``: per-epoch checkpoints, ``latest.json`` (written last, so a killed
run resumes from the last complete epoch), history, curves and the final weights, on any fsspec URL.

The weights file is ``model.safetensors`` (a gigaseg segmenter checkpoint; an FCtL checkpoint for ``task: fctl``
stage fused) or, for ``task: magnet_refiner``, ``refiner.safetensors`` (``models.magnet.save_refiner``); each
epoch directory holds one under the same name.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import torch

from models.curves import plot_curves
from models.errors import CheckpointError
from pipeline.storage import filesystem, fs_path, join, write_bytes

LATEST, HISTORY, CURVES, FINAL = "latest.json", "history.json", "curves.png", "model.safetensors"
REFINER_FINAL = "refiner.safetensors"


class CheckpointStore:
    """The training output: epoch checkpoints, ``latest.json`` (written last), history, curves, final weights
    (``weights``: the file name of the final and of each epoch's weights)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, weights: str = FINAL) -> None:
        self.url, self.storage_options, self.weights = url, dict(storage_options or {}), weights
        self.fs = filesystem(url, self.storage_options)

    def _path(self, rel: str) -> str:
        return fs_path(join(self.url, rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def read(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(rel))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> dict | None:
        data = self.read(rel)
        return None if data is None else json.loads(data)

    def write(self, rel: str, data: bytes) -> None:
        """A whole-file write a reader never sees half done (``pipeline.storage.write_bytes``)."""
        write_bytes(join(self.url, rel), data, self.storage_options)

    def write_json(self, rel: str, data: dict) -> None:
        self.write(rel, json.dumps(_json_safe(data), indent=1).encode())

    def latest(self) -> dict | None:
        return self.read_json(LATEST)

    def epochs(self) -> list[int]:
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(""), detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(n[6:]) for n in names if n.startswith("epoch-") and n[6:].isdigit())

    def clear(self) -> None:
        for epoch in self.epochs():
            self.fs.rm(self._path(_epoch_dir(epoch)), recursive=True)
        for rel in (LATEST, HISTORY, CURVES, self.weights):
            if self.exists(rel):
                self.fs.rm(self._path(rel))

    def save_epoch(self, epoch: int, weights: bytes, state: dict, history: dict, info: dict, keep: int) -> None:
        """Epoch files, then history and curves, then ``latest.json``; older epochs past ``keep`` pruned."""
        buf = io.BytesIO()
        torch.save(state, buf)
        self.write(f"{_epoch_dir(epoch)}/{self.weights}", weights)
        self.write(f"{_epoch_dir(epoch)}/state.pt", buf.getvalue())
        self.write_json(HISTORY, history)
        self.write(CURVES, plot_curves(_panels(history)))
        self.write_json(LATEST, {"epoch": epoch, "dir": _epoch_dir(epoch), **info})
        for old in self.epochs():
            if keep and old <= epoch - keep:
                self.fs.rm(self._path(_epoch_dir(old)), recursive=True)

    def load_epoch(self, latest: dict) -> tuple[bytes, dict]:
        weights, state = self.read(f"{latest['dir']}/{self.weights}"), self.read(f"{latest['dir']}/state.pt")
        if weights is None or state is None:
            raise CheckpointError(f"{self.url}/{latest['dir']} is incomplete although {LATEST} names it")
        return weights, torch.load(io.BytesIO(state), weights_only=True, map_location="cpu")


def _epoch_dir(epoch: int) -> str:
    return f"epoch-{epoch:03d}"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _panels(history: dict[str, list]) -> dict[str, dict[str, list]]:
    loss = {k: history[k] for k in ("train_loss", "val_loss") if k in history}
    loss |= {k: v for k, v in history.items() if k.startswith("train_") and k.endswith("_loss")}  # loss terms
    scores = {k: history[k] for k in ("miou", "pixel_accuracy", "segmenter_miou") if k in history}
    return {"loss": loss, "validation": scores}


__all__ = ["CURVES", "FINAL", "HISTORY", "LATEST", "REFINER_FINAL", "CheckpointStore"]
