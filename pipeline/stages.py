"""The stages of one image: plain segmentation is one stage at level 0; MagNet is one per scale.

Each stage has its tile grid over its pyramid level and its own tile store; a stage after the first
reads the map its predecessor left in ``_work/<name>/stage-<s>/maps/map`` ((C, H, W) float16, chunked like
the masks). ``stage_probabilities`` is the lazy (C, H, W) result of a stage once its tiles are done.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import zarr

from pipeline import blend, magnet
from pipeline.errors import UnsupportedImageError
from pipeline.output import ImageOutput
from pipeline.pyramid import Pyramid
from pipeline.storage import join, zarr_store
from pipeline.tiling import TileGrid
from pipeline.context import check_power_of_two, context_levels
from pipeline.worker import ArrayRef, ContextPlan, StagePlan


def maps_url(out: ImageOutput, stage: int) -> str:
    return join(out.work_url, f"stage-{stage}", "maps")


def stage_plans(cfg, out: ImageOutput, pyramid: Pyramid) -> list[StagePlan]:
    """One ``StagePlan`` per stage, coarse to fine (``cfg`` is a ``pipeline.engine.JobConfig``)."""
    levels = cfg.magnet.levels() if cfg.magnet else (0,)
    if max(levels) >= pyramid.n_levels:
        raise UnsupportedImageError(
            f"{pyramid.url}: MagNet with {len(levels)} scales needs {len(levels)} pyramid levels but the image "
            f"({pyramid.shapes[0][0]}×{pyramid.shapes[0][1]}) has {pyramid.n_levels}; lower model.magnet.scales"
        )
    context = _context_plan(cfg, pyramid) if cfg.contexts else None
    plans = []
    for s, level in enumerate(levels):
        h, w = pyramid.shapes[level]
        previous = None
        if s:
            previous = ArrayRef(maps_url(out, s - 1), "map", "cyx", pyramid.shapes[levels[s - 1]],
                                dict(cfg.output_storage_options))
        plans.append(StagePlan(
            image=ArrayRef(pyramid.url, pyramid.paths[level], pyramid.axes, (h, w), dict(pyramid.storage_options),
                           cfg.value_range if pyramid.in_place else None),
            grid=TileGrid(h, w, cfg.tile, cfg.overlap, *cfg.offset, margin=cfg.margin),
            tiles_url=join(out.work_url, f"stage-{s}", "tiles"),
            num_classes=len(cfg.class_names),
            storage_options=dict(cfg.output_storage_options),
            previous=previous,
            context=context,
        ))
    return plans


def _context_plan(cfg, pyramid: Pyramid) -> ContextPlan:
    """FCtL's context reads for ``pyramid``: every level up to the coarsest a context factor needs."""
    needed = context_levels(cfg.contexts, pyramid.n_levels)
    check_power_of_two(pyramid.shapes, needed)
    value_range = cfg.value_range if pyramid.in_place else None
    refs = tuple(ArrayRef(pyramid.url, pyramid.paths[lv], pyramid.axes, tuple(pyramid.shapes[lv]),
                          dict(pyramid.storage_options), value_range) for lv in range(max(needed) + 1))
    return ContextPlan(tuple(cfg.contexts), refs)


def blend_plan(cfg, stage: StagePlan, tiles=None) -> blend.BlendPlan:
    return blend.BlendPlan(
        grid=stage.grid, tiles_url=stage.tiles_url, num_classes=stage.num_classes, window=cfg.blend_window,
        sigma_scale=cfg.sigma_scale, chunk=cfg.chunk, storage_options=cfg.output_storage_options,
        tiles=None if tiles is None else frozenset(tiles),
    )


def selected_tiles(cfg, out: ImageOutput, stages: list[StagePlan], s: int) -> tuple[tuple[int, int], ...] | None:
    """MagNet-Fast: the tiles stage ``s`` runs, the most uncertain footprints of stage ``s − 1``'s (complete)
    map; None when every tile runs. The same map always gives the same tiles, so a resumed job agrees."""
    stage = stages[s]
    if stage.previous is None or cfg.magnet is None or cfg.magnet.patches is None:
        return None
    n = cfg.magnet.tile_count(len(stage.grid))
    if n >= len(stage.grid):
        return None
    prev = stage.previous
    previous = zarr.open_array(store=zarr_store(prev.group_url, prev.storage_options, read_only=True),
                               path=prev.path, mode="r")
    return magnet.select_tiles(magnet.tile_uncertainty(previous, stage.grid, cfg.scheduler), n)


def _maps_group(out: ImageOutput, stage: int) -> zarr.Group:
    return zarr.open_group(store=zarr_store(maps_url(out, stage), out.storage_options), mode="a")


def _array(group: zarr.Group, name: str, shape, chunk: int, dtype: str) -> zarr.Array:
    chunks = (*shape[:-2], min(chunk, shape[-2]), min(chunk, shape[-1]))
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=True,
                              compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"))


def stage_probabilities(cfg, out: ImageOutput, stages: list[StagePlan], s: int, tiles=None) -> da.Array:
    """Lazy ``(C, H, W)`` float32 result of stage ``s``: the blend, or MagNet's merge for ``s ≥ 1``.

    For MagNet this runs the refinement pass and the threshold reduction (``pipeline.magnet``) first;
    ``tiles`` are the tiles that ran (``selected_tiles``; None: all).
    """
    stage = stages[s]
    plan = blend_plan(cfg, stage, tiles)
    blend.check_complete(plan)
    if stage.previous is None:
        return blend.blended_probabilities(plan)
    h, w = stage.grid.height, stage.grid.width
    group = _maps_group(out, s)
    maps = magnet.StageMaps(
        refined=_array(group, "refined", (stage.num_classes, h, w), cfg.chunk, "float16"),
        error=_array(group, "error", (h, w), cfg.chunk, "float16"),
        error_median=_array(group, "error_median", (h, w), cfg.chunk, "float16"),
    )
    prev = stage.previous
    previous = zarr.open_array(store=zarr_store(prev.group_url, prev.storage_options, read_only=True),
                               path=prev.path, mode="r")
    magnet.refine_pass(plan, previous, maps, cfg.magnet.median, cfg.scheduler)
    share = 1.0 if tiles is None else len(tiles) / len(stage.grid)
    t = magnet.stage_threshold(maps, cfg.magnet.count(h, w, share), cfg.scheduler)
    return magnet.merged(maps, previous, t)


def store_stage_map(cfg, out: ImageOutput, stages: list[StagePlan], s: int, tiles=None) -> None:
    """Blend stage ``s`` (not the last) into the map the next stage reads; marked complete last."""
    stage = stages[s]
    probs = stage_probabilities(cfg, out, stages, s, tiles)
    group = _maps_group(out, s)
    target = _array(group, "map", (stage.num_classes, stage.grid.height, stage.grid.width), cfg.chunk, "float16")
    da.store(probs.astype(np.float16), target, lock=False, scheduler=cfg.scheduler)
    target.attrs["complete"] = True


def stage_map_complete(out: ImageOutput, s: int) -> bool:
    """Whether stage ``s`` left its map, complete; a read only (nothing is created by asking)."""
    try:
        store = zarr_store(maps_url(out, s), out.storage_options, read_only=True)
        return bool(zarr.open_array(store=store, path="map", mode="r").attrs.get("complete"))
    except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeNotFoundError):
        return False
