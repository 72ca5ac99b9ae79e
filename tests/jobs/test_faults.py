"""A worker process killed with SIGKILL mid-job: its block runs elsewhere, the job completes, the output is
bit-identical to a run without failure, and the report counts the retried tiles."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import zarr

from jobs.runner import run_spec
from jobs.spec import parse_spec
from tests.archive import spec_dict
from tests.jobs.test_resume import done_tiles

pytestmark = pytest.mark.integration


def _busy_tile_workers() -> list[psutil.Process]:
    """This test process's workers that are running a block right now (Ray titles them ``ray::BlockWorker.run``
    while the method runs); other sessions' clusters are not ours to kill."""
    busy = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "BlockWorker.run" in " ".join(p.cmdline() or []):
                busy.append(p)
        except psutil.NoSuchProcess:
            pass
    return busy


def test_sigkilled_worker_mid_job(tmp_path, ray_cluster):
    from pipeline.synth.land_cover import land_cover

    (tmp_path / "in").mkdir()
    arr = zarr.create_array(store=str(tmp_path / "in" / "big.zarr"), shape=(1024, 1024, 3), chunks=(512, 512, 3),
                            dtype="uint8")
    arr[:] = land_cover(0, 0, 1024, 1024, seed=8)
    # about 16 tiles a block (256 px blocks, 4 × 4): a kill lands while blocks are running
    spec = spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiling__batch=1, tiling__tiles_per_call=16)
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if done_tiles(tmp_path / "out") >= 10:
                busy = _busy_tile_workers()
                if busy:
                    os.kill(busy[0].pid, signal.SIGKILL)  # mid-batch: its calls are lost
                    killed.append(busy[0].pid)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    [result] = run_spec(parse_spec(spec))
    killer.join()
    assert killed, "no busy worker was found to kill"
    assert result.status == "ok", result.error
    assert result.tiles_retried > 0, "the killed worker's batch was re-run and counted"

    [clean] = run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "clean"), tiling__batch=1,
                                            tiling__tiles_per_call=16)))
    assert clean.tiles_retried == 0
    for path in ("labels/segmentation/0", "labels/segmentation/1"):
        a = zarr.open_array(str(tmp_path / "out" / "big.zarr" / path), mode="r")[:]
        b = zarr.open_array(str(tmp_path / "clean" / "big.zarr" / path), mode="r")[:]
        assert np.array_equal(a, b), f"{path} differs from a run without failure"
