"""GPU-pinned tile workers.

``TileWorker`` is a plain class (unit-testable without Ray); the dispatcher wraps it with
``ray.remote(num_gpus=…)`` so each actor holds its share of a GPU — a logical one on machines without
CUDA, so placement is the same as on a GPU cluster. An actor loads the model once, reads its tile
windows straight from the Zarr pyramid and writes each tile's probabilities straight to its own chunk
of the tile store. ``run`` is idempotent: a retried batch rewrites the same chunks with the same values.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from pipeline.context import context_levels, read_contexts
from pipeline.errors import ImageReadError
from pipeline.predictor import PredictorConfig, TilePredictor
from pipeline.reader import read_windows, upsample2x_window
from pipeline.storage import AuditStore, filesystem, fs_path, join, zarr_store
from pipeline.tiling import TileGrid, Window


@dataclass(frozen=True)
class ArrayRef:
    """One array a worker reads: ``<group_url>/<path>`` with named axes and its y/x shape."""

    group_url: str
    path: str
    axes: str
    shape_yx: tuple[int, int]
    storage_options: dict[str, Any] = field(default_factory=dict)
    value_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class ContextPlan:
    """FCtL: the context factors of every tile and the pyramid levels they read (``pipeline.context``).

    ``levels[l]`` is level ``l`` of the image pyramid, for every level up to the coarsest a context reads;
    only those ``context_levels`` are opened.
    """

    factors: tuple[float, ...]
    levels: tuple[ArrayRef, ...]

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple(ref.shape_yx for ref in self.levels)


@dataclass(frozen=True)
class StagePlan:
    """One stage of one image: the level it reads, its tile grid and the tile store it writes.

    The spine runs a single stage at level 0. MagNet chains stages at coarser-to-finer levels (a stage
    reads the blended map of the previous one); FCtL adds context reads at coarser levels. Both extend
    this plan rather than the worker loop.
    """

    image: ArrayRef
    grid: TileGrid
    tiles_url: str
    num_classes: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    previous: ArrayRef | None = None  # MagNet: the previous stage's (C, H, W) map, one level coarser
    context: ContextPlan | None = None  # FCtL: context windows around each tile, from coarser levels


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


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    with filesystem(url, storage_options).open(fs_path(url), "rb") as f:
        return f.read()


class TileWorker:
    """Loads the model once; ``run(batch)`` reads, predicts and writes the batch's tiles.

    The checkpoint is read from a URL (the job copies it into the output store), not passed through the
    driver's object store, so an actor restarted on another node after its driver-side references are
    gone still finds its weights.
    """

    def __init__(self, checkpoint_url: str, storage_options: dict[str, Any], config: PredictorConfig,
                 audit_dir: str | None = None, refiner_url: str | None = None):
        refiner = read_bytes(refiner_url, storage_options) if refiner_url else None
        self.predictor = TilePredictor(read_bytes(checkpoint_url, storage_options), config, refiner=refiner)
        # The actor runs up to two calls at once (max_concurrency=2): one reads or writes Zarr while the
        # other holds the model. Model calls never overlap, so the device and torch's threads are used by
        # one batch at a time.
        self._model_lock = threading.Lock()
        self._arrays_lock = threading.Lock()
        self.audit_dir = audit_dir
        self.name = f"worker-{os.getpid()}"
        self._arrays: dict[tuple[str, str, bool], zarr.Array] = {}

    def info(self) -> dict[str, Any]:
        import ray

        if not ray.is_initialized():
            return {"worker": self.name, "device": str(self.predictor.device), "gpu_ids": [], "node": None}
        return {"worker": self.name, "device": str(self.predictor.device), "gpu_ids": ray.get_gpu_ids(),
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

    @staticmethod
    def _read(src: zarr.Array, ref: ArrayRef, windows: list[Window]) -> np.ndarray:
        """The batch's tiles ``(N, 3, T, T)``, side-by-side tiles read as one window (``read_windows``)."""
        try:
            return read_windows(src, ref.axes, ref.shape_yx, windows, value_range=ref.value_range)
        except Exception as err:  # name the array and windows: the decoder's own message says neither
            y0, y1 = min(w.y0 for w in windows), max(w.y1 for w in windows)
            x0, x1 = min(w.x0 for w in windows), max(w.x1 for w in windows)
            raise ImageReadError(
                f"{join(ref.group_url, ref.path)}: cannot read window y {y0}:{y1}, x {x0}:{x1} "
                f"({len(windows)} tile(s)): {type(err).__name__}: {err}"
            ) from err

    def _context_arrays(self, plan: ContextPlan) -> dict[int, zarr.Array]:
        """The pyramid levels the contexts read, opened (once per actor, cached) for a batch."""
        return {level: self._array(plan.levels[level].group_url, plan.levels[level].path,
                                   plan.levels[level].storage_options, write=False)
                for level in context_levels(plan.factors, len(plan.levels))}

    @staticmethod
    def _read_contexts(plan: ContextPlan, arrays: dict[int, zarr.Array], ref: ArrayRef, window) -> np.ndarray:
        try:
            return read_contexts(arrays, plan.shapes, ref.axes, window, plan.factors, window.h, ref.value_range)
        except Exception as err:  # name the image and the tile, as _read does
            raise ImageReadError(
                f"{ref.group_url}: cannot read the FCtL contexts of tile y {window.y0}:{window.y1}, "
                f"x {window.x0}:{window.x1}: {type(err).__name__}: {err}"
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
        ref = stage.image
        src = self._array(ref.group_url, ref.path, ref.storage_options, write=False)
        windows = [stage.grid.window(iy, ix) for iy, ix in indices]
        tiles = self._read(src, ref, windows)
        previous_up = contexts = None
        if stage.previous is not None:
            prev = stage.previous
            prev_array = self._array(prev.group_url, prev.path, prev.storage_options, write=False)
            previous_up = np.stack([upsample2x_window(prev_array, prev.shape_yx, ref.shape_yx, w) for w in windows])
        if stage.context is not None:
            arrays = self._context_arrays(stage.context)
            contexts = np.stack([self._read_contexts(stage.context, arrays, ref, w) for w in windows])
        with self._model_lock:
            t1 = time.perf_counter()
            if previous_up is not None:
                probs = self.predictor.refine(tiles, previous_up)
            elif contexts is not None:
                probs = self.predictor.with_contexts(tiles, contexts)
            else:
                probs = self.predictor(tiles)
            model_seconds = time.perf_counter() - t1
        out = self._array(stage.tiles_url, "", stage.storage_options, write=True)
        for k, (iy, ix) in enumerate(indices):
            out[iy, ix] = probs[k]
        return model_seconds


def tile_store_path(work_url: str, name: str, stage: int = 0) -> str:
    return join(work_url, name, f"stage-{stage}", "tiles")
