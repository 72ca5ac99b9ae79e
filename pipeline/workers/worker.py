"""GPU-pinned tile workers.

``TileWorker`` is a plain class (unit-testable without Ray); the dispatcher wraps it with
``ray.remote(num_gpus=…)`` so each actor holds its share of a GPU — a logical one on machines without
CUDA, so placement is the same as on a GPU cluster. An actor loads its framework's model once
(``Framework.load``), reads its tile windows (and whatever else the stage's tiles read: ``StagePlan.inputs``)
straight from Zarr, and writes each tile's probabilities straight to its own chunk of the tile store. ``run``
is idempotent: a retried batch rewrites the same chunks with the same values.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import zarr

from pipeline.errors import ImageReadError
from pipeline.frameworks.base import ArrayRef, Framework, StagePlan
from pipeline.reader import read_windows
from pipeline.storage import AuditStore, join, read_bytes, zarr_store
from pipeline.tiling import Window
from pipeline.workers.predictor import DeviceConfig


@dataclass(frozen=True)
class TileBatch:
    """One call to a worker: ``tiles`` of one stage, run through the model ``batch_size`` at a time.

    A call holds more tiles than one model batch so the driver's cost per call (about a millisecond of Ray
    submission and result handling) is spread over many tiles; the worker streams them, holding one model
    batch of pixels at a time.
    """

    stage: StagePlan
    tiles: tuple[tuple[int, int], ...]
    batch_size: int | None = None  # None: all tiles in one model batch


@dataclass(frozen=True)
class BatchResult:
    tiles: tuple[tuple[int, int], ...]
    seconds: float
    model_seconds: float
    megapixels: float
    worker: str


class TileWorker:
    """Loads the framework's model once; ``run(batch)`` reads, predicts and writes the batch's tiles.

    The weights are read from URLs (the job copies them into the output store), not passed through the
    driver's object store, so an actor restarted on another node after its driver-side references are
    gone still finds them.
    """

    def __init__(self, framework: Framework, storage_options: dict[str, Any], device: DeviceConfig = DeviceConfig(),
                 audit_dir: str | None = None):
        self.model = framework.load(lambda url: read_bytes(url, storage_options), device)
        # The actor runs up to two calls at once (max_concurrency=2): one reads or writes Zarr while the
        # other holds the model. Model calls never overlap, so the device and torch's threads are used by
        # one batch at a time.
        self._model_lock = threading.Lock()
        self._arrays_lock = threading.Lock()
        self.audit_dir = audit_dir
        self.name = f"worker-{os.getpid()}"
        self._arrays: dict[tuple[str, str, bool], zarr.Array] = {}

    def info(self) -> dict[str, Any]:
        if not ray.is_initialized():
            return {"worker": self.name, "device": str(self.model.device), "gpu_ids": [], "node": None}
        return {"worker": self.name, "device": str(self.model.device), "gpu_ids": ray.get_gpu_ids(),
                "node": ray.get_runtime_context().get_node_id()}

    def _array(self, group_url: str, path: str, storage_options, write: bool) -> zarr.Array:
        key = (group_url, path, write)
        with self._arrays_lock:
            if key not in self._arrays:
                store = zarr_store(group_url, storage_options, read_only=not write)
                if write and self.audit_dir:
                    log_path = os.path.join(self.audit_dir, f"{self.name}.log")
                    store = AuditStore(store, log_path, self.name, group_url)
                self._arrays[key] = zarr.open_array(store=store, path=path, mode="r+" if write else "r")
            return self._arrays[key]

    def open(self, ref: ArrayRef) -> zarr.Array:
        """An array this worker reads, opened once per actor (the ``OpenArray`` tile inputs get)."""
        return self._array(ref.group_url, ref.path, ref.storage_options, write=False)

    def _read(self, ref: ArrayRef, windows: list[Window]) -> np.ndarray:
        """The batch's tiles ``(N, 3, T, T)``, side-by-side tiles read as one window (``read_windows``)."""
        try:
            return read_windows(self.open(ref), ref.axes, ref.shape_yx, windows, value_range=ref.value_range)
        except Exception as err:  # name the array and windows: the decoder's own message says neither
            y0, y1 = min(w.y0 for w in windows), max(w.y1 for w in windows)
            x0, x1 = min(w.x0 for w in windows), max(w.x1 for w in windows)
            raise ImageReadError(
                f"{join(ref.group_url, ref.path)}: cannot read window y {y0}:{y1}, x {x0}:{x1} "
                f"({len(windows)} tile(s)): {type(err).__name__}: {err}"
            ) from err

    def run(self, batch: TileBatch) -> BatchResult:
        t0 = time.perf_counter()
        size = batch.batch_size or len(batch.tiles)
        model_seconds = 0.0
        for i in range(0, len(batch.tiles), size):
            model_seconds += self._run_batch(batch.stage, batch.tiles[i : i + size])
        tile = batch.stage.grid.tile
        return BatchResult(
            tiles=batch.tiles,
            seconds=time.perf_counter() - t0,
            model_seconds=model_seconds,
            megapixels=len(batch.tiles) * tile * tile / 1e6,
            worker=self.name,
        )

    def _run_batch(self, stage: StagePlan, indices: tuple[tuple[int, int], ...]) -> float:
        """Read, predict and write one model batch; returns the seconds spent in the model."""
        windows = [stage.grid.window(iy, ix) for iy, ix in indices]
        tiles = self._read(stage.image, windows)
        inputs = [source.read(self.open, stage.image, windows) for source in stage.inputs]
        with self._model_lock:
            t1 = time.perf_counter()
            probs = self.model(stage.index, tiles, inputs)
            model_seconds = time.perf_counter() - t1
        out = self._array(stage.tiles_url, "", stage.storage_options, write=True)
        for k, (iy, ix) in enumerate(indices):
            out[iy, ix] = probs[k]
        return model_seconds


__all__ = ["BatchResult", "TileBatch", "TileWorker"]
