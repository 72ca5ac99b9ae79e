"""What a block writes once its rows are blended: the sinks a stage's blocks hand their finished rows to.

A worker blends a block's tiles on its device and, for every finished band of rows (whole chunk rows of the
block), calls its sink with the band (``device_blend.Band``: labels, confidence, probabilities, coverage, computed
on the device). The sink returns the writes ``(array, selection, host array)``, which the worker's writer thread
carries out, so encoding and storing overlap the next rows' model work. Frameworks add sinks of their own
(MagNet's refinement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.plan import ArrayRef
from pipeline.tiling import Window
from pipeline.workers.device_blend import Band

#: One write: ``(array, selection, values)``; ``array`` is opened writable by the worker (audited if asked).
Write = tuple[ArrayRef, tuple[slice, ...], np.ndarray]


class BlockSink(Protocol):
    def write(self, open_array, band: Band) -> list[Write]:
        """The writes for the finished rows ``band.region`` (global coordinates of the level, whole chunks)."""


def _yx(region: Window) -> tuple[slice, slice]:
    return slice(region.y0, region.y1), slice(region.x0, region.x1)


@dataclass(frozen=True)
class OutputSink:
    """The masks of a stage whose blend is the output: labels (level 0; the pyramid follows on the driver),
    and the extras asked for: confidence (max probability, float32) and probabilities (float16)."""

    labels: ArrayRef
    labels_dtype: str = "uint8"
    confidence: ArrayRef | None = None
    probabilities: ArrayRef | None = None

    def write(self, open_array, band: Band) -> list[Write]:
        y, x = _yx(band.region)
        writes = [(self.labels, (y, x), band.labels(self.labels_dtype))]
        if self.confidence is not None:
            writes.append((self.confidence, (y, x), band.confidence()))
        if self.probabilities is not None:
            writes.append((self.probabilities, (slice(None), y, x), band.host_probabilities()))
        return writes


@dataclass(frozen=True)
class MapSink:
    """A stage's blend as the ``(C, H, W)`` float16 map the next stage reads (MagNet's stage 0)."""

    map: ArrayRef

    def write(self, open_array, band: Band) -> list[Write]:
        y, x = _yx(band.region)
        return [(self.map, (slice(None), y, x), band.host_probabilities())]


def host(t: torch.Tensor, dtype: str) -> np.ndarray:
    """``t`` as a host array of ``dtype`` (``uint8``, ``uint16``, ``float16``, ``float32``)."""
    torch_dtype = {"uint8": torch.uint8, "uint16": torch.int32, "float16": torch.float16, "float32": torch.float32}
    out = t.to(torch_dtype[dtype]).cpu().numpy()
    return out.astype(np.uint16) if dtype == "uint16" else out


__all__ = ["BlockSink", "MapSink", "OutputSink", "Write", "host"]
