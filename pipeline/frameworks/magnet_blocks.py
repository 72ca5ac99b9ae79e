"""MagNet's work on the workers: what a refinement stage's tiles read and what its blocks write (the stage's plan
and its driver side are ``pipeline.frameworks.magnet``; the formulas are ``magnet_maps``).

Stage ``s ≥ 1`` runs at level ``L_s``; its tiles read the map ``Y_{s−1}`` of the stage before at half resolution
and see it ×2 upsampled (``PreviousMap``: the footprint rows are read once per block row window, on the host,
and upsampled on the device). A block of a refinement stage blends its tiles over its region grown by the median
filter's reach ``r = k // 2`` (``StagePlan.halo``), and for every band of rows its writer (``RefineSink``):

- takes ``R`` (the blend; ``Y_up`` where MagNet-Fast ran no tile), ``Y_up`` over the band, and
  ``E = certainty(R) · uncertainty(Y_up)`` (0 where no tile ran), rounded to float16 as the maps are stored;
- filters ``E`` with the ``k × k`` median on the device as rows come (``MedianRows``: edges replicated at the
  level's edges; inside the level the halo holds the neighbours), so ``E_med`` of the block's pixels is the
  whole map's;
- counts ``E_med``'s exact float16 values of the block's pixels (a histogram, stored once per block): the
  driver sums them into the stage's threshold ``t`` (``magnet_maps.threshold_from_histogram``);
- writes what the merge ``Y_s = where(E_med ≥ t, R, Y_up)`` needs, and only that: for a stage that feeds
  another, ``R`` and ``Y_up`` (float16) and ``E_med``, from which the next stage's ``PreviousMap`` composes
  ``Y_s`` as it reads; for the last stage, per pixel the two candidates' labels and confidences (argmax and max
  of ``R`` as stored and of ``Y_up``) and ``E_med``, which a pass with no tiles (``MergeSink``) turns into the
  masks once ``t`` is known — plus ``R`` and ``Y_up`` if the probabilities are asked for.

So no stage's ``C``-channel probabilities are read back by the driver, and the last stage's are never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from models import magnet as mg
from pipeline.frameworks.base import OpenArray
from pipeline.plan import ArrayRef
from pipeline.row_reader import LevelRows, chunk_rows, upsample2x_rows, upsample_source
from pipeline.storage import zarr_store
from pipeline.tiling import Window
from pipeline.workers.device_blend import Band
from pipeline.workers.median import median_float16
from pipeline.workers.sinks import BlockContext, LabelWriter, OutputSink, Write

#: The attribute of a refinement stage's maps group that holds its threshold ``t`` once the stage is done.
THRESHOLD = "magnet_threshold"
_F16_BINS = 1 << 16


@dataclass(frozen=True)
class StageMap:
    """The map ``Y`` a stage leaves for the next, ``(C, H, W)``: stage 0's blend as it is (``map``), or a
    refinement stage's ``where(E_med ≥ t, R, Y_up)`` composed from its arrays as it is read."""

    group_url: str
    shape_yx: tuple[int, int]
    num_classes: int
    refined: bool
    storage_options: dict[str, Any]

    def ref(self, name: str) -> ArrayRef:
        return ArrayRef(self.group_url, name, "cyx" if name != "error" else "yx", self.shape_yx,
                        dict(self.storage_options))

    def threshold(self) -> float:
        group = zarr.open_group(store=zarr_store(self.group_url, self.storage_options, read_only=True), mode="r")
        return float(group.attrs[THRESHOLD])

    def reader(self, open_array: OpenArray):
        """``read(window) → (C, h, w)`` float16 of ``Y`` inside the level."""
        if not self.refined:
            y = open_array(self.ref("map"))
            return lambda w: np.asarray(y[:, w.y0 : w.y1, w.x0 : w.x1])
        r, u, e = (open_array(self.ref(n)) for n in ("refined", "up", "error"))
        t = self.threshold()

        def read(w: Window) -> np.ndarray:
            rows, cols = slice(w.y0, w.y1), slice(w.x0, w.x1)
            return np.where((np.asarray(e[rows, cols]) >= t)[None], np.asarray(r[:, rows, cols]),
                            np.asarray(u[:, rows, cols]))

        return read

    def rows(self, open_array: OpenArray, fine_shape: tuple[int, int], x0: int, x1: int, margin: int = 0):
        """A ``LevelRows`` of ``Y`` over the columns the upsampling of fine columns ``[x0, x1)`` reads, and
        that first column."""
        s0, s1 = upsample_source((x0, x1), fine_shape[1], self.shape_yx[1])
        array = open_array(self.ref("map" if not self.refined else "refined"))
        return LevelRows(self.reader(open_array), self.shape_yx, chunk_rows(array, "cyx"), s0, s1, "reflect",
                         self.num_classes, np.float16, margin), s0


@dataclass(frozen=True)
class PreviousMap:
    """A tile input: the previous stage's map over the tile's window, upsampled (×2 between pyramid levels, else by
    the ratio of the stages' sizes) ``(B, C, T, T)`` float32."""

    map: StageMap

    def open_rows(self, open_array: OpenArray, image: ArrayRef, tile: int, x_lo: int, x_hi: int,
                  shared: dict) -> PreviousRows:
        return PreviousRows(self.map, open_array, image.shape_yx, tile, x_lo, x_hi, shared)


#: ``BlockContext.shared`` key: ``(first row, first column, (C, T, X) device tensor)``, the upsampled previous map
#: over the tile row in hand, which the block's ``RefineWriter`` reads instead of reading and upsampling again.
UPSAMPLED = "magnet.upsampled"


class PreviousRows:
    """One block's ``PreviousMap``: per tile row, the map rows under it on the host, upsampled on the device."""

    def __init__(self, stage_map: StageMap, open_array: OpenArray, fine_shape: tuple[int, int], tile: int,
                 x_lo: int, x_hi: int, shared: dict | None = None) -> None:
        self.map, self.fine, self.x_lo, self.x_hi = stage_map, fine_shape, x_lo, x_hi
        self.shared = shared if shared is not None else {}
        # near the bottom a tile row mirrors back up by up to a tile: keep that many map rows (half of it between
        # pyramid levels, tile · h/H for a map h rows high under a stage of H, and 2)
        margin = max(tile // 2, -(-tile * stage_map.shape_yx[0] // fine_shape[0])) + 2
        self.rows, self.s0 = stage_map.rows(open_array, fine_shape, x_lo, x_hi, margin=margin)

    def read(self, windows: list[Window]) -> tuple[np.ndarray, int]:
        y0, y1 = windows[0].y0, windows[0].y1
        r0, r1 = upsample_source((y0, y1), self.fine[0], self.map.shape_yx[0])
        return self.rows.rows(r0, r1), r0

    def to_device(self, host, windows: list[Window], runner) -> torch.Tensor:
        slab, r0 = host
        w0 = windows[0]
        up = upsample2x_rows(runner.upload(slab), (r0, self.s0), self.map.shape_yx, self.fine,
                             Window(w0.y0, self.x_lo, w0.h, self.x_hi - self.x_lo))
        self.shared[UPSAMPLED] = (w0.y0, self.x_lo, up)
        return torch.stack([up[:, :, w.x0 - self.x_lo : w.x1 - self.x_lo] for w in windows])


class MedianRows:
    """The ``k × k`` median of a map's rows as they come, for the pixels of ``own``: rows of ``blend`` (``own``
    grown by ``r = k // 2`` within the level; non-negative float16, the error score) come in order; past
    ``blend``'s edges (the level's edges, where it is cut) the nearest row or column repeats, as
    ``models.magnet.median_filter`` pads. ``workers.median`` computes it, ``strip`` rows at a time."""

    def __init__(self, k: int, blend: Window, own: Window, device: torch.device, strip: int = 64) -> None:
        self.k, self.r, self.blend, self.own, self.strip = k, k // 2, blend, own, strip
        self.buf: torch.Tensor | None = None  # rows [lo, lo + len(buf)) of ``blend``
        self.lo = blend.y0
        self.next = own.y0  # the first own row not yet given
        cols = np.clip(np.arange(own.x0 - self.r, own.x1 + self.r), blend.x0, blend.x1 - 1) - blend.x0
        self.cols = torch.from_numpy(cols).to(device)

    def add(self, y0: int, rows: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Rows ``[y0, …)`` of ``blend`` (all its columns); the own rows whose median is now known."""
        if self.buf is None:
            if y0 != self.blend.y0:
                raise ValueError(f"median rows must start at the blend region's top {self.blend.y0}, got {y0}")
            self.buf = rows
        else:
            if y0 != self.lo + self.buf.shape[0]:
                raise ValueError(f"median rows {y0}.. after rows up to {self.lo + self.buf.shape[0]}")
            self.buf = torch.cat([self.buf, rows])
        hi = self.lo + self.buf.shape[0]
        last = self.own.y1 if hi >= self.blend.y1 else min(self.own.y1, hi - self.r)
        if last <= self.next:
            return []
        out = [(y, self._median(y, min(last, y + self.strip))) for y in range(self.next, last, self.strip)]
        self.next = last
        keep = max(self.next - self.r, self.blend.y0) - self.lo
        self.buf, self.lo = self.buf[keep:], self.lo + keep
        return out

    def finish(self) -> None:
        if self.next != self.own.y1:
            raise RuntimeError(f"median rows up to {self.next} of {self.own.y1}: the block's rows did not all come")

    def _median(self, a: int, b: int) -> torch.Tensor:
        """Own rows ``[a, b)``: ``(b − a, own.w)``, the median of each pixel's ``k × k`` neighbourhood."""
        rows = np.clip(np.arange(a - self.r, b + self.r), self.blend.y0, self.blend.y1 - 1) - self.lo
        return median_float16(self.buf[torch.from_numpy(rows).to(self.buf.device)][:, self.cols], self.k)


@dataclass(frozen=True)
class RefineSink:
    """What a refinement stage's blocks write (module docstring). ``maps``: ``R`` and ``Y_up`` (a stage another
    reads, or the last stage when the probabilities are asked for); ``pairs``: the candidates' labels and
    confidences (the last stage); ``hist``: ``(blocks y, blocks x, 2^16)`` counts of ``E_med``'s values."""

    previous: StageMap
    out: StageMap
    median: int
    hist: ArrayRef
    maps: bool
    pairs: bool
    labels_dtype: str = "uint8"
    # ``(k, blend, own, device, level shape) → rows filter`` for the reference's median (``magnet_reference``);
    # None: ``MedianRows``
    median_rows: Any = None

    def start(self, block: BlockContext) -> RefineWriter:
        return RefineWriter(self, block)


class RefineWriter:
    def __init__(self, sink: RefineSink, block: BlockContext) -> None:
        self.sink, self.block = sink, block
        blend, own = block.blend_region, block.region
        self.fine = sink.out.shape_yx
        self.rows = None  # read only for rows no tile row's upsampled map holds (MagNet-Fast's gaps)
        self.median = (MedianRows(sink.median, blend, own, block.device) if sink.median_rows is None
                       else sink.median_rows(sink.median, blend, own, block.device, self.fine))
        self.counts = torch.zeros(_F16_BINS, dtype=torch.int64, device=block.device)
        self.cols = slice(own.x0 - blend.x0, own.x1 - blend.x0)

    def _up(self, region: Window) -> torch.Tensor:
        """``Y_up`` over ``region`` (rows of the blend region): from the tile row in hand when it holds them (the
        same values: both are ``upsample2x_rows`` of the same map), else read and upsampled here."""
        held = self.block.shared.get(UPSAMPLED)
        if held is not None:
            y0, x0, up = held  # MagNet-Fast's chosen tiles may span fewer rows or columns than the block's
            if y0 <= region.y0 and region.y1 <= y0 + up.shape[1] and x0 <= region.x0 and region.x1 <= x0 + up.shape[2]:
                return up[:, region.y0 - y0 : region.y1 - y0, region.x0 - x0 : region.x1 - x0]
        if self.rows is None:
            blend = self.block.blend_region
            self.rows, self.s0 = self.sink.previous.rows(self.block.open_array, self.fine, blend.x0, blend.x1)
        r0, r1 = upsample_source((region.y0, region.y1), self.fine[0], self.sink.previous.shape_yx[0])
        slab = torch.from_numpy(self.rows.rows(r0, r1)).to(self.block.device)
        return upsample2x_rows(slab, (r0, self.s0), self.sink.previous.shape_yx, self.fine, region)

    def write(self, band: Band) -> list[Write]:
        sink, own = self.sink, self.block.region
        up = self._up(band.region)
        covered = band.covered()
        refined = torch.where(covered[None], band.probabilities(), up)
        error = torch.where(covered, mg.error_score(refined[None], up[None])[0], torch.zeros_like(up[0]))
        writes: list[Write] = []
        a, b = max(band.region.y0, own.y0), min(band.region.y1, own.y1)
        if a < b:
            rows, sel = slice(a - band.region.y0, b - band.region.y0), (slice(a, b), slice(own.x0, own.x1))
            r16, u = refined[:, rows, self.cols].half(), up[:, rows, self.cols]
            if sink.maps:
                writes += [(sink.out.ref("refined"), (slice(None), *sel), r16.cpu().numpy()),
                           (sink.out.ref("up"), (slice(None), *sel), u.half().cpu().numpy())]
            if sink.pairs:  # the merge's candidates: R as stored (float16), Y_up as computed
                r = r16.float()
                dtype = torch.uint8 if sink.labels_dtype == "uint8" else torch.int32
                labels = torch.stack([r.argmax(0), u.argmax(0)]).to(dtype).cpu().numpy()
                conf = torch.stack([r.amax(0), u.amax(0)]).half().cpu().numpy()
                writes += [(sink.out.ref("labels_pair"), (slice(None), *sel), labels.astype(sink.labels_dtype)),
                           (sink.out.ref("confidence_pair"), (slice(None), *sel), conf)]
        for y0, med in self.median.add(band.region.y0, error.half()):
            writes.append(self._error(y0, med))
        return writes

    def _error(self, y0: int, med: torch.Tensor) -> Write:
        own = self.block.region
        self.counts += torch.bincount(med.contiguous().view(torch.int16).to(torch.int32).reshape(-1) & 0xFFFF,
                                      minlength=_F16_BINS)
        return (self.sink.out.ref("error"), (slice(y0, y0 + med.shape[0]), slice(own.x0, own.x1)),
                med.cpu().numpy())

    def finish(self) -> list[Write]:
        self.median.finish()
        by, bx = self.block.index
        return [(self.sink.hist, (slice(by, by + 1), slice(bx, bx + 1), slice(None)),
                 self.counts.cpu().numpy()[None, None])]


@dataclass(frozen=True)
class MergeSink:
    """The pass after MagNet's last stage (a stage without tiles): ``where(E_med ≥ t, ·, ·)`` of the last stage's
    candidates, written as the masks by ``output`` (labels, their pyramid levels, confidence, probabilities)."""

    last: StageMap
    output: OutputSink

    def start(self, block: BlockContext) -> MergeWriter:
        return MergeWriter(self, block)


class MergeWriter:
    def __init__(self, sink: MergeSink, block: BlockContext) -> None:
        self.sink, self.block = sink, block
        self.t = sink.last.threshold()
        self.labels = LabelWriter(sink.output, block)
        names = ["error", "labels_pair", "confidence_pair"]
        if sink.output.probabilities is not None:
            names += ["refined", "up"]
        self.arrays = {n: block.open_array(sink.last.ref(n)) for n in names}

    def write(self, band: Band) -> list[Write]:
        out, dev = self.sink.output, self.block.device
        w = band.region
        rows, cols = slice(w.y0, w.y1), slice(w.x0, w.x1)

        def read(name: str) -> torch.Tensor:
            a = self.arrays[name]
            v = np.asarray(a[rows, cols] if a.ndim == 2 else a[:, rows, cols])
            return torch.from_numpy(v.astype(np.int32) if v.dtype == np.uint16 else v).to(dev)  # torch: no uint16

        take = read("error") >= self.t
        labels = torch.where(take, *read("labels_pair").unbind(0))
        writes = self.labels.labels(w, labels)
        if out.confidence is not None:
            writes.append((out.confidence, (rows, cols), torch.where(take, *read("confidence_pair").unbind(0))
                           .float().cpu().numpy()))
        if out.probabilities is not None:
            writes.append((out.probabilities, (slice(None), rows, cols),
                           torch.where(take[None], read("refined"), read("up")).cpu().numpy()))
        return writes

    def finish(self) -> list[Write]:
        return self.labels.finish()


__all__ = ["THRESHOLD", "MedianRows", "MergeSink", "PreviousMap", "PreviousRows", "RefineSink", "StageMap"]
