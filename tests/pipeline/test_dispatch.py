"""Worker calls: a block streamed in model batches, and where the actors go."""

from __future__ import annotations

import numpy as np
import pytest

from models.checkpoint import seeded_checkpoint
from pipeline.synth.land_cover import land_cover
from pipeline.tiling import TileGrid
from tests.pipeline.blockrun import block_worker, run_blocks


def test_a_block_streamed_in_model_batches_writes_what_one_big_batch_writes(tmp_path):
    image = np.ascontiguousarray(land_cover(0, 0, 300, 260, seed=2).transpose(2, 0, 1))
    worker = block_worker(tmp_path, seeded_checkpoint("fpn_resnet10", 3, ["a", "b", "c"], width=8))
    grid = TileGrid(300, 260, 128, 32, margin=16)
    streamed = run_blocks(worker, tmp_path, image, grid, side=128, chunk=64, num_classes=3, batch=2, name="b2")
    whole = run_blocks(worker, tmp_path, image, grid, side=1024, chunk=64, num_classes=3, batch=64, name="all")
    assert not np.isnan(whole[1].astype(np.float32)).any()
    np.testing.assert_array_equal(streamed[0], whole[0])
    np.testing.assert_allclose(streamed[1].astype(np.float32), whole[1].astype(np.float32), atol=2e-3)


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
