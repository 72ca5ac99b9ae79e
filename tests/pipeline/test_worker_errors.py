"""A block whose model call raises: the worker raises it, whatever its reader thread is doing (it must not wait
forever to hand over rows nobody will take)."""

from __future__ import annotations

import threading
import time

import numpy as np

from models.checkpoint import seeded_checkpoint
from pipeline.tiling import TileGrid
from tests.pipeline.blockrun import block_worker, run_blocks


def test_a_model_error_is_raised_while_the_reader_has_every_row_read(tmp_path):
    worker = block_worker(tmp_path, seeded_checkpoint("fpn_resnet10", 2, ["a", "b"], width=8))

    def failing(stage, tiles, inputs):
        time.sleep(0.5)  # meanwhile the reader has read the block's other rows: its queue (2 rows) is full
        raise RuntimeError("the model failed")

    worker.model = type("Failing", (), {"__call__": staticmethod(failing), "device": worker.model.device,
                                         "runner": worker.model.runner})()
    image = np.random.default_rng(0).integers(0, 256, (3, 192, 64), dtype=np.uint8)  # 3 tile rows, one block
    outcome: list = []

    def call():
        try:
            run_blocks(worker, tmp_path, image, TileGrid(192, 64, 64, 0), side=256, chunk=64, num_classes=2)
        except Exception as err:  # noqa: BLE001 - what the test looks at
            outcome.append(err)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the worker hangs instead of raising the model's error"
    assert len(outcome) == 1 and "the model failed" in str(outcome[0])
