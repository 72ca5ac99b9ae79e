"""The contract every segmentation framework fulfils; the engine, the dispatcher and the workers know only this.

A framework (``segment``, ``magnet``, ``fctl``: one module each, registered in ``pipeline.frameworks.FRAMEWORKS``)
says, for an image:

- which **stages** it needs (``stages``): each a tile grid over one pyramid level, and what each tile reads
  besides its image window (``StagePlan.inputs``: the previous stage's map, context windows, …);
- what the **model** does with a tile's inputs (``load`` → a ``TileModel``, built once per worker);
- which tiles a stage runs (``selected_tiles``; all by default) and how a stage's blended probabilities become
  its **result** (``stage_result``; the blend itself by default): the map the next stage reads, or the output;
- on the driver, before anything runs, which **weights** it needs and what they say about the classes
  (``resolve``), and how its plan is built once they are staged for the workers (``build``).

A framework's instance is its plan: frozen, picklable, the same object on the driver and in every worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import dask.array as da
import numpy as np
import torch
import zarr

from models.info import CheckpointInfo
from pipeline.output.layout import ImageOutput
from pipeline.plan import TilingPlan, WeightsRef
from pipeline.pyramid import Pyramid
from pipeline.storage import zarr_store
from pipeline.tiling import TileGrid, Window
from pipeline.workers.predictor import DeviceConfig


@dataclass(frozen=True)
class ArrayRef:
    """One array a worker reads: ``<group_url>/<path>`` with named axes and its y/x shape."""

    group_url: str
    path: str
    axes: str
    shape_yx: tuple[int, int]
    storage_options: dict[str, Any] = field(default_factory=dict)
    value_range: tuple[float, float] | None = None

    def open(self) -> zarr.Array:
        """The array, read-only."""
        return zarr.open_array(store=zarr_store(self.group_url, self.storage_options, read_only=True), path=self.path,
                               mode="r")

    @classmethod
    def level(cls, pyramid: Pyramid, level: int) -> ArrayRef:
        """Level ``level`` of ``pyramid``, converted on read where it is read in place (its own dtype and axes)."""
        return cls(pyramid.url, pyramid.paths[level], pyramid.axes, tuple(pyramid.shapes[level]),
                   dict(pyramid.storage_options), pyramid.value_range if pyramid.in_place else None)


#: The array of a stage's maps group (``StagePlan.maps_url``) that holds its result, read by the next stage.
STAGE_MAP = "map"

#: How a worker opens an array it reads (cached per worker): ``open_array(ref) → zarr.Array``.
OpenArray = Callable[[ArrayRef], Any]


class TileInput(Protocol):
    """Something a stage's tiles read besides their image window (a framework's own kind of input)."""

    def read(self, open_array: OpenArray, image: ArrayRef, windows: list[Window]) -> np.ndarray:
        """The input of each of ``windows`` (tile windows of ``image``'s level), stacked ``(B, …)``."""


@dataclass(frozen=True)
class StagePlan:
    """One stage of one image: the level it reads, its tile grid, what else its tiles read, where they go.

    Stage ``index`` of the image's stages; its tiles write ``tiles_url`` (``(ny, nx, C, T, T)``, one chunk per tile)
    and its result (``Framework.stage_result``) becomes the map under ``maps_url`` the next stage may read.
    """

    index: int
    image: ArrayRef
    grid: TileGrid
    tiles_url: str
    maps_url: str
    num_classes: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[TileInput, ...] = ()


class TileModel(Protocol):
    """A framework's model on one worker, loaded once: ``(stage, tiles (B, 3, T, T) uint8, [input (B, …)]) →
    probabilities (B, C, T, T) float16``."""

    device: torch.device

    def __call__(self, stage: int, tiles: np.ndarray, inputs: Sequence[np.ndarray]) -> np.ndarray: ...


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


@dataclass(frozen=True)
class Resolution:
    """A framework's weights, read or seeded (``weights``: kind → bytes; ``"model"`` is the main one), what the
    main one says of itself (classes, colours, normalisation) and what else the framework read from them
    (``details``, e.g. the context factors an FCtL checkpoint was trained with)."""

    info: CheckpointInfo
    weights: dict[str, bytes]
    details: dict[str, Any] = field(default_factory=dict)


class Framework(ABC):
    """The contract (see the module docstring). Subclasses are frozen dataclasses holding their options and the
    ``WeightsRef`` of each weights file, registered by ``name`` in ``pipeline.frameworks.FRAMEWORKS``."""

    name: ClassVar[str]
    #: Whether the last stage's result is its own blend, so its bands can be stored while its tiles still run.
    streams_last_stage: ClassVar[bool] = True

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

    @abstractmethod
    def stages(self, pyramid: Pyramid, out: ImageOutput, tiling: TilingPlan, num_classes: int) -> list[StagePlan]:
        """The image's stages, in the order they run."""

    def selected_tiles(self, stages: list[StagePlan], s: int, scheduler: Any) -> tuple[tuple[int, int], ...] | None:
        """The tiles stage ``s`` runs (after stage ``s − 1``'s result exists); None: all of them."""
        return None

    def stage_result(self, stages: list[StagePlan], s: int, out: ImageOutput, blended: da.Array,
                     tiles: tuple[tuple[int, int], ...] | None, chunk: int, scheduler: Any) -> da.Array:
        """Stage ``s``'s result, lazy ``(C, H, W)`` float32, from its blended tiles ``blended`` (``tiles``: the
        ones that ran); the blend itself unless the framework merges it with something."""
        return blended

    # ---------------------------------------------------------------- worker

    @abstractmethod
    def load(self, read: Callable[[str], bytes], device: DeviceConfig) -> TileModel:
        """The model on this worker; ``read(url)`` fetches a weights file."""


__all__ = ["STAGE_MAP", "ArrayRef", "DeviceConfig", "Framework", "ModelSource", "OpenArray", "Resolution", "StagePlan",
           "TileInput", "TileModel"]
