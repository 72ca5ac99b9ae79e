"""A worker process killed with SIGKILL mid-job: its tiles run elsewhere, the job completes, the output is
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
from pipeline.output import finished_tiles
from tests.archive import spec_dict

pytestmark = pytest.mark.integration


def _tile_workers() -> list[psutil.Process]:
    """This test process's Ray tile workers (other sessions' clusters are not ours to kill)."""
    me = psutil.Process()
    return [p for p in me.children(recursive=True) if "TileWorker" in " ".join(p.cmdline() or [])]


def test_sigkilled_worker_mid_job(tmp_path, ray_cluster):
    from jobs.demo import land_cover

    (tmp_path / "in").mkdir()
    arr = zarr.create_array(store=str(tmp_path / "in" / "big.zarr"), shape=(1024, 1024, 3), chunks=(512, 512, 3),
                            dtype="uint8")
    arr[:] = land_cover(0, 0, 1024, 1024, seed=8)
    spec = spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiling__batch=2)
    tiles_url = str(tmp_path / "out" / "_work" / "big" / "stage-0" / "tiles")
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(finished_tiles(tiles_url, {})) < 10:
            time.sleep(0.05)
        workers = _tile_workers()
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].pid)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    [result] = run_spec(parse_spec(spec))
    killer.join()
    assert killed, "no worker was found to kill"
    assert result.status == "ok", result.error
    assert result.tiles_retried > 0, "the killed worker's batch was re-run and counted"

    [clean] = run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "clean"), tiling__batch=2)))
    assert clean.tiles_retried == 0
    for path in ("labels/segmentation/0", "labels/segmentation/1"):
        a = zarr.open_array(str(tmp_path / "out" / "big.zarr" / path), mode="r")[:]
        b = zarr.open_array(str(tmp_path / "clean" / "big.zarr" / path), mode="r")[:]
        assert np.array_equal(a, b), f"{path} differs from a run without failure"
