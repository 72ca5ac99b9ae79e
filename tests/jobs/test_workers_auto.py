"""``resources.workers: auto``: as many actors as the cluster's GPUs hold, counted when the job starts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from PIL import Image

from jobs.runner import auto_workers, embedded_resources, run_spec
from jobs.spec import parse_spec
from pipeline.errors import SpecError
from pipeline.synth.land_cover import land_cover
from tests.archive import spec_dict


def _spec(**overrides):
    return parse_spec(spec_dict("in", "out", **overrides))


def test_auto_counts_gpu_shares_of_the_cluster():
    spec = _spec(resources__workers="auto", resources__gpus_per_worker=0.5)
    assert auto_workers(spec, {"GPU": 3.0, "CPU": 16.0}) == 6
    assert auto_workers(_spec(resources__workers="auto"), {"GPU": 8.0, "CPU": 2.0}) == 8


def test_auto_with_cpu_workers_counts_cpus():
    spec = _spec(resources__workers="auto", resources__gpus_per_worker=0, resources__cpus_per_worker=2)
    assert auto_workers(spec, {"CPU": 7.0}) == 3


def test_a_number_is_kept():
    assert auto_workers(_spec(resources__workers=3), {"GPU": 8.0}) == 3


def test_auto_on_a_cluster_without_gpus_says_how_to_fix():
    with pytest.raises(SpecError) as err:
        auto_workers(_spec(resources__workers="auto"), {"CPU": 16.0})
    text = str(err.value)
    assert "resources.workers" in text and "0 GPUs" in text and "set resources.workers to a number" in text


def test_embedded_cluster_gets_the_gpus_the_spec_names():
    assert embedded_resources(_spec(resources__workers=3, resources__gpus_per_worker=0.5)) == (2.0, 1.5)
    assert embedded_resources(_spec(resources__workers="auto", cluster__local_gpus=4))[1] == 4.0


@pytest.mark.parametrize("bad", ["many", 0, -1, 1.5])
def test_bad_workers_values_are_refused(bad):
    with pytest.raises(SpecError) as err:
        _spec(resources__workers=bad)
    assert "resources.workers" in str(err.value)


@pytest.mark.integration
def test_auto_runs_one_actor_per_gpu_share(tmp_path, ray_cluster):
    """The session cluster has 2 logical GPUs: half a GPU each gives 4 actors, all of which report."""
    (tmp_path / "in").mkdir()
    Image.fromarray(land_cover(0, 0, 300, 330, seed=5)).save(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(out), resources__workers="auto",
                                resources__gpus_per_worker=0.5, resources__cpus_per_worker=0.5))
    results = run_spec(spec)
    assert [r.status for r in results] == ["ok"]
    report = json.loads((out / "report.json").read_text())
    workers = report["workers"]
    assert len(workers) == 4 and len({w["worker"] for w in workers}) == 4
    assert all(len(w["gpu_ids"]) == 1 and w["node"] for w in workers)
    labels = zarr.open_array(str(out / "a.zarr" / "labels" / "segmentation" / "0"), mode="r")
    assert labels.shape == (300, 330) and np.asarray(labels).max() < 3
