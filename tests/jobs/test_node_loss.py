"""A worker node removed mid-job (``ray.cluster_utils.Cluster``, several nodes with logical GPUs): its tiles
run elsewhere, the lost actor is restarted on another node, the job completes, the output is bit-identical
to a run with no failure, and the report counts the retried tiles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from jobs.runner import run_spec
from jobs.spec import parse_spec
from pipeline.synth.land_cover import land_cover
from pipeline.workers.ray_cluster import ray_temp_dir
from tests.archive import spec_dict

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_node_removed_mid_job(tmp_path, ray_cluster):
    (tmp_path / "in").mkdir()
    arr = zarr.create_array(store=str(tmp_path / "in" / "big.zarr"), shape=(1280, 1280, 3), chunks=(512, 512, 3),
                            dtype="uint8")
    arr[:] = land_cover(0, 0, 1280, 1280, seed=9)
    spec = spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiling__batch=1, tiling__tiles_per_call=16,
                     resources__cpus_per_worker=0.5)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**spec, "_image": "big"}))
    result_path = tmp_path / "result.json"
    # Ray's own directory, created here and removed afterwards; not under tmp_path, whose path is too long
    # for Ray's socket paths
    ray_tmp = ray_temp_dir("gs-nl-", nested="/ray")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.jobs.node_loss_job", str(spec_path), str(result_path), ray_tmp],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(result_path.read_text())
    assert outcome["removed"], "the job finished before a node could be removed"
    assert outcome["status"] == "ok", outcome["error"]
    assert outcome["tiles_retried"] > 0, f"the removed node's batches were not re-run or not counted: {outcome}"

    [clean] = run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "clean"), tiling__batch=1,
                                            tiling__tiles_per_call=16, resources__cpus_per_worker=0.5)))
    assert clean.tiles_retried == 0
    for path in ("labels/segmentation/0", "labels/segmentation/1"):
        a = zarr.open_array(str(tmp_path / "out" / "big.zarr" / path), mode="r")[:]
        b = zarr.open_array(str(tmp_path / "clean" / "big.zarr" / path), mode="r")[:]
        assert np.array_equal(a, b), f"{path} differs from a run without failure"
