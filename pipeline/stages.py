"""The stages of an image, whatever its framework: how a stage's tiles become its blend, its result and the map
the next stage reads (``StagePlan.maps_url``/``STAGE_MAP``, ``(C, H, W)`` float16 chunked like the masks).

Which stages an image has, what their tiles read and how a stage's blend becomes its result are the framework's
(``pipeline.frameworks``); running the tiles is the engine's.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline import blend
from pipeline.frameworks.base import STAGE_MAP, StagePlan
from pipeline.output.arrays import create_map
from pipeline.output.layout import ImageOutput
from pipeline.plan import JobPlan, TilingPlan
from pipeline.storage import zarr_store

Tiles = tuple[tuple[int, int], ...] | None  # the tiles a stage ran (None: all of its grid)


def blend_plan(tiling: TilingPlan, stage: StagePlan, tiles: Tiles = None) -> blend.BlendPlan:
    return blend.BlendPlan(
        grid=stage.grid, tiles_url=stage.tiles_url, num_classes=stage.num_classes, window=tiling.blend,
        sigma_scale=tiling.sigma_scale, chunk=tiling.chunk, storage_options=stage.storage_options,
        tiles=None if tiles is None else frozenset(tiles),
    )


def stage_result(plan: JobPlan, out: ImageOutput, stages: list[StagePlan], s: int, tiles: Tiles,
                 scheduler: Any) -> da.Array:
    """Lazy ``(C, H, W)`` float32 result of stage ``s``, once all its tiles are in its tile store."""
    bp = blend_plan(plan.tiling, stages[s], tiles)
    blend.check_complete(bp)
    return plan.framework.stage_result(stages, s, out, blend.blended_probabilities(bp), tiles, plan.tiling.chunk,
                                       scheduler)


def store_stage_map(plan: JobPlan, out: ImageOutput, stages: list[StagePlan], s: int, tiles: Tiles,
                    scheduler: Any) -> None:
    """Stage ``s``'s result (not the last stage's) into the map the next stage reads; marked complete last."""
    stage = stages[s]
    probs = stage_result(plan, out, stages, s, tiles, scheduler)
    target = create_map(stage.maps_url, STAGE_MAP, (stage.num_classes, stage.grid.height, stage.grid.width),
                        plan.tiling.chunk, out.storage_options)
    da.store(probs.astype(np.float16), target, lock=False, scheduler=scheduler)
    target.attrs["complete"] = True


def stage_map_complete(stage: StagePlan) -> bool:
    """Whether the stage left its map, complete; a read only (nothing is created by asking)."""
    try:
        store = zarr_store(stage.maps_url, stage.storage_options, read_only=True)
        return bool(zarr.open_array(store=store, path=STAGE_MAP, mode="r").attrs.get("complete"))
    except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeNotFoundError):
        return False


__all__ = ["blend_plan", "stage_map_complete", "stage_result", "store_stage_map"]
