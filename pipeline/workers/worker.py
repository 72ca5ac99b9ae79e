"""GPU-pinned block workers: each call runs one block's tiles, blends them on the device, writes its chunks.

``BlockWorker`` is a plain class (unit-testable without Ray); the dispatcher wraps it with ``ray.remote(num_gpus=…)``
so each actor holds its share of a GPU — a logical one on machines without CUDA, so placement is the same as on
a GPU cluster. An actor loads its framework's model once (``Framework.load``). For a block (``pipeline.blocks``)
it goes down the block's tile rows:

1. a reader thread reads each tile row's window once (``row_reader.LevelRows``: each image chunk decoded once) and
   whatever else the stage's tiles read (``StagePlan.inputs``), one row ahead of the device;
2. the row goes to the device in one copy; its tiles are views of it; the model runs ``batch`` tiles at a time;
3. each tile's probabilities, weighted by the blend window, are added into the block's running sums
   ``Σ w·p`` and ``Σ w`` on the device (``BlockBlend``), which hold only the rows still open (a tile's
   height), so memory depends on the block's width, not its height;
4. once no later tile row reaches a band of rows, the band is final: the stage's sink takes what it stores
   from it (labels and extras, or a stage map) to the host, ``ChunkRows`` gathers those into whole chunk rows,
   and a writer thread encodes and stores each chunk row.

Tiles are added in grid order, so a block's sums, and the output, are the same whatever the block size or the
worker. A call is idempotent: a retried block rewrites its own chunks with the same values.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
import zarr

from pipeline.blocks import Block, Tile
from pipeline.errors import ImageReadError
from pipeline.frameworks.base import Framework, StagePlan
from pipeline.plan import ArrayRef
from pipeline.row_reader import image_rows
from pipeline.retries import RETRY_LOG
from pipeline.storage import AuditStore, join, read_bytes, zarr_store
from pipeline.tiling import BlendWindow, window_2d
from pipeline.workers.device_blend import BlockBlend
from pipeline.workers.predictor import DeviceConfig
from pipeline.workers.sinks import BlockContext, BlockSink, Write


@dataclass(frozen=True)
class BlockTask:
    """One call to a worker: block ``block`` of stage ``stage``, running ``tiles`` (all that overlap it, in grid
    order; MagNet-Fast: the chosen ones) ``batch`` at a time, blended with ``window`` into ``sink``."""

    stage: StagePlan
    block: Block
    tiles: tuple[Tile, ...]
    sink: BlockSink
    owned: int  # grid tiles this block owns (``pipeline.blocks.owner``): what progress counts
    batch: int = 8
    window: BlendWindow = "gaussian"
    sigma_scale: float = 0.125
    chunk: int = 1024


@dataclass(frozen=True)
class BlockResult:
    stage: int
    block: tuple[int, int]
    tiles_run: int  # tiles the block ran (a tile on a block edge runs in each block it overlaps)
    owned: int
    seconds: float
    model_seconds: float
    megapixels: float  # tile pixels through the model
    worker: str
    cpu: dict[str, float] = field(default_factory=dict)  # CPU-seconds by phase: read, device, write
    retries: dict[str, int] = field(default_factory=dict)  # storage retries this process made since its last result, by URL


class ChunkRows:
    """A block's writes, band by band, assembled into whole chunk rows before they are stored.

    Bands end wherever the tile rows left rows final (``device_blend``), but each chunk is written once and
    whole (one writer, one PUT), so what a sink makes of the bands is gathered on the host, per array, until a
    chunk row of the block is complete; a band that is a whole chunk row passes through without a copy. Chunk
    rows start at multiples of ``chunk`` and end there or at the array's last row (blocks are chunk-aligned at
    every level they write). The row axis of every write is its second last; every write of an array spans the
    block's width at that array's level."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self._open: dict[tuple[str, str], list] = {}  # array → [ref, selection, buffer, first row, rows filled to]

    def add(self, writes: list[Write]) -> list[Write]:
        out: list[Write] = []
        for ref, sel, values in writes:
            if "y" not in ref.axes:  # not an array of the level (a block's own record): as it is
                out.append((ref, sel, values))
                continue
            key, rows = (ref.group_url, ref.path), sel[-2]
            y, k = rows.start, 0
            while y < rows.stop:
                entry = self._open.get(key)
                if entry is None:
                    cy0 = y // self.chunk * self.chunk
                    cy1 = min(ref.shape_yx[0], cy0 + self.chunk)
                    if y == cy0 and rows.stop - y >= cy1 - cy0:  # a whole chunk row: as it is
                        n = cy1 - cy0
                        out.append((ref, (*sel[:-2], slice(cy0, cy1), sel[-1]), values[..., k : k + n, :]))
                        y, k = y + n, k + n
                        continue
                    buf = np.empty((*values.shape[:-2], cy1 - cy0, values.shape[-1]), values.dtype)
                    entry = self._open[key] = [ref, sel, buf, cy0, cy0]
                _, _, buf, cy0, filled = entry
                if y != filled:
                    raise ValueError(f"rows {y}.. of {key} after rows up to {filled}: bands must come in order")
                n = min(rows.stop, cy0 + buf.shape[-2]) - y
                buf[..., y - cy0 : y - cy0 + n, :] = values[..., k : k + n, :]
                y, k = y + n, k + n
                entry[4] = y
                if y == cy0 + buf.shape[-2]:
                    out.append((ref, (*sel[:-2], slice(cy0, y), sel[-1]), buf))
                    del self._open[key]
        return out

    def finish(self) -> None:
        if self._open:
            raise RuntimeError(f"chunk rows left incomplete: {sorted(self._open)}")


def _libc_trim():
    """``malloc_trim(0)`` of glibc (None elsewhere): hands the heap's free pages back to the system."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def release_memory() -> None:
    """After a block: give back what the block's buffers left free in glibc's arenas (chunk rows decoded, encoded
    and freed by several threads fragment them), so a worker's memory does not creep up block after block."""
    if _TRIM is not None:
        _TRIM(0)


def _tick(cpu: dict[str, float], phase: str, since: float) -> float:
    """Add this thread's CPU-seconds since ``since`` to ``cpu[phase]``; the new mark."""
    now = time.thread_time()
    cpu[phase] += now - since
    return now


class _Writer:
    """Carries out a block's writes in its own thread(s), so encoding overlaps the device; errors re-raised. At
    most ``pending`` submissions wait or run at once: a submission beyond that waits for the oldest, so a writer
    slower than the device holds a few chunk rows, not the block's."""

    def __init__(self, open_writable, threads: int = 2, pending: int = 2) -> None:
        self.open = open_writable
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="gigaseg-write")
        self.futures: deque = deque()
        self.pending = pending
        self.cpu = 0.0
        self._lock = threading.Lock()

    def submit(self, writes) -> None:
        if not writes:
            return
        while len(self.futures) >= self.pending:
            self.futures.popleft().result()
        self.futures.append(self.pool.submit(self._write, writes))

    def _write(self, writes) -> None:
        c0 = time.thread_time()
        for ref, selection, values in writes:
            self.open(ref)[selection] = values
        with self._lock:
            self.cpu += time.thread_time() - c0

    def finish(self) -> float:
        try:
            for f in self.futures:
                f.result()
        finally:
            self.pool.shutdown(wait=True)
        return self.cpu


class BlockWorker:
    """Loads the framework's model once; ``run(task)`` runs, blends and writes one block.

    The weights are read from URLs (the job copies them into the output store), not passed through the
    driver's object store, so an actor restarted on another node after its driver-side references are
    gone still finds them.
    """

    def __init__(self, framework: Framework, storage_options: dict[str, Any], device: DeviceConfig = DeviceConfig(),
                 audit_dir: str | None = None):
        self.model = framework.load(lambda url: read_bytes(url, storage_options), device)
        # The actor can run two calls at once (max_concurrency=2, used when in_flight_per_worker is 2): one
        # block's reads and writes overlap the other's model work. By default it runs one: a block prefetches its
        # reads and writes behind its own model work, and a second block's buffers cost memory (memory_scaling). Model calls never overlap, so the device and torch's threads serve one batch at a time.
        self._model_lock = threading.Lock()
        self._arrays_lock = threading.Lock()
        self.audit_dir = audit_dir
        self.name = f"worker-{os.getpid()}"
        self._arrays: dict[tuple[str, str, bool], zarr.Array] = {}
        self._weights: dict[tuple, torch.Tensor] = {}

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
                array = zarr.open_array(store=store, path=path, mode="r+" if write else "r")
                # every chunk a block writes is whole and new: skip zarr's comparison of each chunk with the fill
                # value (2 ms of CPU per MP of labels, more than the codec), and never delete one
                self._arrays[key] = array.with_config({"write_empty_chunks": True}) if write else array
            return self._arrays[key]

    def open(self, ref: ArrayRef):
        """An array this worker reads, opened once per actor (the ``OpenArray`` tile inputs get)."""
        if ref.tiff_level is None:
            return self._array(ref.group_url, ref.path, ref.storage_options, write=False)
        key = (ref.group_url, f"tiff:{ref.tiff_level}", False)
        with self._arrays_lock:
            if key not in self._arrays:
                self._arrays[key] = ref.open()
            return self._arrays[key]

    def open_writable(self, ref: ArrayRef) -> zarr.Array:
        return self._array(ref.group_url, ref.path, ref.storage_options, write=True)

    def _blend_weights(self, task: BlockTask) -> torch.Tensor:
        key = (task.window, task.stage.grid.tile, task.sigma_scale)
        if key not in self._weights:
            w = window_2d(task.window, task.stage.grid.tile, task.sigma_scale)
            self._weights[key] = torch.from_numpy(np.array(w)).to(self.model.device)
        return self._weights[key]

    def run(self, task: BlockTask) -> BlockResult:
        try:
            return self._run(task)
        finally:
            release_memory()

    @torch.inference_mode()
    def _run(self, task: BlockTask) -> BlockResult:
        t0 = time.perf_counter()
        stage, grid, region = task.stage, task.stage.grid, task.block.region
        rows: dict[int, list[int]] = defaultdict(list)
        for iy, ix in task.tiles:
            rows[iy].append(ix)
        order = sorted(rows)
        cpu: dict[str, float] = defaultdict(float)
        model_seconds = 0.0
        writer = _Writer(self.open_writable)
        assembled = ChunkRows(task.chunk)
        blend_region = stage.blend_region(region)
        shared: dict = {}  # what the tile inputs make on the device and the sink may reuse (one block's)
        sink = task.sink.start(BlockContext(region, blend_region, task.block.index, self.open, self.model.device,
                                            shared))
        if not order:  # no tile here (a pass, or MagNet-Fast chose none): the sink writes the block, band by band
            try:
                blend = BlockBlend(stage.num_classes, blend_region, task.chunk, self.model.device)
                for band in blend.ready(blend_region.y1):
                    writer.submit(assembled.add(sink.write(band)))
                writer.submit(assembled.add(sink.finish()))
                assembled.finish()
            finally:
                cpu["write"] += writer.finish()
            return BlockResult(stage.index, task.block.index, 0, task.owned, time.perf_counter() - t0, 0.0, 0.0,
                               self.name, dict(cpu), RETRY_LOG.take())
        x_lo = grid.window(0, min(ix for ixs in rows.values() for ix in ixs)).x0
        x_hi = grid.window(0, max(ix for ixs in rows.values() for ix in ixs)).x1
        weights = self._blend_weights(task)
        blend = None  # made once this call holds the model: a call waiting behind another holds no sums yet
        reads = self._read_rows(task, order, rows, x_lo, x_hi, shared)
        try:
            for k, (iy, row, inputs, read_cpu) in enumerate(reads):
                cpu["read"] += read_cpu
                windows = [grid.window(iy, ix) for ix in rows[iy]]
                writes = []
                with self._model_lock:
                    t1, c = time.perf_counter(), time.thread_time()
                    if blend is None:
                        blend = BlockBlend(stage.num_classes, blend_region, grid.tile, self.model.device)
                    for band in blend.ready(windows[0].y0):  # rows above: final (MagNet-Fast: rows no tile reaches)
                        writes += assembled.add(sink.write(band))
                    c = _tick(cpu, "sink", c)
                    tiles = self._tiles(row, [w.x0 - x_lo for w in windows], grid.tile)
                    c = _tick(cpu, "h2d", c)
                    # the tiles' other inputs made on the device from what the reader brought (MagNet's ×2
                    # upsampling of the previous map, FCtL's context windows), their uploads included
                    extra = [source.to_device(host, windows, self.model.runner) for source, host in inputs]
                    c = _tick(cpu, "inputs", c)
                    for b in range(0, len(windows), task.batch):
                        probs = self.model(stage.index, tiles[b : b + task.batch],
                                           [inp[b : b + task.batch] for inp in extra])
                        c = _tick(cpu, "model", c)
                        for j in range(probs.shape[0]):
                            blend.add(windows[b + j], probs[j].float(), weights)
                        c = _tick(cpu, "blend", c)
                    next_top = grid.window(order[k + 1], 0).y0 if k + 1 < len(order) else blend_region.y1
                    for band in blend.ready(next_top):
                        writes += assembled.add(sink.write(band))
                    _tick(cpu, "sink", c)
                    model_seconds += time.perf_counter() - t1
                if writes:
                    writer.submit(writes)
            writer.submit(assembled.add(sink.finish()))
            assembled.finish()
        finally:
            reads.close()
            cpu["write"] += writer.finish()
        return BlockResult(stage.index, task.block.index, len(task.tiles), task.owned, time.perf_counter() - t0,
                           model_seconds, len(task.tiles) * grid.tile * grid.tile / 1e6, self.name, dict(cpu),
                           RETRY_LOG.take())

    def _tiles(self, row: np.ndarray, offsets: list[int], tile: int) -> torch.Tensor:
        """The row's tiles ``(n, C, T, T)`` uint8 on the device: the row window copied once, tiles cut there."""
        dev = self.model.runner.upload(row)
        return torch.stack([dev[:, :, o : o + tile] for o in offsets])

    def _read_rows(self, task: BlockTask, order: list[int], rows: dict[int, list[int]], x_lo: int, x_hi: int,
                   shared: dict):
        """``(iy, row window (C, T, x_hi − x_lo), inputs, CPU-seconds)`` per tile row, read one row ahead in a
        thread of its own (a generator; ``close()`` stops it)."""
        stage, grid = task.stage, task.stage.grid
        ref = stage.image
        out: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        done = object()

        def hand_over(item) -> None:
            """``item`` into the queue, unless the consumer stopped (it raised: the queue may stay full)."""
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            try:
                reader = image_rows(self.open(ref), ref.axes, ref.shape_yx, x_lo, x_hi, ref.value_range, ref.bands)
                sources = [source.open_rows(self.open, ref, grid.tile, x_lo, x_hi, shared) for source in stage.inputs]
                for iy in order:
                    if stop.is_set():
                        return
                    c0 = time.thread_time()
                    window = grid.window(iy, rows[iy][0])
                    try:
                        row = reader.rows(window.y0, window.y1)
                    except Exception as err:  # name the array and rows: the decoder's own message says neither
                        raise ImageReadError(
                            f"{join(ref.group_url, ref.path)}: cannot read window y {window.y0}:{window.y1}, x "
                            f"{x_lo}:{x_hi} (tile row {iy}, {len(rows[iy])} tile(s)): {type(err).__name__}: {err}"
                        ) from err
                    windows = [grid.window(iy, ix) for ix in rows[iy]]
                    inputs = [(source, source.read(windows)) for source in sources]
                    hand_over((iy, row, inputs, time.thread_time() - c0))
                hand_over(done)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
                hand_over(err)

        thread = threading.Thread(target=produce, name="gigaseg-read", daemon=True)
        thread.start()
        try:
            while (item := out.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


__all__ = ["BlockResult", "BlockTask", "BlockWorker"]
