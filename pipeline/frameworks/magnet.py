"""Framework ``magnet``: MagNet's progressive refinement (Huynh et al., CVPR 2021; github VinAIResearch/MagNet),
one stage per scale, coarse to fine.

Stage ``s`` covers pyramid level ``L_s = scales − 1 − s``. Stage 0 is plain tiled segmentation. A stage-s tile
(s ≥ 1) also reads the stage-(s−1) map over its footprint, upsampled ×2 (``UpsampledMap``), and its model gives
``R = softmax(refiner(softmax(segmenter(x)), Y_up))``; the stage's result merges ``R`` into ``Y_up`` where the
error score ranks among the image's top ``replace`` (``pipeline.frameworks.magnet_maps``): a block writes ``R``
and ``E``, and once all blocks are in, the driver median-filters ``E``, finds the image-wide threshold and merges,
with Dask. MagNet-Fast (``patches``) runs each refinement stage only on the tiles whose footprint is most
uncertain in the previous map.

The refiner reads only the segmenter's probabilities, so any segmenter a ``segment`` job runs works here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import torch
import zarr

from models import magnet as mg
from models.checkpoint import read_info
from models.errors import CheckpointError
from models.magnet import load_refiner, seeded_refiner
from pipeline.blend import downsample_labels, store_outputs
from pipeline.errors import SpecError, UnsupportedImageError
from pipeline.frameworks import magnet_maps as maps
from pipeline.frameworks import magnet_reference as reference
from pipeline.frameworks.base import STAGE_MAP, Framework, ModelSource, OpenArray, Resolution, StagePlan
from pipeline.frameworks.magnet_maps import MagnetConfig
from pipeline.frameworks.segment import GIGASEG, runtime_of
from pipeline.frameworks.segmenters import SegmenterRuntime, load_segmenter, resolve_segmenter
from pipeline.output.arrays import OutputArrays, create_map, map_ref
from pipeline.output.layout import ImageOutput
from pipeline.plan import ArrayRef, TilingPlan, WeightsRef
from pipeline.pyramid import Pyramid
from pipeline.storage import read_bytes, zarr_store
from pipeline.tiling import Window
from pipeline.workers.device_blend import Band
from pipeline.workers.predictor import DeviceConfig
from pipeline.workers.sinks import BlockSink, MapSink, host


@dataclass(frozen=True)
class RefineSink:
    """What a refinement stage's block writes: ``R`` (its blend; ``Y_up`` where no chosen tile ran) and the error
    score ``E = certainty(R) · uncertainty(Y_up)`` (0 where no tile ran), both float16, for ``finish_stage``."""

    refined: ArrayRef
    error: ArrayRef
    previous: ArrayRef  # the previous stage's map (C, H/2, W/2)

    def start(self, block) -> _RefineWriter:
        return _RefineWriter(self, block.open_array)

    def write(self, open_array, band: Band) -> list:
        region, probs, covered = band.region, band.probabilities(), band.covered()
        up = reference.resize_window(open_array(self.previous), self.previous.shape_yx, self.refined.shape_yx, region)
        up = torch.from_numpy(up).to(probs.device)
        refined = torch.where(covered[None], probs, up)
        error = torch.where(covered, mg.error_score(refined[None], up[None])[0], torch.zeros_like(up[0]))
        y, x = slice(region.y0, region.y1), slice(region.x0, region.x1)
        return [(self.refined, (slice(None), y, x), host(refined, "float16")),
                (self.error, (y, x), host(error, "float16"))]


@dataclass
class _RefineWriter:
    sink: RefineSink
    open_array: Any

    def write(self, band: Band) -> list:
        return self.sink.write(self.open_array, band)

    def finish(self) -> list:
        return []


@dataclass(frozen=True)
class UpsampledMap:
    """A tile input: the previous stage's ``(C, H/2, W/2)`` map over the tile's window, upsampled ×2."""

    ref: ArrayRef

    def read(self, open_array: OpenArray, image: ArrayRef, windows: list[Window]) -> np.ndarray:
        previous = open_array(self.ref)
        return np.stack([reference.resize_window(previous, self.ref.shape_yx, image.shape_yx, w) for w in windows])


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
    def __call__(self, stage: int, tiles: torch.Tensor, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        if not stage:
            return whole_pass(self.predictor, tiles, inputs[0], self.size_multiple) if inputs else \
                self.predictor.probabilities(tiles)
        (previous_up,) = inputs
        refiner = self.refiners[min(stage, len(self.refiners)) - 1]
        fine = self.predictor.probabilities(tiles)  # softmax(segmenter(x)), whatever runs the segmenter
        with self.runner.autocast():
            return torch.softmax(refiner(fine, self.runner.tensor(previous_up).float()).float(), dim=1)


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
        scales = options["scales"]
        factors = tuple(float(f) for f in scales) if isinstance(scales, list) else ()
        config = MagnetConfig(scales=len(factors) or scales, replace=options["replace"], median=options["median"],
                              patches=options["patches"], factors=factors, **reference.options_of(dict(options)))
        more = tuple(weights[k] for k in sorted((k for k in weights if k.startswith("refiner-")),
                                                key=lambda k: int(k.split("-")[1])))
        return cls(weights["model"], weights["refiner"], config, runtime_of(resolution), more)

    def fingerprint(self) -> dict[str, Any]:
        c = self.config
        procedure = {k: getattr(c, k) for k in reference.OPTIONS  # only where not gigaseg's: old outputs resume
                     if getattr(c, k) != MagnetConfig.__dataclass_fields__[k].default}
        more = {"refiners": [r.sha256 for r in self.more_refiners]} if self.more_refiners else {}
        return {"framework": self.name, "checkpoint": self.model.sha256, "refiner": self.refiner.sha256,
                "scales": list(c.factors) if c.factors else c.scales, "replace": c.replace, "median": c.median,
                "patches": c.patches,
                **(self.runtime.fingerprint() if self.runtime else {}), **procedure, **more}

    def levels(self, n_levels: int) -> set[int]:
        return {lv for lv in self.config.levels() if lv < n_levels}  # too few: ``stages`` says so

    def stages(self, pyramid: Pyramid, out: ImageOutput, tiling: TilingPlan, num_classes: int) -> list[StagePlan]:
        levels = self.config.levels()
        if max(levels) >= pyramid.n_levels:
            raise UnsupportedImageError(
                f"{pyramid.url}: MagNet with {len(levels)} scales needs {len(levels)} pyramid levels but the image "
                f"({pyramid.shapes[0][0]}×{pyramid.shapes[0][1]}) has {pyramid.n_levels}; lower model.magnet.scales")
        plans: list[StagePlan] = []
        crop = reference.RoiAlignedMap if self.config.crop == "roi_align" else UpsampledMap
        images = reference.stage_images(self.config.stage_factors(), pyramid, [out.maps_url(s) for s in
                                        range(len(levels))], tiling.image_chunk, dict(out.storage_options))
        for s, (image, shape) in enumerate(images):
            inputs = ()
            if s:
                inputs = (crop(ArrayRef(plans[-1].maps_url, STAGE_MAP, "cyx", plans[-1].image.shape_yx,
                                        dict(out.storage_options))),)
            plan = StagePlan(index=s, image=image, grid=tiling.grid(*shape), maps_url=out.maps_url(s),
                             num_classes=num_classes, storage_options=dict(out.storage_options), inputs=inputs)
            fixed = self.runtime is not None and self.runtime.fixed_size is not None  # an ONNX model of one size
            if not s and self.config.stage0 == "whole" and not fixed and reference.fits_one_tile(plan.grid, shape):
                plan = dataclasses.replace(plan, inputs=(reference.WholeImage(),))
            plans.append(plan)
        return plans

    def selected_tiles(self, stages: list[StagePlan], s: int, scheduler: Any) -> tuple[tuple[int, int], ...] | None:
        """MagNet-Fast: the tiles stage ``s`` runs, the most uncertain footprints of stage ``s − 1``'s (complete)
        map; None when every tile runs. The same map always gives the same tiles, so a resumed job agrees."""
        stage = stages[s]
        if not s or self.config.patches is None:
            return None
        n = self.config.tile_count(len(stage.grid))
        if n >= len(stage.grid):
            return None
        scores = maps.tile_uncertainty(stage.inputs[0].ref.open(), stage.grid, scheduler)
        # the reference's code sorts ascending and takes the first: the least uncertain tiles
        return maps.select_tiles(-scores if self.config.patch_choice == "least_uncertain" else scores, n)

    def stage_sink(self, stages: list[StagePlan], s: int, out: ImageOutput, outputs: OutputArrays | None,
                   chunk: int, fresh: bool) -> BlockSink:
        """Stage 0 writes its blend as the map stage 1 reads; a refinement stage writes ``R`` and ``E``
        (``RefineSink``), which ``finish_stage`` merges."""
        stage, so = stages[s], out.storage_options
        c, h, w = stage.num_classes, stage.grid.height, stage.grid.width
        if not s:
            return MapSink(map_ref(create_map(stage.maps_url, STAGE_MAP, (c, h, w), chunk, so, fresh), stage.maps_url,
                                   so))
        refined = create_map(stage.maps_url, "refined", (c, h, w), chunk, so, fresh)
        error = create_map(stage.maps_url, "error", (h, w), chunk, so, fresh)
        return RefineSink(map_ref(refined, stage.maps_url, so), map_ref(error, stage.maps_url, so),
                          stage.inputs[0].ref)

    def finish_stage(self, stages: list[StagePlan], s: int, out: ImageOutput, outputs: OutputArrays | None,
                     tiles: tuple[tuple[int, int], ...] | None, chunk: int, scheduler: Any) -> None:
        """After a refinement stage's blocks: the median-filtered ``E``, the image-wide threshold ``t`` and
        ``Y_s = where(E ≥ t, R, Y_up)`` (``magnet_maps``), stored as the next stage's map or as the output."""
        if not s:
            return
        stage, so = stages[s], out.storage_options
        c, h, w = stage.num_classes, stage.grid.height, stage.grid.width
        group = zarr.open_group(store=zarr_store(stage.maps_url, so), mode="r+")
        stage_maps = maps.StageMaps(refined=group["refined"], error=group["error"],
                                    error_median=create_map(stage.maps_url, "error_median", (h, w), chunk, so))
        previous = stage.inputs[0].ref.open()
        view = reference.view_of(self.config, stage.grid.tile)
        if view is None:
            maps.median_pass(stage_maps, self.config.median, scheduler, self.config.median_padding)
        else:
            reference.median_view_pass(stage_maps, self.config.median, view, self.config.median_padding, scheduler)
        share = 1.0 if tiles is None else len(tiles) / len(stage.grid)
        t = maps.stage_threshold(stage_maps, self.config.count(h, w, share), scheduler)
        probs = maps.merged(stage_maps, previous, t)
        if s < len(stages) - 1:
            target = create_map(stage.maps_url, STAGE_MAP, (c, h, w), chunk, so)
            da.store(probs.astype(np.float16), target, lock=False, scheduler=scheduler)
            return
        targets = {"labels": outputs.labels[0]}
        targets.update({k: a for k, a in (("confidence", outputs.confidence),
                                          ("probabilities", outputs.probabilities)) if a is not None})
        store_outputs(probs, targets, c, scheduler)
        for level in range(1, 1 + outputs.block_levels):  # the levels an output sink's blocks would have made
            downsample_labels(outputs.labels[level - 1], outputs.labels[level], c, scheduler)

    def load(self, read: Callable[[str], bytes], device: DeviceConfig) -> MagnetModel:
        data = read(self.model.url)
        predictor = load_segmenter(data, self.runtime or GIGASEG, device)
        refiners = [load_refiner(read(r.url), predictor.num_classes) for r in (self.refiner, *self.more_refiners)]
        multiple = self.runtime.card.size_multiple if self.runtime else read_info(data).config.size_multiple
        return MagnetModel(predictor, refiners, multiple)


def whole_pass(predictor, tiles: torch.Tensor, extents: np.ndarray, multiple: int) -> torch.Tensor:
    """Stage 0 in one pass (``stage0: whole``): for each tile, the segmenter on the image inside it alone (rows
    ``y:y+h``, columns ``x:x+w`` of ``extents``), extended to a multiple of the model's size multiple with the
    tile's own mirrored margin; its probabilities fill the tile, edges replicated past the image (those pixels are
    not kept). A tile without room for that runs whole. ``(B, 3, T, T) → (B, C, T, T)``."""
    out = []
    for tile, (y, x, h, w) in zip(tiles, extents.tolist(), strict=True):
        hh, ww = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        t = tile.shape[-1]
        if y < 0 or x < 0 or y + hh > t or x + ww > t:
            out.append(predictor.probabilities(tile[None]))
            continue
        p = predictor.probabilities(tile[None, :, y : y + hh, x : x + ww])[..., :h, :w]
        out.append(torch.nn.functional.pad(p, (x, t - x - w, y, t - y - h), mode="replicate"))
    return torch.cat(out)


__all__ = ["Magnet", "MagnetConfig", "MagnetModel", "UpsampledMap"]
