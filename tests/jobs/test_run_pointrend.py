"""PointRend end to end through ``run_spec``: a seeded PointRend checkpoint, on local disk, on the moto S3
server, and inside MagNet's stages. No pipeline change: the workers' ``model(x)`` is subdivision inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import s3fs
import zarr
from zarr.storage import FsspecStore

from jobs.runner import run_spec
from jobs.spec import parse_spec
from models import ModelConfig, build_model
from models.checkpoint import save_checkpoint
from tests.archive import spec_dict, write_archive
from tests.jobs.test_run_local import reference_labels

pytestmark = pytest.mark.integration

SHAPES = {"scene": (520, 610), "sub__survey": (300, 420), "small": (200, 260), "photo": (230, 190)}
# 128² tiles: coarse 32², then 64² (4096 cells) and 128² (16384): 1024 points refines a part of each.
CONFIG = ModelConfig("fpn_resnet18", 3, width=8, refine="pointrend", point_channels=16,
                     subdivision_points=1024)


def write_pointrend_checkpoint(path: Path) -> Path:
    save_checkpoint(path, build_model(CONFIG, seed=3).eval(), CONFIG, ["a", "b", "c"])
    return path


def pointrend_spec(inputs: str, output: str, checkpoint: str, **overrides):
    return parse_spec(spec_dict(inputs, output, model__checkpoint=checkpoint, model__classes=None,
                                model__name=CONFIG.name, **overrides))


def test_local_pointrend_job(tmp_path, ray_cluster):
    write_archive(tmp_path / "in")
    ckpt = write_pointrend_checkpoint(tmp_path / "models" / "pointrend.safetensors")
    out = tmp_path / "out"
    spec = pointrend_spec(str(tmp_path / "in"), str(out), str(ckpt))
    results = run_spec(spec)
    assert sorted((r.name, r.status) for r in results) == sorted((n, "ok") for n in SHAPES), results
    for name, shape in SHAPES.items():
        labels = zarr.open_array(str(out / f"{name}.zarr" / "labels" / "segmentation" / "0"), mode="r")
        assert labels.shape == shape
    # the workers ran PointRend: the same as every tile predicted by the checkpoint in this process
    labels = zarr.open_array(str(out / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]
    ref = reference_labels(spec, str(out / "scene.zarr"))
    assert (labels == ref).mean() >= 0.999
    assert len(np.unique(labels)) >= 2


def _upload(tmp_path: Path, bucket: str, options: dict, scene_only: bool = False) -> str:
    """The archive (or only its scene) and a PointRend checkpoint in the bucket; the checkpoint's URL."""
    write_archive(tmp_path / "in")
    fs = s3fs.S3FileSystem(**options)
    if scene_only:
        fs.put(str(tmp_path / "in" / "scene.zarr") + "/", f"{bucket}/archive/scene.zarr/", recursive=True)
    else:
        fs.put(str(tmp_path / "in") + "/", f"{bucket}/archive/", recursive=True)
    ckpt = write_pointrend_checkpoint(tmp_path / "pointrend.safetensors")
    fs.put(str(ckpt), f"{bucket}/models/pointrend.safetensors")
    return f"s3://{bucket}/models/pointrend.safetensors"


def _s3_labels(bucket: str, options: dict, name: str) -> zarr.Array:
    store = FsspecStore.from_url(f"s3://{bucket}/masks/{name}.zarr/labels/segmentation/0",
                                 storage_options=options, read_only=True)
    return zarr.open_array(store=store, mode="r")


def test_s3_pointrend_job(tmp_path, s3_bucket, ray_cluster):
    bucket, options = s3_bucket
    ckpt = _upload(tmp_path, bucket, options)
    spec = pointrend_spec(f"s3://{bucket}/archive", f"s3://{bucket}/masks", ckpt,
                          inputs__storage_options=options, output__storage_options=options)
    results = run_spec(spec)
    assert sorted((r.name, r.status) for r in results) == sorted((n, "ok") for n in SHAPES), results
    for name, shape in SHAPES.items():
        assert _s3_labels(bucket, options, name).shape == shape


def test_s3_pointrend_inside_magnet(tmp_path, s3_bucket, ray_cluster):
    bucket, options = s3_bucket
    ckpt = _upload(tmp_path, bucket, options, scene_only=True)
    spec = pointrend_spec(f"s3://{bucket}/archive", f"s3://{bucket}/masks", ckpt,
                          inputs__storage_options=options, output__storage_options=options,
                          model__framework="magnet", model__magnet={"scales": 2, "median": 3})
    [result] = run_spec(spec)
    assert result.status == "ok", result.error
    assert result.tiles == 3 * 3 + 6 * 7  # level 1 (260×305) and level 0 (520×610)
    assert _s3_labels(bucket, options, "scene").shape == (520, 610)
