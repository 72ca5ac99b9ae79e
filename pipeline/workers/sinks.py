"""What a block writes once its rows are blended: the sinks a stage's blocks hand their finished rows to.

A stage's sink (a frozen plan object, the same on the driver and every worker) starts one writer per block
(``start``, with the block's ``BlockContext``). The worker blends the block's tiles on its device and, for
every finished band of rows, calls the writer with the band (``device_blend.Band``: labels, confidence,
probabilities, coverage, computed on the device); the writer returns the writes ``(array, selection, host
array)``, which the worker gathers into whole chunk rows (``worker.ChunkRows``) and its writer thread carries
out, so encoding and storing overlap the next rows' model work. ``finish`` returns what is left once the last
band is in. Frameworks add sinks of their own (MagNet's refinement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.output.nodata import Nodata
from pipeline.plan import ArrayRef
from pipeline.tiling import Window
from pipeline.workers.device_blend import Band
from pipeline.workers.label_pyramid import LabelPyramid, level_window

#: One write: ``(array, selection, values)``; ``array`` is opened writable by the worker (audited if asked).
Write = tuple[ArrayRef, tuple[slice, ...], np.ndarray]


@dataclass(frozen=True)
class BlockContext:
    """What a sink's writer knows of its block: the block's ``region`` (of the stage's level; the chunks it owns),
    the ``blend_region`` its bands cover (``region`` unless the stage has a halo: ``StagePlan.blend_region``),
    its ``index`` in the stage, how the worker opens an array it reads (``open_array(ref)``), and the device the
    sums are on."""

    region: Window
    blend_region: Window
    index: tuple[int, int]
    open_array: Callable[[ArrayRef], Any]
    device: torch.device


class BandWriter(Protocol):
    def write(self, band: Band) -> list[Write]:
        """The writes for the finished rows ``band.region`` (global coordinates of the level)."""

    def finish(self) -> list[Write]:
        """What is left once the block's last band is written."""


class BlockSink(Protocol):
    """What a stage's blocks write: a frozen, picklable plan object; ``start`` makes one block's writer."""

    def start(self, block: BlockContext) -> BandWriter: ...


def _yx(region: Window) -> tuple[slice, slice]:
    return slice(region.y0, region.y1), slice(region.x0, region.x1)


@dataclass(frozen=True)
class OutputSink:
    """The masks of a stage whose blend is the output: labels (level 0, and the pyramid levels ``pyramid``
    1 … K made on the device, ``label_pyramid``; the driver builds the rest; ``nodata``'s label where the input
    states no data), and the extras asked for: confidence (max probability, float32) and probabilities
    (float16)."""

    labels: ArrayRef
    labels_dtype: str = "uint8"
    confidence: ArrayRef | None = None
    probabilities: ArrayRef | None = None
    pyramid: tuple[ArrayRef, ...] = ()
    nodata: Nodata | None = None  # where level 0 of the input states no data: its label there

    def start(self, block: BlockContext) -> LabelWriter:
        return LabelWriter(self, block)


class LabelWriter:
    """One block's ``OutputSink`` writes: each band's labels (and extras) as they come, and the label pyramid's
    rows as they become final."""

    def __init__(self, sink: OutputSink, block: BlockContext) -> None:
        self.sink = sink
        self.pyramid = LabelPyramid(len(sink.pyramid), block.region) if sink.pyramid else None

    def write(self, band: Band) -> list[Write]:
        sink = self.sink
        y, x = _yx(band.region)
        labels = band.label_tensor(sink.labels_dtype)
        writes = self.labels(band.region, labels)
        if sink.confidence is not None:
            writes.append((sink.confidence, (y, x), band.confidence()))
        if sink.probabilities is not None:
            writes.append((sink.probabilities, (slice(None), y, x), band.host_probabilities()))
        return writes

    def labels(self, region: Window, labels: torch.Tensor) -> list[Write]:
        """Level-0 ``labels`` ``(h, w)`` (device) of ``region`` (nodata marked, where the input states it), and
        the pyramid rows they complete."""
        nodata = self.sink.nodata
        if nodata is not None:
            mask = nodata.mask(region)
            if mask.any():
                labels = labels.masked_fill(torch.from_numpy(mask).to(labels.device), nodata.label)
        writes = [(self.sink.labels, _yx(region), host_labels(labels, self.sink.labels_dtype))]
        if self.pyramid is not None:
            writes += self._levels(self.pyramid.add(region.y0, labels), region)
        return writes

    def finish(self) -> list[Write]:
        return [] if self.pyramid is None else self._levels(self.pyramid.finish(), self.pyramid.region)

    def _levels(self, rows, region: Window) -> list[Write]:
        out = []
        for level, y0, values in rows:
            win = level_window(region, level)
            out.append((self.sink.pyramid[level - 1], (slice(y0, y0 + values.shape[0]), slice(win.x0, win.x1)),
                        host_labels(values, self.sink.labels_dtype)))
        return out


@dataclass(frozen=True)
class MapSink:
    """A stage's blend as the ``(C, H, W)`` float16 map the next stage reads (MagNet's stage 0)."""

    map: ArrayRef

    def start(self, block: BlockContext) -> MapSink:
        return self

    def write(self, band: Band) -> list[Write]:
        y, x = _yx(band.region)
        return [(self.map, (slice(None), y, x), band.host_probabilities())]

    def finish(self) -> list[Write]:
        return []


def host_labels(labels: torch.Tensor, dtype: str) -> np.ndarray:
    """Device labels (any integer dtype holding ``dtype``'s values) as a host array of ``dtype``."""
    out = labels.cpu().numpy()
    return out if out.dtype == np.dtype(dtype) else out.astype(dtype)


def host(t: torch.Tensor, dtype: str) -> np.ndarray:
    """``t`` as a host array of ``dtype`` (``uint8``, ``uint16``, ``float16``, ``float32``)."""
    torch_dtype = {"uint8": torch.uint8, "uint16": torch.int32, "float16": torch.float16, "float32": torch.float32}
    out = t.to(torch_dtype[dtype]).cpu().numpy()
    return out.astype(np.uint16) if dtype == "uint16" else out


__all__ = ["BandWriter", "BlockContext", "BlockSink", "LabelWriter", "MapSink", "OutputSink", "Write", "host",
           "host_labels"]
