"""What the driver overlaps: blocks writing their masks while others run, Ray started during the first ingest and
released during the last image's finish. Each test would hang (and then fail on its timeout) or fail outright if
the overlap were serial again."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter

import pytest
import zarr

import jobs.runner as runner
import pipeline.engine as engine
from jobs.runner import job_plan, resolve_model, run_spec
from jobs.spec import parse_spec
from pipeline.errors import SpecError
from pipeline.synth.land_cover import land_cover
from tests.archive import spec_dict
from tests.jobs.test_run_local import reference_labels

pytestmark = pytest.mark.integration

WAIT_S = 60.0


def _one_scene(root, h=520, w=610):
    root.mkdir(parents=True)
    arr = zarr.create_array(store=str(root / "scene.zarr"), shape=(h, w, 3), chunks=(256, 256, 3), dtype="uint8")
    arr[:] = land_cover(0, 0, h, w, seed=11)


def test_blocks_write_their_masks_while_other_blocks_run_and_give_the_same_masks(tmp_path, ray_cluster):
    _one_scene(tmp_path / "in")
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiling__chunk=64,
                                tiling__tiles_per_call=4, tiling__batch=1))
    labels_dir = tmp_path / "out" / "scene.zarr" / "labels" / "segmentation" / "0" / "c"
    seen = []

    class Watch:
        def phase(self, name):
            return contextlib.nullcontext()

        def batch(self, result):  # a block is back: how many mask chunks are on disk now
            seen.append(sum(1 for p in labels_dir.rglob("*") if p.is_file()) if labels_dir.exists() else 0)

    [result] = run_spec(spec, events=Watch())
    assert result.status == "ok"
    total = sum(1 for p in labels_dir.rglob("*") if p.is_file())  # ≤ 9 × 10: chunks of class 0 only are not stored
    assert len(seen) > 3 and 0 < seen[0] < total, seen  # the first block's chunks, written with it
    assert seen == sorted(seen) and seen[-1] == total

    group = str(tmp_path / "out" / "scene.zarr")
    labels = zarr.open_array(f"{group}/labels/segmentation/0", mode="r")[:]
    agree = (labels == reference_labels(spec, group)).mean()
    assert agree > 0.999, agree  # float32 blend vs the float64 reference: exact ties only


def test_the_pool_starts_while_the_first_image_is_prepared(tmp_path, ray_cluster, monkeypatch):
    _one_scene(tmp_path / "in", 200, 230)
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "out")))
    pool_started, seen = threading.Event(), []
    prepare, start = engine.JobSteps.prepare_image, runner.JobWorkers.start

    def slow_prepare(steps, work):
        seen.append(pool_started.wait(WAIT_S))  # the pool must start without waiting for this
        return prepare(steps, work)

    def recording_start(self):
        pool_started.set()
        return start(self)

    monkeypatch.setattr(engine.JobSteps, "prepare_image", slow_prepare)
    monkeypatch.setattr(runner.JobWorkers, "start", recording_start)
    [result] = run_spec(spec)
    assert result.status == "ok" and seen == [True]


def test_the_workers_are_released_before_the_last_image_is_blended(tmp_path, ray_cluster, monkeypatch):
    root = tmp_path / "in"
    root.mkdir()
    for i, (h, w) in enumerate([(200, 230), (150, 170)]):
        arr = zarr.create_array(store=str(root / f"s{i}.zarr"), shape=(h, w, 3), chunks=(128, 128, 3), dtype="uint8")
        arr[:] = land_cover(0, 0, h, w, seed=i)
    spec = parse_spec(spec_dict(str(root), str(tmp_path / "out")))
    released, seen = threading.Event(), Counter()
    finish, release = engine.JobSteps.finish_image, runner.JobWorkers.release

    def waiting_finish(steps, work):
        if work.ref.name == "s1":  # the last image: its blend waits until the workers are gone
            seen["released first"] += released.wait(WAIT_S)
        return finish(steps, work)

    def recording_release(self):
        release(self)
        released.set()

    monkeypatch.setattr(engine.JobSteps, "finish_image", waiting_finish)
    monkeypatch.setattr(runner.JobWorkers, "release", recording_release)
    results = run_spec(spec)
    assert [r.status for r in results] == ["ok", "ok"]
    assert seen["released first"] == 1
    report = (tmp_path / "out" / "report.json").read_text()
    assert '"workers"' in report and "worker-" in report  # where they ran was asked before they stopped


def test_the_embedded_cluster_is_sized_before_ray_starts(tmp_path, monkeypatch):
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), resources__workers=3,
                                cluster__local_gpus=2))
    plan = job_plan(spec, resolve_model(spec), None)
    monkeypatch.setattr(runner.ray, "is_initialized", lambda: False)  # as in a fresh `gigaseg run`
    monkeypatch.setattr(runner, "start_ray", lambda *a, **k: pytest.fail("Ray started before the check"))
    with pytest.raises(SpecError) as err:
        runner.JobWorkers(spec, plan)
    assert "3 workers × gpus_per_worker 1 = 3 GPUs but the Ray cluster has 2" in str(err.value)
