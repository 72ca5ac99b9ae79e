"""The contract every segmentation framework fulfils; the engine, the dispatcher and the workers know only this.

A framework (``segment``, ``magnet``, ``fctl``: one module each, registered in ``pipeline.frameworks.FRAMEWORKS``)
says, for an image:

- which **stages** it needs (``stages``): each a tile grid over one pyramid level, and what each tile reads
  besides its image window (``StagePlan.inputs``: the previous stage's map, context windows, …);
- what the **model** does with a tile's inputs (``load`` → a ``TileModel``, built once per worker);
- which tiles a stage runs (``selected_tiles``; all by default), what the blocks of a stage write once their
  tiles are blended on a worker (``stage_sink``: the output, a map the next stage reads, or what the framework
  merges later), and what the driver does once every block of a stage is in (``finish_stage``; nothing by
  default, MagNet's merge for MagNet);
- on the driver, before anything runs, which **weights** it needs and what they say about the classes
  (``resolve``), and how its plan is built once they are staged for the workers (``build``).

A framework's instance is its plan: frozen, picklable, the same object on the driver and in every worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from models.card import ModelCard
from models.info import CheckpointInfo
from pipeline.output.arrays import OutputArrays
from pipeline.output.layout import ImageOutput
from pipeline.plan import ArrayRef, TilingPlan, WeightsRef
from pipeline.pyramid import Pyramid
from pipeline.tiling import TileGrid, Window
from pipeline.workers.predictor import DeviceConfig
from pipeline.workers.sinks import BlockSink, OutputSink

#: The array of a stage's maps group (``StagePlan.maps_url``) that holds its result, read by the next stage.
STAGE_MAP = "map"

#: How a worker opens an array it reads (cached per worker): ``open_array(ref) → zarr.Array``.
OpenArray = Callable[[ArrayRef], Any]


class RowInput(Protocol):
    """One block's reader of a tile input, a row of tiles at a time, top to bottom."""

    def read(self, windows: list[Window]) -> Any:
        """On the host (the worker's reader thread, one row ahead of the device): what the tiles ``windows`` (one
        tile row, left to right) need, decoded."""

    def to_device(self, host: Any, windows: list[Window], runner: Any) -> torch.Tensor:
        """``read``'s result as the tiles' inputs ``(B, …)`` on ``runner``'s device (the model's thread)."""


class TileInput(Protocol):
    """Something a stage's tiles read besides their image window (a framework's own kind of input)."""

    def open_rows(self, open_array: OpenArray, image: ArrayRef, tile: int, x_lo: int, x_hi: int,
                  shared: dict) -> RowInput:
        """The reader of this input for one block whose ``tile``-px tile windows span columns ``[x_lo, x_hi)`` of
        ``image``'s level; ``shared`` is the block's (``sinks.BlockContext.shared``): what the reader makes on the
        device that the block's sink can use too (MagNet's upsampled map)."""


@dataclass(frozen=True)
class StagePlan:
    """One stage of one image: the level it reads, its tile grid, what else its tiles read, where they go.

    Stage ``index`` of the image's stages; the maps it leaves for the next stage (and a framework's intermediate
    arrays) live in the group at ``maps_url``. A block blends the tiles over its region grown by ``halo`` px
    (within the level), for a sink that needs a neighbourhood of every pixel it writes (MagNet's median). A
    stage without ``tiles`` is a pass over what earlier stages stored: its blocks run no tile and their sink
    reads what it writes from storage.
    """

    index: int
    image: ArrayRef
    grid: TileGrid
    maps_url: str
    num_classes: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[TileInput, ...] = ()
    halo: int = 0
    tiles: bool = True

    def blend_region(self, region: Window) -> Window:
        """``region`` grown by ``halo`` on every side, clipped to the level."""
        h = self.halo
        return Window(region.y0 - h, region.x0 - h, region.h + 2 * h, region.w + 2 * h).clip(self.grid.height,
                                                                                                self.grid.width)


class TileModel(Protocol):
    """A framework's model on one worker, loaded once: ``(stage, tiles (B, C, T, T) uint8 on the device, [input
    (B, …) on the device]) → probabilities (B, C, T, T) float32 on the device``; ``runner`` is its device
    (uploads, autocast)."""

    device: torch.device
    runner: Any

    def __call__(self, stage: int, tiles: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor: ...


@dataclass(frozen=True)
class ModelSource:
    """What the spec says of the model, before any weights are read: the checkpoint's bytes (None: a seeded
    model of ``architecture``, ``width``, ``seed`` for ``class_names``), and the options to read more weights."""

    checkpoint: bytes | None
    checkpoint_url: str | None
    architecture: str
    class_names: tuple[str, ...]
    width: int = 64
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None  # "package.module:function" building the module the checkpoint's weights fit
    card: dict[str, Any] = field(default_factory=dict)  # model-card fields the spec gives (``models.card.parse_card``)
    bands: tuple[int, ...] | None = None  # the source channels the job feeds (``inputs.bands``); None: RGB
    any_bands: bool = False  # no job (``gigaseg inspect``): the model's own band count is not checked against one

    @property
    def in_channels(self) -> int:
        """The channels the job feeds the model: 3 (RGB) or one per selected band."""
        return 3 if self.bands is None else len(self.bands)

    def feeds(self) -> str:
        """The job's input bands in words, for errors: ``3 (RGB: inputs.bands is not set)``."""
        if self.bands is None:
            return "3 bands (red, green, blue: inputs.bands is not set)"
        return f"{len(self.bands)} band(s) (inputs.bands: {list(self.bands)})"


@dataclass(frozen=True)
class Resolution:
    """A framework's weights, read or seeded (``weights``: kind → bytes; ``"model"`` is the main one), what the
    main one says of itself (``info`` for a gigaseg checkpoint: its architecture, classes, colours,
    normalisation; ``card`` for any model, ``models.card``) and what else the framework read from them
    (``details``, e.g. the segmenter's runtime, the context factors an FCtL checkpoint was trained with)."""

    info: CheckpointInfo | None
    weights: dict[str, bytes]
    details: dict[str, Any] = field(default_factory=dict)
    card: ModelCard | None = None

    @property
    def num_classes(self) -> int:
        return self.card.num_classes if self.card is not None else self.info.config.num_classes


class Framework(ABC):
    """The contract (see the module docstring). Subclasses are frozen dataclasses holding their options and the
    ``WeightsRef`` of each weights file, registered by ``name`` in ``pipeline.frameworks.FRAMEWORKS``."""

    name: ClassVar[str]

    # ---------------------------------------------------------------- driver, before the job

    @classmethod
    @abstractmethod
    def resolve(cls, options: Mapping[str, Any], source: ModelSource) -> Resolution:
        """Read (or seed) the weights this framework needs; ``SpecError`` naming the field when they do not fit."""

    @classmethod
    @abstractmethod
    def build(cls, options: Mapping[str, Any], weights: Mapping[str, WeightsRef], resolution: Resolution) -> Framework:
        """The plan, once ``resolve``'s weights are where the workers read them (``weights``: kind → ref)."""

    def fingerprint(self) -> dict[str, Any]:
        """What of this framework fixes an image's output (weights by content, options), for resuming."""
        return {"framework": self.name}

    # ---------------------------------------------------------------- driver, per image

    def levels(self, n_levels: int) -> set[int]:
        """The pyramid levels this framework's tiles read, of an image with ``n_levels`` (level 0 only by default:
        coarser levels are built only for frameworks that read them)."""
        return {0}

    @abstractmethod
    def stages(self, pyramid: Pyramid, out: ImageOutput, tiling: TilingPlan, num_classes: int) -> list[StagePlan]:
        """The image's stages, in the order they run."""

    def prepare_stage(self, stages: list[StagePlan], s: int, scheduler: Any) -> None:
        """The driver's work before stage ``s``'s blocks run (after stage ``s − 1``'s result exists; again when a
        job resumes, so it must be idempotent): nothing by default (MagNet resizes the image of a stage at a size
        no pyramid level has)."""

    def selected_tiles(self, stages: list[StagePlan], s: int, scheduler: Any) -> tuple[tuple[int, int], ...] | None:
        """The tiles stage ``s`` runs (after stage ``s − 1``'s result exists); None: all of them."""
        return None

    def stage_sink(self, stages: list[StagePlan], s: int, out: ImageOutput, outputs: OutputArrays | None,
                   chunk: int, fresh: bool, extras: tuple[str, ...] = (), side: int = 0) -> BlockSink:
        """What stage ``s``'s blocks write (``pipeline.workers.sinks``): by default, for the last stage, the output
        (``outputs``; ``extras`` are the ones asked for, known before the last stage). The arrays a sink writes are
        created here (``fresh``: anew; else opened, resuming); the stage's blocks are ``side`` px a side
        (``pipeline.blocks.plan_blocks``)."""
        if s != len(stages) - 1:
            raise NotImplementedError(f"{self.name} has one stage; stage {s} has no sink")
        return output_sink(outputs, out)

    def finish_stage(self, stages: list[StagePlan], s: int, out: ImageOutput, outputs: OutputArrays | None,
                     tiles: tuple[tuple[int, int], ...] | None, chunk: int, scheduler: Any) -> None:
        """Stage ``s``'s work on the driver once all its blocks are written (``tiles``: the ones that ran;
        ``outputs`` given for the last stage); nothing by default."""

    # ---------------------------------------------------------------- worker

    @abstractmethod
    def load(self, read: Callable[[str], bytes], device: DeviceConfig) -> TileModel:
        """The model on this worker; ``read(url)`` fetches a weights file."""


def output_sink(outputs: OutputArrays, out: ImageOutput) -> OutputSink:
    """The sink that writes a stage's blend as the image's masks (level-0 labels, the extras asked for)."""
    labels = outputs.labels[0]
    pyramid = tuple(outputs.ref(a, out) for a in outputs.labels[1 : 1 + outputs.block_levels])
    return OutputSink(outputs.ref(labels, out), str(labels.dtype), outputs.ref(outputs.confidence, out),
                      outputs.ref(outputs.probabilities, out), pyramid, outputs.nodata)


__all__ = ["STAGE_MAP", "ArrayRef", "DeviceConfig", "Framework", "ModelSource", "OpenArray", "Resolution", "RowInput",
           "StagePlan", "TileInput", "TileModel", "output_sink"]
