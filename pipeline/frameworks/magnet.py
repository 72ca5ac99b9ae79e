"""Framework ``magnet``: MagNet's progressive refinement (Huynh et al., CVPR 2021; github VinAIResearch/MagNet),
one stage per scale, coarse to fine, then a pass that writes the masks.

Stage ``s`` covers pyramid level ``L_s = scales − 1 − s`` (or, for ``scales`` given as fractions of the image's
size, that size: ``magnet_scales``). Stage 0 is plain tiled segmentation; its blend is the
map ``Y₀``. A stage-s tile (s ≥ 1) also reads the stage-(s−1) map over its footprint, upsampled ×2, and its model
gives ``R = softmax(refiner(softmax(segmenter(x)), Y_up))``; the stage's result merges ``R`` into ``Y_up`` where
the median-filtered error score ranks among the image's top ``replace``: ``Y_s = where(E_med ≥ t, R, Y_up)``.
The blocks do the per-pixel work on their devices (``magnet_blocks``: the median, the histogram of ``E_med``,
what the merge needs); once a stage's blocks are in, the driver sums their histograms into the image-wide
threshold ``t`` (``finish_stage``), which the next stage's tiles apply as they read the map, and the last pass
(a stage with no tiles, ``MergeSink``) as it writes the masks. MagNet-Fast (``patches``) runs each refinement
stage only on the tiles whose footprint is most uncertain in the previous map.

The refiner reads only the segmenter's probabilities, so any segmenter a ``segment`` job runs works here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import numpy as np
import torch
import zarr

from models.checkpoint import read_info
from models.errors import CheckpointError
from models.magnet import load_refiner, seeded_refiner
from pipeline.errors import SpecError, UnsupportedImageError
from pipeline.frameworks import magnet_maps as maps
from pipeline.frameworks import magnet_reference as reference
from pipeline.frameworks import magnet_scales as scales
from pipeline.frameworks.base import Framework, ModelSource, Resolution, StagePlan, output_sink
from pipeline.frameworks.magnet_blocks import THRESHOLD, MergeSink, PreviousMap, RefineSink, StageMap
from pipeline.frameworks.magnet_maps import MagnetConfig
from pipeline.frameworks.segment import GIGASEG, image_stage, runtime_of
from pipeline.frameworks.segmenters import SegmenterRuntime, load_segmenter, resolve_segmenter
from pipeline.output.arrays import OutputArrays, create_map
from pipeline.output.layout import ImageOutput
from pipeline.blocks import plan_blocks
from pipeline.plan import ArrayRef, TilingPlan, WeightsRef
from pipeline.pyramid import Pyramid
from pipeline.storage import read_bytes, zarr_store
from pipeline.tiling import Window
from pipeline.workers.predictor import DeviceConfig
from pipeline.workers.sinks import BlockSink, MapSink


class MagnetModel:
    """``TileModel``: the segmenter alone at stage 0 (on the image alone when its input is ``WholeImage``),
    segmenter and refiner after: stage ``s`` runs ``refiners[min(s, n) − 1]`` (one for all stages, or one each)."""

    def __init__(self, predictor, refiner: torch.nn.Module | Sequence[torch.nn.Module], size_multiple: int = 32) -> None:
        self.predictor, self.runner = predictor, predictor.runner
        refiners = [refiner] if isinstance(refiner, torch.nn.Module) else list(refiner)
        self.refiners = [self.runner.prepare(r) for r in refiners]
        self.refiner = self.refiners[0]
        self.device = predictor.device
        self.size_multiple = size_multiple

    @torch.inference_mode()
    def __call__(self, stage: int, tiles: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if not stage:
            return whole_pass(self.predictor, tiles, inputs[0], self.size_multiple) if inputs else \
                self.predictor.probabilities(tiles)
        (previous_up,) = inputs
        refiner = self.refiners[min(stage, len(self.refiners)) - 1]
        fine = self.predictor.probabilities(tiles)  # softmax(segmenter(x)), whatever runs the segmenter
        with self.runner.autocast():
            return torch.softmax(refiner(fine, self.runner.tensor(previous_up)).float(), dim=1)


def whole_pass(predictor, tiles: torch.Tensor, extents, multiple: int) -> torch.Tensor:
    """Stage 0 in one pass (``stage0: whole``): for each tile, the segmenter on the image inside it alone (rows
    ``y:y+h``, columns ``x:x+w`` of ``extents``), extended to a multiple of the model's size multiple with the
    tile's own mirrored margin; its probabilities fill the tile, edges replicated past the image (those pixels are
    not kept). A tile without room for that runs whole. ``(B, 3, T, T) → (B, C, T, T)``."""
    out = []
    for tile, (y, x, h, w) in zip(tiles, np.asarray(extents).tolist(), strict=True):
        hh, ww = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        t = tile.shape[-1]
        if y < 0 or x < 0 or y + hh > t or x + ww > t:
            out.append(predictor.probabilities(tile[None]))
            continue
        p = predictor.probabilities(tile[None, :, y : y + hh, x : x + ww])[..., :h, :w]
        out.append(torch.nn.functional.pad(p, (x, t - x - w, y, t - y - h), mode="replicate"))
    return torch.cat(out)


@dataclass(frozen=True)
class Magnet(Framework):
    model: WeightsRef
    refiner: WeightsRef
    config: MagnetConfig
    runtime: SegmenterRuntime | None = None  # the segmenter's, for a model you bring; None: a gigaseg checkpoint
    more_refiners: tuple[WeightsRef, ...] = ()  # one refiner per stage: stages 2, 3, … (``refiner`` refines stage 1)

    name: ClassVar[str] = "magnet"

    @classmethod
    def resolve(cls, options: Mapping[str, Any], source: ModelSource) -> Resolution:
        resolution = resolve_segmenter(source, cls.name)
        num_classes = resolution.num_classes
        urls = options.get("refiner")
        urls = [urls] if isinstance(urls, str) else urls
        if urls is None:
            refiners = [seeded_refiner(num_classes, seed=options["refiner_seed"], width=options["refiner_width"])]
        else:
            refiners = []
            for url in urls:
                try:
                    refiners.append(read_bytes(url, source.storage_options))
                    load_refiner(refiners[-1], num_classes)  # fail now, naming the field, not in every worker
                except FileNotFoundError:
                    raise SpecError("model.magnet.refiner", [f"model.magnet.refiner: {url} does not exist"]) from None
                except CheckpointError as err:
                    raise SpecError("model.magnet.refiner", [f"model.magnet.refiner: {url}: {err}"]) from None
        weights = {"refiner": refiners[0], **{f"refiner-{i + 1}": r for i, r in enumerate(refiners) if i}}
        return Resolution(resolution.info, {**resolution.weights, **weights}, resolution.details, resolution.card)

    @classmethod
    def build(cls, options: Mapping[str, Any], weights: Mapping[str, WeightsRef], resolution: Resolution) -> Magnet:
        config = MagnetConfig(scales=options["scales"], replace=options["replace"], median=options["median"],
                              patches=options["patches"], **reference.options_of(dict(options)))
        more = tuple(weights[k] for k in sorted((k for k in weights if k.startswith("refiner-")),
                                                key=lambda k: int(k.split("-")[1])))
        return cls(weights["model"], weights["refiner"], config, runtime_of(resolution), more)

    def fingerprint(self) -> dict[str, Any]:
        c = self.config
        procedure = {k: getattr(c, k) for k in reference.OPTIONS  # only where not gigaseg's: old outputs resume
                     if getattr(c, k) != MagnetConfig.__dataclass_fields__[k].default}
        more = {"refiners": [r.sha256 for r in self.more_refiners]} if self.more_refiners else {}
        # maps 2: the median and the merge on the workers, confidence as the maps store it (float16)
        return {"framework": self.name, "maps": 2, "checkpoint": self.model.sha256, "refiner": self.refiner.sha256,
                "scales": c.scales if isinstance(c.scales, int) else list(c.scales), "replace": c.replace, "median": c.median, "patches": c.patches,
                **(self.runtime.fingerprint() if self.runtime else {}), **procedure, **more}

    def levels(self, n_levels: int) -> set[int]:
        if not isinstance(self.config.scales, int):  # fractions: the nearest level at least as fine there is
            return {min(lv, n_levels - 1) for lv in self.config.levels()}
        return {lv for lv in self.config.levels() if lv < n_levels}  # too few: ``stages`` says so

    def stages(self, pyramid: Pyramid, out: ImageOutput, tiling: TilingPlan, num_classes: int) -> list[StagePlan]:
        """One stage per scale (a refinement stage blends over a halo of the median's reach), then the pass that
        writes the masks (level 0, no tiles)."""
        levels = self.config.levels()
        if isinstance(self.config.scales, int) and max(levels) >= pyramid.n_levels:
            raise UnsupportedImageError(
                f"{pyramid.url}: MagNet with {len(levels)} scales needs {len(levels)} pyramid levels but the image "
                f"({pyramid.shapes[0][0]}×{pyramid.shapes[0][1]}) has {pyramid.n_levels}; lower model.magnet.scales "
                "or give it as fractions of the image's size (e.g. [0.25, 0.5, 1.0]), read from the levels there are")
        plans: list[StagePlan] = []
        crop = reference.RoiPreviousMap if self.config.crop == "roi_align" else PreviousMap
        fixed = self.runtime is not None and self.runtime.fixed_size is not None  # an ONNX model of one size
        for s, scale in enumerate(scales.stage_scales(self.config, pyramid)):
            if min(scale.shape) < 1:
                raise UnsupportedImageError(
                    f"{pyramid.url}: model.magnet.scales[{s}] = {self.config.scales[s]} of the image "
                    f"({pyramid.shapes[0][0]}×{pyramid.shapes[0][1]}) is {scale.shape[0]}×{scale.shape[1]} px; "
                    "give fractions of at least 1 px")
            inputs = (crop(stage_map(plans[-1])),) if s else ()
            stage = image_stage(s, pyramid, scale.level, out, tiling, num_classes, inputs)
            if not scale.exact:
                stage = scales.ResizedStage(**{f.name: getattr(stage, f.name) for f in fields(stage)},
                                            source=stage.image, image_chunk=tiling.image_chunk)
                stage = replace(stage, image=scales.resized_image_ref(pyramid, stage.maps_url, scale.shape,
                                                                      out.storage_options),
                                grid=tiling.grid(*scale.shape))
            if s:
                view = reference.view_of(self.config, tiling.tile)
                halo = self.config.median // 2 if view is None else \
                    reference.view_halo(scale.shape, view, self.config.median)
                stage = replace(stage, halo=halo)
            elif self.config.stage0 == "whole" and not fixed and reference.fits_one_tile(stage.grid, scale.shape):
                stage = replace(stage, inputs=(reference.WholeImage(),))
            plans.append(stage)
        n = len(plans)
        plans.append(replace(plans[-1], index=n, maps_url=out.maps_url(n), inputs=(), halo=0, tiles=False))
        return plans

    def prepare_stage(self, stages: list[StagePlan], s: int, scheduler: Any) -> None:
        """A stage at a size no pyramid level has: its resized image, written before its tiles run
        (``magnet_scales.make_image``; kept when a resumed job finds it complete)."""
        stage = stages[s]
        if isinstance(stage, scales.ResizedStage) and stage.tiles:
            scales.make_image(stage, stage.image_chunk, scheduler)

    def selected_tiles(self, stages: list[StagePlan], s: int, scheduler: Any) -> tuple[tuple[int, int], ...] | None:
        """MagNet-Fast: the tiles stage ``s`` runs, the most uncertain footprints of stage ``s − 1``'s (complete)
        map; None when every tile runs. The same map always gives the same tiles, so a resumed job agrees."""
        stage = stages[s]
        if not s or self.config.patches is None:
            return None
        n = self.config.tile_count(len(stage.grid))
        if n >= len(stage.grid):
            return None
        previous = stage_map(stages[s - 1])
        scores = maps.tile_uncertainty(MapWindows(previous), stage.grid, scheduler, previous.shape_yx)
        # the reference's code sorts ascending and takes the first: the least uncertain tiles
        return maps.select_tiles(-scores if self.config.patch_choice == "least_uncertain" else scores, n)

    def stage_sink(self, stages: list[StagePlan], s: int, out: ImageOutput, outputs: OutputArrays | None,
                   chunk: int, fresh: bool, extras: tuple[str, ...] = (), side: int = 0) -> BlockSink:
        """Stage 0 writes its blend as the map stage 1 reads; a refinement stage what ``magnet_blocks.RefineSink``
        says; the last pass the masks (``MergeSink``). The arrays are created here."""
        stage, so = stages[s], out.storage_options
        c, h, w = stage.num_classes, stage.grid.height, stage.grid.width
        if not stage.tiles:
            return MergeSink(stage_map(stages[s - 1]), output_sink(outputs, out))
        if not s:
            return MapSink(stage_map(stage).ref(create_map(stage.maps_url, "map", (c, h, w), chunk, so, fresh).path))
        last = s == len(stages) - 2
        keep_maps = not last or "probabilities" in extras
        this = stage_map(stage)
        create_map(stage.maps_url, "error", (h, w), chunk, so, fresh)
        if keep_maps:
            for name in ("refined", "up"):
                create_map(stage.maps_url, name, (c, h, w), chunk, so, fresh)
        labels_dtype = "uint8" if c <= 256 else "uint16"
        if last:
            create_map(stage.maps_url, "labels_pair", (2, h, w), chunk, so, fresh, dtype=labels_dtype)
            create_map(stage.maps_url, "confidence_pair", (2, h, w), chunk, so, fresh)
        blocks = plan_blocks(h, w, chunk, side or max(h, w))
        shape = (1 + max(b.index[0] for b in blocks), 1 + max(b.index[1] for b in blocks))
        hist = create_map(stage.maps_url, "hist", (*shape, maps.F16_BINS), chunk, so, fresh, dtype="int64",
                          chunks=(1, 1, maps.F16_BINS))
        view = reference.view_of(self.config, stage.grid.tile)
        median = None if view is None and self.config.median_padding == "edge" else \
            reference.MedianFactory(view, self.config.median_padding)
        return RefineSink(stage_map(stages[s - 1]), this, self.config.median,
                          ArrayRef(stage.maps_url, hist.path, "bbv", shape, dict(so)), maps=keep_maps, pairs=last,
                          labels_dtype=labels_dtype, median_rows=median)

    def finish_stage(self, stages: list[StagePlan], s: int, out: ImageOutput, outputs: OutputArrays | None,
                     tiles: tuple[tuple[int, int], ...] | None, chunk: int, scheduler: Any) -> None:
        """After a refinement stage's blocks: the image-wide threshold ``t`` from their histograms of ``E_med``
        (``replace`` of the pixels, of the share of tiles that ran), kept in the stage's group for the next stage
        and the last pass."""
        stage = stages[s]
        if not s or not stage.tiles:
            return
        h, w = stage.grid.height, stage.grid.width
        group = zarr.open_group(store=zarr_store(stage.maps_url, out.storage_options), mode="r+")
        counts = np.asarray(group["hist"][:]).reshape(-1, maps.F16_BINS).sum(axis=0)
        share = 1.0 if tiles is None else len(tiles) / len(stage.grid)
        group.attrs[THRESHOLD] = maps.threshold_from_histogram(counts, self.config.count(h, w, share))

    def load(self, read: Callable[[str], bytes], device: DeviceConfig) -> MagnetModel:
        data = read(self.model.url)
        predictor = load_segmenter(data, self.runtime or GIGASEG, device)
        refiners = [load_refiner(read(r.url), predictor.num_classes) for r in (self.refiner, *self.more_refiners)]
        multiple = self.runtime.card.size_multiple if self.runtime else read_info(data).config.size_multiple
        return MagnetModel(predictor, refiners, multiple)


def stage_map(stage: StagePlan) -> StageMap:
    """The map stage ``stage`` leaves for the next (``magnet_blocks.StageMap``)."""
    return StageMap(stage.maps_url, (stage.grid.height, stage.grid.width), stage.num_classes, stage.index > 0,
                    dict(stage.storage_options))


class MapWindows:
    """A stage's map read as ``map[:, y0:y1, x0:x1]`` on the driver (MagNet-Fast's choice of tiles)."""

    def __init__(self, stage: StageMap) -> None:
        self.read = stage.reader(lambda ref: ref.open())

    def __getitem__(self, key) -> np.ndarray:
        _, rows, cols = key
        return self.read(Window(rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start))


__all__ = ["Magnet", "MagnetConfig", "MagnetModel", "MapWindows", "stage_map"]
