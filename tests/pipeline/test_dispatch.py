"""Calls and model batches: how a stage's tiles are cut into worker calls, and a worker streaming a call."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from models.checkpoint import seeded_checkpoint
from pipeline.frameworks.base import ArrayRef, StagePlan
from pipeline.frameworks.segment import Segment
from pipeline.output.arrays import create_tile_store
from pipeline.plan import WeightsRef
from pipeline.synth.land_cover import land_cover
from pipeline.tiling import TileGrid
from pipeline.workers.dispatch import batches, call_size
from pipeline.workers.predictor import PredictorConfig
from pipeline.workers.worker import TileWorker


@pytest.mark.parametrize("n, batch, workers", [(1, 8, 2), (42, 8, 2), (121, 1, 2), (10_000, 8, 100),
                                               (68_000, 8, 100), (5, 4, 64), (1000, 7, 3)])
def test_call_size_is_a_multiple_of_the_batch_within_bounds(n, batch, workers):
    per = call_size(n, batch, workers)
    assert per % batch == 0 and batch <= per <= max(batch, 256)
    # no bigger than needed to give each worker 4 calls (up to one batch of rounding)
    assert per < max(batch, -(-n // (workers * 4))) + batch


def test_call_size_grows_with_the_image_and_stops_at_the_cap():
    assert call_size(42, 8, 2) == 8
    assert call_size(10_000, 8, 2) == 256
    assert call_size(10_000, 8, 2, cap=100) == 96
    assert call_size(3, 16, 1, cap=8) == 16  # never below one model batch


def test_batches_cover_every_tile_once_in_order():
    stage = object()
    tiles = [(i, j) for i in range(7) for j in range(5)]
    calls = batches(stage, tiles, 4, per_call=12)
    assert [len(c.tiles) for c in calls] == [12, 12, 11]
    assert [t for c in calls for t in c.tiles] == tiles
    assert {c.batch_size for c in calls} == {4}


def test_a_call_streamed_in_model_batches_writes_what_one_big_batch_writes(tmp_path):
    image = land_cover(0, 0, 300, 260, seed=2)
    zarr.create_array(store=str(tmp_path / "img.zarr"), shape=image.shape, chunks=(128, 128, 3),
                      dtype="uint8")[:] = image
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(seeded_checkpoint("fpn_resnet10", 3, ["a", "b", "c"], width=8))
    grid = TileGrid(300, 260, 128, 32, margin=16)
    worker = TileWorker(Segment(WeightsRef(str(ckpt), "")), {}, PredictorConfig(precision="fp32"))
    stores = {}
    for name, size in (("streamed", 2), ("whole", None)):
        url = str(tmp_path / name)
        create_tile_store(url, {}, (grid.ny, grid.nx, 3, 128, 128))
        stage = StagePlan(0, ArrayRef(str(tmp_path / "img.zarr"), "", "yxc", (300, 260)), grid, url, url + "-maps", 3)
        [call] = batches(stage, grid.indices(), size or len(grid), per_call=len(grid))
        result = worker.run(call)
        assert result.tiles == tuple(grid.indices())
        stores[name] = zarr.open_array(url, mode="r")[:]
    assert not np.isnan(stores["whole"].astype(np.float32)).any()
    np.testing.assert_allclose(stores["streamed"].astype(np.float32), stores["whole"].astype(np.float32), atol=2e-3)


def test_actors_go_where_the_data_is_cheapest_to_read():
    from pipeline.workers.dispatch import placement_for

    assert placement_for(["/data/in", "file:///data/out"]) == "driver"  # only this machine's disk holds them
    assert placement_for(["s3://bucket/in", "/data/out"]) == "anywhere"
    assert placement_for(["s3://bucket/in", "gs://bucket/out"]) == "anywhere"


def test_scheduling_strategies(ray_cluster):
    from pipeline.workers.dispatch import scheduling_strategy

    near = scheduling_strategy("driver")
    assert near.node_id == ray_cluster.get_runtime_context().get_node_id() and near.soft is True
    assert scheduling_strategy("anywhere") == "SPREAD"
    with pytest.raises(ValueError, match="placement"):
        scheduling_strategy("rack-7")
