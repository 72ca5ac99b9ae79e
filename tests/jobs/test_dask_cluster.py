"""What crosses blocks (the label pyramid above the levels a block makes) on a dask.distributed cluster: an
existing scheduler named in the spec, or one gigaseg starts on the Ray cluster's nodes. Same masks as Dask's
threads in the driver. The blocks here are one chunk a side (``tiles_per_call: 1``), so every pyramid level above
0 crosses blocks and is Dask's."""

from __future__ import annotations

import json
import time

import numpy as np
import psutil
import pytest
import zarr

from jobs.runner import run_spec
from jobs.spec import parse_spec
from pipeline.errors import SpecError
from pipeline.synth.land_cover import land_cover
from tests.archive import spec_dict

pytestmark = pytest.mark.integration

MAGNET = {"model__framework": "magnet", "model__magnet": {"scales": 2, "median": 3}}
SMALL_BLOCKS = {"tiling__tiles_per_call": 1}


def _archive(root):
    root.mkdir(parents=True)
    zarr.create_array(store=str(root / "scene.zarr"), shape=(520, 610, 3), chunks=(256, 256, 3),
                      dtype="uint8")[:] = land_cover(0, 0, 520, 610, seed=31)


def _labels(out):
    return zarr.open_array(str(out / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]


def _dask_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "distributed.cli.dask_" in cmd:
            found.append(p)
    return found


def test_bad_dask_setting_names_the_field():
    with pytest.raises(SpecError, match="cluster.dask"):
        parse_spec(spec_dict("in", "out", cluster__dask="localhost:8786"))


def test_existing_scheduler_runs_the_blend(tmp_path, ray_cluster):
    from distributed import LocalCluster

    _archive(tmp_path / "in")
    run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "threads"), **MAGNET, **SMALL_BLOCKS)))
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        spec = parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "dask"), cluster__dask=cluster.scheduler_address,
                                    **MAGNET, **SMALL_BLOCKS))
        [result] = run_spec(spec)
    assert result.status == "ok", result.error
    report = json.loads((tmp_path / "dask" / "report.json").read_text())
    assert report["dask"]["scheduler"] == cluster.scheduler_address
    assert report["dask"]["workers"] == 1 and report["dask"]["transitions"] > 0
    assert np.array_equal(_labels(tmp_path / "dask"), _labels(tmp_path / "threads"))


def test_dask_started_on_the_ray_nodes(tmp_path, ray_cluster):
    _archive(tmp_path / "in")
    run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "threads"), **SMALL_BLOCKS)))
    [result] = run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "dask"), cluster__dask="ray",
                                              **SMALL_BLOCKS)))
    assert result.status == "ok", result.error
    report = json.loads((tmp_path / "dask" / "report.json").read_text())
    assert report["dask"]["started_by_gigaseg"] is True
    assert report["dask"]["workers"] == len([n for n in ray_cluster.nodes() if n["Alive"]])
    assert report["dask"]["transitions"] > 0
    assert np.array_equal(_labels(tmp_path / "dask"), _labels(tmp_path / "threads"))
    deadline = time.monotonic() + 20
    while _dask_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _dask_processes(), "the Dask scheduler and workers end with the job"
