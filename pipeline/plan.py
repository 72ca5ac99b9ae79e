"""A job as plain typed objects: what ``jobs.plan.job_plan`` builds from a validated spec, in one place, and what
the engine, the dispatcher and the workers read. Each plan validates itself where it is built
(``__post_init__``); run-time handles (Ray, a Dask client) are never part of a plan, they are arguments.

    JobPlan
      inputs: InputPlan        where the images are, which, how their values map to 0..255
      output: OutputPlan       where the masks go, extras, resume or overwrite (paths: ``layout``)
      tiling: TilingPlan       the tile grid of every stage, the blend window, the chunking
      pool: PoolPlan           the workers: how many, their GPUs, CPUs, threads, precision, placement
      failure: FailurePlan     retries, fail fast or go on
      classes: ClassTable      the class names and colours of the masks
      framework: Framework     segment, MagNet or FCtL (``pipeline.frameworks``): stages, tile inputs, weights
      fingerprint              what fixes the output: a resumed image must have been written with the same
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import zarr

from pipeline.output.layout import JobLayout
from pipeline.sources.convert import ValueRange, is_per_band
from pipeline.sources.pixels import LazyLevel
from pipeline.sources.slides import SlideLevel
from pipeline.storage import zarr_store
from pipeline.tiling import BlendWindow, TileGrid

if TYPE_CHECKING:  # the framework contract imports this module for its plans
    from pipeline.frameworks.base import Framework

Precision = Literal["auto", "fp32", "bf16", "fp16"]

#: A block's width and height at most (px), and the device memory its running sums may take (``block_side``).
MAX_BLOCK_WIDTH = 8192
MAX_BLOCK_HEIGHT = 32768
BLOCK_BYTES = 1 << 30
Extra = Literal["confidence", "probabilities"]


@dataclass(frozen=True)
class ArrayRef:
    """One array a worker reads or writes: ``<group_url>/<path>`` with named axes and its y/x shape; an image level
    is read as uint8 by ``convert.to_uint8`` with its ``value_range`` and ``bands`` (RGB without ``bands``, else
    those channels: ``pipeline.sources.convert``). ``tiff_level``: the array
    is that level of the TIFF at ``group_url`` (read through tifffile's Zarr store), not a Zarr array; with
    ``slide`` that level of the whole-slide image at ``group_url``, read through OpenSlide (``SlideLevel``)."""

    group_url: str
    path: str
    axes: str
    shape_yx: tuple[int, int]
    storage_options: dict[str, Any] = field(default_factory=dict)
    value_range: ValueRange | None = None
    tiff_level: int | None = None
    slide: bool = False
    bands: tuple[int, ...] | None = None

    def open(self):
        """The array, read-only (array-like for a TIFF or slide level: ``shape``, ``chunks``, slicing)."""
        if self.slide:
            return SlideLevel(self.group_url, self.tiff_level or 0)
        if self.tiff_level is not None:
            return LazyLevel(self.group_url, self.storage_options, self.tiff_level)
        return zarr.open_array(store=zarr_store(self.group_url, self.storage_options, read_only=True), path=self.path,
                               mode="r")


@dataclass(frozen=True)
class InputPlan:
    url: str
    patterns: tuple[str, ...] = ("**/*",)
    storage_options: dict[str, Any] = field(default_factory=dict)
    value_range: ValueRange | None = None  # mapped linearly to 0..255: one pair, or one per band
    bands: tuple[int, ...] | None = None  # the source channels the model sees, in order; None: RGB

    def __post_init__(self) -> None:
        if not self.patterns:
            raise ValueError("InputPlan.patterns: at least one glob, e.g. '**/*'")
        ranges = self.value_range if is_per_band(self.value_range) else [self.value_range]
        if any(r is not None and not r[0] < r[1] for r in ranges):
            raise ValueError(f"InputPlan.value_range must be (low, high) with low < high, got {self.value_range}")
        if is_per_band(self.value_range) and (self.bands is None or len(self.bands) != len(self.value_range)):
            raise ValueError(f"InputPlan.value_range: {len(self.value_range)} ranges need as many bands, got "
                             f"{self.bands}")
        if self.bands is not None and (not self.bands or min(self.bands) < 0):
            raise ValueError(f"InputPlan.bands must be 0-based channel indices, got {self.bands}")


@dataclass(frozen=True)
class OutputPlan:
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    extras: tuple[Extra, ...] = ()
    if_exists: Literal["resume", "overwrite"] = "resume"
    label_name: str = "segmentation"

    def __post_init__(self) -> None:
        bad = sorted(set(self.extras) - {"confidence", "probabilities"})
        if bad:
            raise ValueError(f"OutputPlan.extras: unknown {bad}; valid: confidence, probabilities")
        if self.if_exists not in ("resume", "overwrite"):
            raise ValueError(f"OutputPlan.if_exists must be resume or overwrite, got {self.if_exists!r}")

    @property
    def layout(self) -> JobLayout:
        return JobLayout(self.url, dict(self.storage_options))


@dataclass(frozen=True)
class TilingPlan:
    """The tile grid of every stage (``pipeline.tiling``), the blend window and the chunking of the outputs."""

    tile: int = 512
    overlap: int = 128
    margin: int = 64
    offset: tuple[int, int] = (0, 0)
    batch: int = 8
    tiles_per_call: int | None = None  # about this many tiles per worker call (a block); None: ``block_side``
    blend: BlendWindow = "gaussian"
    sigma_scale: float = 0.125
    chunk: int = 1024
    image_chunk: int = 512

    def __post_init__(self) -> None:
        TileGrid(self.tile, self.tile, self.tile, self.overlap, *self.offset, margin=self.margin)  # checks them
        if self.batch < 1 or (self.tiles_per_call is not None and self.tiles_per_call < 1):
            raise ValueError(f"TilingPlan: batch ({self.batch}) and tiles_per_call ({self.tiles_per_call}) must be ≥ 1")
        if self.blend not in ("gaussian", "cosine", "constant"):
            raise ValueError(f"TilingPlan.blend: unknown window {self.blend!r}; valid: gaussian, cosine, constant")
        if self.chunk < 1 or self.image_chunk < 1:
            raise ValueError(f"TilingPlan: chunk ({self.chunk}) and image_chunk ({self.image_chunk}) must be ≥ 1")

    def grid(self, height: int, width: int) -> TileGrid:
        """The tile grid of a ``height × width`` level."""
        return TileGrid(height, width, self.tile, self.overlap, *self.offset, margin=self.margin)

    def block_side(self, num_classes: int) -> tuple[int, int]:
        """A block's ``(height, width)`` (``pipeline.blocks``), multiples of ``chunk``. For ``tiles_per_call`` N: a
        square of about √N tiles a side (``⌊√N·step⌋``). By default tall and narrow: a worker's memory for a block
        (the running sums' ring of ``tile`` rows, ``device_blend``; the rows read and written around it) grows
        with its width, not its height, so the width is capped at ``MAX_BLOCK_WIDTH`` px (and by ``BLOCK_BYTES``
        of ``(C + 1)`` float32 channels of ``tile`` rows) and every worker holds the same whatever the image's size,
        while the height goes to ``MAX_BLOCK_HEIGHT``: a block runs the tiles on its edges (about ``tile / side``
        more per axis cut), and a tall block cuts one axis only. A level up to 8192 px wide is one block wide."""
        step = self.tile - self.overlap
        if self.tiles_per_call is not None:
            side = max(self.chunk, int(self.tiles_per_call ** 0.5 * step) // self.chunk * self.chunk)
            return side, side
        width = min(MAX_BLOCK_WIDTH, BLOCK_BYTES // ((num_classes + 1) * self.tile * 4))
        width = max(self.chunk, width // self.chunk * self.chunk)
        return max(width, MAX_BLOCK_HEIGHT // self.chunk * self.chunk), width


@dataclass(frozen=True)
class PoolPlan:
    """The Ray actors that run tiles: ``workers`` of them, each holding ``gpus_per_worker`` GPUs."""

    workers: int = 2
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    torch_threads: int = 1
    in_flight_per_worker: int = 1
    precision: Precision = "auto"
    placement: Literal["anywhere", "driver"] = "anywhere"  # "driver": prefer the driver's node (local data)
    audit_dir: str | None = None  # log every chunk key each worker writes (``--audit-writes``)
    unavailable_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.workers < 1 or self.in_flight_per_worker < 1 or self.torch_threads < 1:
            raise ValueError(f"PoolPlan: workers, in_flight_per_worker and torch_threads must be ≥ 1: {self}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError(f"PoolPlan: gpus_per_worker ≥ 0 and cpus_per_worker > 0 needed: {self}")
        if self.placement not in ("anywhere", "driver"):
            raise ValueError(f"PoolPlan.placement must be 'anywhere' or 'driver', got {self.placement!r}")


@dataclass(frozen=True)
class FailurePlan:
    fail_fast: bool = False
    tile_retries: int = 2

    def __post_init__(self) -> None:
        if self.tile_retries < 0:
            raise ValueError(f"FailurePlan.tile_retries must be ≥ 0, got {self.tile_retries}")


@dataclass(frozen=True)
class ClassTable:
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if not self.names or len(self.colors) != len(self.names) or len(set(self.names)) != len(self.names):
            raise ValueError(f"ClassTable: distinct names and one colour each needed, got {self.names} / {self.colors}")

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class WeightsRef:
    """Weights the workers load: a file in the output's work area, named by its content (``JobLayout``)."""

    url: str
    sha256: str


@dataclass(frozen=True)
class JobPlan:
    inputs: InputPlan
    output: OutputPlan
    tiling: TilingPlan
    pool: PoolPlan
    failure: FailurePlan
    classes: ClassTable
    framework: Framework
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


__all__ = ["ArrayRef", "ClassTable", "Extra", "FailurePlan", "InputPlan", "JobPlan", "OutputPlan", "PoolPlan", "Precision",
           "TilingPlan", "WeightsRef"]
