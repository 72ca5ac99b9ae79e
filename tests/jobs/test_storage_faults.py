"""Storage faults on S3, through the fault proxy (``tests/faults_s3.py``) in front of moto: transient faults on
inputs and outputs leave the masks bit-identical to a clean run's and are counted per image; faults that do not
go away fail the image (or stop the job before any work) with the URL and the cause, and what was finished stays
finished."""

from __future__ import annotations

import json

import numpy as np
import pytest
import s3fs
import zarr
from zarr.storage import FsspecStore

from jobs.progress import ProgressBar
from jobs.runner import run_spec
from jobs.spec import parse_spec
from pipeline.errors import OutputUnwritableError
from pipeline.synth.land_cover import land_cover
from tests.archive import spec_dict
from tests.faults_s3 import FaultProxy, FaultRule
from tests.jobs.torn_run import run

pytestmark = pytest.mark.integration

ARRAYS = ("labels/segmentation/0", "labels/segmentation/1", "confidence")


def _upload_archive(tmp_path, bucket, options) -> None:
    """Two small images on S3 (and in ``tmp_path/in``): a Zarr array (read in place) and a tiled TIFF (read by byte
    ranges)."""
    import tifffile

    root = tmp_path / "in"
    root.mkdir()
    arr = zarr.create_array(store=str(root / "a.zarr"), shape=(384, 448, 3), chunks=(128, 128, 3), dtype="uint8")
    arr[:] = land_cover(0, 0, 384, 448, seed=21)
    tifffile.imwrite(root / "b.tif", land_cover(0, 0, 256, 320, seed=22), bigtiff=True, tile=(128, 128))
    s3fs.S3FileSystem(**options).put(str(root) + "/", f"{bucket}/archive/", recursive=True)


def _spec_dict(inputs: str, output: str, options: dict, **overrides) -> dict:
    return spec_dict(inputs, output, inputs__storage_options=options, output__storage_options=options,
                     output__extras=["confidence"], tiling__tiles_per_call=9, tiling__chunk=128, resources__workers=1,
                     **overrides)


def _spec(bucket: str, output: str, endpoint: str, **overrides):
    return parse_spec(_spec_dict(f"s3://{bucket}/archive", f"s3://{bucket}/{output}", {"endpoint_url": endpoint},
                                 **overrides))


def _read(bucket: str, output: str, name: str, path: str, endpoint: str) -> np.ndarray:
    store = FsspecStore.from_url(f"s3://{bucket}/{output}/{name}.zarr/{path}",
                                 storage_options={"endpoint_url": endpoint}, read_only=True)
    return zarr.open_array(store=store, mode="r")[:]


def test_transient_faults_on_every_kind_of_request_leave_the_output_identical(tmp_path, s3_bucket, s3_endpoint,
                                                                              ray_cluster):
    bucket, options = s3_bucket
    _upload_archive(tmp_path, bucket, options)
    # the reference: the same job on local disk, without Ray (the block worker in this process)
    clean = run(_spec_dict(str(tmp_path / "in"), str(tmp_path / "clean"), {}))
    assert [r.status for r in clean] == ["ok", "ok"] and all(r.retries == 0 for r in clean)

    # about 5 % of all requests fail (SlowDown, 500, a reset mid-body or before the answer), 2 % are slow
    rules = (FaultRule("slowdown", 0.02), FaultRule("error", 0.015), FaultRule("reset", 0.015),
             FaultRule("delay", 0.02, delay_s=0.05))
    with FaultProxy(s3_endpoint, seed=19, rules=rules) as proxy:
        results = run_spec(_spec(bucket, "masks", proxy.url))
        report = json.loads(s3fs.S3FileSystem(**options).cat(f"{bucket}/masks/report.json"))

    assert [(r.name, r.status) for r in results] == [("a", "ok"), ("b", "ok")], [r.error for r in results]
    faults = {fault for fault, _ in proxy.injected}
    kinds = {kind for fault, kind in proxy.injected if fault != "delay"}
    assert {"slowdown", "error", "reset", "delay"} <= faults and {"GET", "PUT", "LIST"} <= kinds, proxy.injected
    for name in ("a", "b"):
        for path in ARRAYS:
            want = zarr.open_array(str(tmp_path / "clean" / f"{name}.zarr" / path), mode="r")[:]
            assert np.array_equal(_read(bucket, "masks", name, path, s3_endpoint), want), f"{name}: {path} differs"
    # every fault was retried; what botocore and gigaseg retried is counted (aiohttp re-sends an idempotent request
    # on a reused connection closed before any answer by itself, unseen, so the count may be below the faults)
    assert all(r.retries > 0 for r in results), [(r.name, r.retries) for r in results]
    assert [e["retries"] for e in report["images"]] == [r.retries for r in results]
    assert report["totals"]["retries"] >= sum(r.retries for r in results)
    assert 0.5 * proxy.faults() <= report["totals"]["retries"] <= proxy.faults()


def test_an_output_that_denies_writes_stops_the_job_before_any_work(tmp_path, s3_bucket, s3_endpoint, capsys):
    from jobs.cli import main

    bucket, options = s3_bucket
    _upload_archive(tmp_path, bucket, options)
    deny = FaultRule("forbidden", 1.0, frozenset({"PUT", "POST", "DELETE"}), prefix=f"{bucket}/masks/")
    with FaultProxy(s3_endpoint, rules=(deny,)) as proxy:
        with pytest.raises(OutputUnwritableError, match=rf"s3://{bucket}/masks.*Access Denied"):
            run_spec(_spec(bucket, "masks", proxy.url))
        spec_path = tmp_path / "job.yaml"
        spec_path.write_text(json.dumps(_spec(bucket, "masks", proxy.url).model_dump(mode="json")))
        assert main(["run", str(spec_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"s3://{bucket}/masks" in err[0] and "Access Denied" in err[0], err
    assert proxy.injected[("forbidden", "PUT")] == 2, "one PUT each (the lease), nothing after it"
    assert not s3fs.S3FileSystem(**options).exists(f"{bucket}/masks/report.json")


class _OnImage(ProgressBar):
    """Calls ``hook`` with each finished image's result (the engine reports images in input order)."""

    def __init__(self, hook) -> None:
        super().__init__()
        self.hook = hook

    def end_image(self, result) -> None:
        super().end_image(result)
        self.hook(result)


def test_a_bucket_that_disappears_fails_the_image_and_keeps_what_was_finished(tmp_path, s3_bucket, s3_endpoint,
                                                                             ray_cluster):
    bucket, options = s3_bucket
    _upload_archive(tmp_path, bucket, options)
    gone = FaultRule("no_bucket", 1.0, prefix=f"{bucket}/")
    with FaultProxy(s3_endpoint) as proxy:
        # one image at a time (fail_fast), and the bucket is gone once the first one is finished
        spec = _spec(bucket, "masks", proxy.url, failure__mode="fail_fast")
        results = run_spec(spec, progress=_OnImage(lambda r: proxy.set_rules(gone)))
        assert [(r.name, r.status) for r in results] == [("a", "ok"), ("b", "failed")]
        error = results[1].error
        assert f"s3://{bucket}/" in error and "does not exist (NoSuchBucket)" in error, error
        assert proxy.injected[("no_bucket", "GET")] >= 1
        first = _read(bucket, "masks", "a", "labels/segmentation/0", s3_endpoint)

        proxy.set_rules()  # the bucket is back: the rerun skips the finished image and does the other
        rerun = run_spec(spec, force=True)  # the lease of the run that lost its bucket is still in moto
    assert [(r.name, r.status) for r in rerun] == [("a", "skipped"), ("b", "ok")]
    assert np.array_equal(_read(bucket, "masks", "a", "labels/segmentation/0", s3_endpoint), first)
