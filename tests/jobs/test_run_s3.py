"""The same job with input and output on a real S3-compatible server (moto on 127.0.0.1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import s3fs
import zarr
from zarr.storage import FsspecStore

from jobs.runner import run_spec
from jobs.spec import parse_spec
from tests.archive import spec_dict, write_archive

pytestmark = pytest.mark.integration


def test_s3_job_end_to_end(tmp_path, s3_bucket, ray_cluster):
    bucket, options = s3_bucket
    write_archive(tmp_path / "in")
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(tmp_path / "in") + "/", f"{bucket}/archive/", recursive=True)

    spec = parse_spec(spec_dict(
        f"s3://{bucket}/archive", f"s3://{bucket}/masks",
        inputs__storage_options=options, output__storage_options=options,
    ))
    results = run_spec(spec)
    assert sorted((r.name, r.status) for r in results) == [
        ("photo", "ok"), ("scene", "ok"), ("small", "ok"), ("sub__survey", "ok")]

    fs.invalidate_cache()
    report = json.loads(fs.cat(f"{bucket}/masks/report.json"))
    assert report["totals"]["ok"] == 4
    assert "testing" not in json.dumps(report), "credentials never reach the report"
    store = FsspecStore.from_url(f"s3://{bucket}/masks/scene.zarr/labels/segmentation/0",
                                 storage_options=options, read_only=True)
    labels = zarr.open_array(store=store, mode="r")
    assert labels.shape == (520, 610)

    # the same job on local disk gives the same mask
    local = parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "out")))
    run_spec(local)
    expected = zarr.open_array(str(tmp_path / "out" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")
    assert np.array_equal(labels[:], expected[:])
    assert not fs.exists(f"{bucket}/masks/_work/scene"), "block markers removed once the image is done"


def test_missing_bucket_is_a_clear_error(s3_endpoint, tmp_path):
    from pipeline.errors import InputNotFoundError

    spec = parse_spec(spec_dict("s3://no-such-bucket-xyz/archive", str(tmp_path / "out"),
                                inputs__storage_options={"endpoint_url": s3_endpoint}))
    with pytest.raises(InputNotFoundError, match="no-such-bucket-xyz"):
        run_spec(spec)


def test_s3_magnet_job(tmp_path, s3_bucket, ray_cluster):
    bucket, options = s3_bucket
    write_archive(tmp_path / "in")
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(tmp_path / "in" / "scene.zarr") + "/", f"{bucket}/archive/scene.zarr/", recursive=True)
    spec = parse_spec(spec_dict(
        f"s3://{bucket}/archive", f"s3://{bucket}/masks", inputs__storage_options=options,
        output__storage_options=options, model__framework="magnet", model__magnet={"scales": 2, "median": 3},
    ))
    [result] = run_spec(spec)
    assert result.status == "ok", result.error
    assert result.tiles == 3 * 3 + 6 * 7  # level 1 (260×305) and level 0 (520×610): ⌈(n − 32)/96⌉ per axis
    store = FsspecStore.from_url(f"s3://{bucket}/masks/scene.zarr/labels/segmentation/0",
                                 storage_options=options, read_only=True)
    assert zarr.open_array(store=store, mode="r").shape == (520, 610)


def test_s3_fctl_job(tmp_path, s3_bucket, ray_cluster):
    """FCtL's context reads (pyramid levels 1 and 2 around each tile) from S3 give the local job's mask."""
    bucket, options = s3_bucket
    write_archive(tmp_path / "in")
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(tmp_path / "in" / "scene.zarr") + "/", f"{bucket}/archive/scene.zarr/", recursive=True)
    fctl = {"model__framework": "fctl", "model__fctl": {"contexts": [2, 4], "gamma": 0.5}}
    spec = parse_spec(spec_dict(f"s3://{bucket}/archive", f"s3://{bucket}/masks", inputs__storage_options=options,
                                output__storage_options=options, **fctl))
    [result] = run_spec(spec)
    assert result.status == "ok", result.error
    store = FsspecStore.from_url(f"s3://{bucket}/masks/scene.zarr/labels/segmentation/0",
                                 storage_options=options, read_only=True)
    labels = zarr.open_array(store=store, mode="r")[:]
    run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), inputs__patterns=["*.zarr"], **fctl)))
    expected = zarr.open_array(str(tmp_path / "out" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")
    assert np.array_equal(labels, expected[:])
