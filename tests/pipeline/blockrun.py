"""Run the real block worker in this process (no Ray) on an image held in the test: what tests of the blend,
the seams and the worker's streaming share."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import zarr

from pipeline.blocks import block_tiles, owned_counts, plan_blocks
from pipeline.frameworks.base import StagePlan
from pipeline.frameworks.segment import Segment
from pipeline.plan import ArrayRef, WeightsRef
from pipeline.tiling import TileGrid
from pipeline.workers.predictor import PredictorConfig
from pipeline.workers.sinks import OutputSink
from pipeline.workers.worker import BlockTask, BlockWorker


def block_worker(tmp_path: Path, checkpoint: bytes, threads: int = 1, device: PredictorConfig | None = None) -> BlockWorker:
    """A worker of ``checkpoint`` (fp32, ``threads`` torch threads, unless ``device`` says otherwise)."""
    path = tmp_path / f"model-{hashlib.sha256(checkpoint).hexdigest()[:8]}.safetensors"
    path.write_bytes(checkpoint)
    config = device or PredictorConfig(precision="fp32", torch_threads=threads)
    return BlockWorker(Segment(WeightsRef(str(path), "")), {}, config)


def run_blocks(worker: BlockWorker, tmp_path: Path, image: np.ndarray, grid: TileGrid, *, side: int, chunk: int,
               num_classes: int, batch: int = 8, window: str = "gaussian",
               name: str = "run") -> tuple[np.ndarray, np.ndarray]:
    """``(labels (H, W), probabilities (C, H, W) float16)`` of ``image`` ``(3, H, W)`` uint8 on ``grid``, computed
    block by block (``side``) by ``worker`` and written through an ``OutputSink`` with probabilities."""
    root = tmp_path / name
    img = zarr.create_array(store=str(root / "image"), shape=image.shape, chunks=(3, 128, 128), dtype="uint8",
                            overwrite=True)
    img[:] = image
    h, w = grid.height, grid.width
    out = zarr.open_group(str(root / "out"), mode="w")
    labels = out.create_array("labels", shape=(h, w), chunks=(chunk, chunk), dtype="uint8")
    probs = out.create_array("probs", shape=(num_classes, h, w), chunks=(num_classes, chunk, chunk), dtype="float16")
    sink = OutputSink(ArrayRef(str(root / "out"), "labels", "yx", (h, w)), "uint8", None,
                      ArrayRef(str(root / "out"), "probs", "cyx", (h, w)))
    stage = StagePlan(0, ArrayRef(str(root / "image"), "", "cyx", (h, w)), grid, str(root / "maps"), num_classes)
    owned = owned_counts(grid, side, chunk)
    for block in plan_blocks(h, w, chunk, side):
        worker.run(BlockTask(stage, block, tuple(block_tiles(grid, block)), sink, owned.get(block.index, 0), batch,
                             window, 0.125, chunk))
    return labels[:], probs[:]
