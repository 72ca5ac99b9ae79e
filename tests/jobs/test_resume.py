"""Resume: a driver killed mid-run, started again, recomputes only unfinished blocks; output identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
import zarr

from jobs.report import status
from jobs.runner import run_spec
from jobs.spec import parse_spec
from pipeline.output.layout import image_output
from pipeline.output.state import blocks_done
from tests.archive import spec_dict

pytestmark = pytest.mark.integration


def _write_input(root):
    from pipeline.synth.land_cover import land_cover

    root.mkdir(parents=True)
    arr = zarr.create_array(store=str(root / "big.zarr"), shape=(1536, 1536, 3), chunks=(512, 512, 3), dtype="uint8")
    arr[:] = land_cover(0, 0, 1536, 1536, seed=5)


def _process_tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _kill_all(procs, timeout: float = 30.0) -> None:
    """Kill every process of the dead driver's tree (Ray workers sit in their own process groups), as
    if its machine had died, so no late write lands after the listing below."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _spec(inputs, output):
    # about 16 tiles a block: 256 px blocks, 6 × 6 of them, so a kill lands between blocks
    return spec_dict(str(inputs), str(output), tiling__batch=1, tiling__tiles_per_call=16,
                     output__extras=["confidence"])


def done_tiles(output, name: str = "big") -> int:
    """The tiles of the blocks marked done (each block's owned tiles), as ``gigaseg status`` counts them."""
    return sum(b["owned"] for b in blocks_done(image_output(str(output), name, {}), 0).values())


def test_killed_driver_resumes_only_unfinished_tiles(tmp_path, ray_cluster):
    _write_input(tmp_path / "in")
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tmp_path / "in", tmp_path / "out")))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "run", str(spec_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    try:
        while done_tiles(tmp_path / "out") < 20:
            assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no tiles written within 180 s"
            time.sleep(0.05)
    finally:
        tree = _process_tree(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        proc.wait()
        _kill_all(tree)

    done_before = done_tiles(tmp_path / "out")
    total = 16 * 16  # ⌈(1536 − 32) / 96⌉ per axis
    assert 20 <= done_before < total
    group = zarr.open_group(str(tmp_path / "out" / "big.zarr"), mode="r")
    assert group.attrs["gigaseg"]["complete"] is False
    [row] = status(str(tmp_path / "out"), {})["images"]
    assert (row["status"], row["tiles_done"], row["tiles"]) == ("in progress", done_before, total)

    resumed = run_spec(parse_spec(_spec(tmp_path / "in", tmp_path / "out")))
    assert [r.status for r in resumed] == ["ok"]
    assert resumed[0].tiles == total
    assert resumed[0].tiles_run == total - done_before, "finished blocks were not recomputed"

    clean = run_spec(parse_spec(_spec(tmp_path / "in", tmp_path / "clean")))
    assert clean[0].tiles_run == total
    for path in ("labels/segmentation/0", "labels/segmentation/1", "confidence"):
        a = zarr.open_array(str(tmp_path / "out" / "big.zarr" / path), mode="r")[:]
        b = zarr.open_array(str(tmp_path / "clean" / "big.zarr" / path), mode="r")[:]
        assert np.array_equal(a, b), f"{path} differs from an uninterrupted run"
