"""MagNet: the pure pieces, and a tiled run through the pipeline against the whole-image algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from models import magnet as mg
from pipeline.magnet import MagnetConfig, error_block, threshold_from_histogram, _histogram


def test_certainty_uncertainty_error_score():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]).T.reshape(1, 3, 1, 2)  # (B, C, H, W)
    assert torch.allclose(mg.certainty(p)[0, 0], torch.tensor([0.5, 0.0]))
    assert torch.allclose(mg.uncertainty(p)[0, 0], torch.tensor([0.5, 1.0]))
    sure = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1).expand(1, 3, 1, 2)
    e = mg.error_score(sure, p)
    assert torch.allclose(e[0, 0], torch.tensor([0.5, 1.0])), "uncertain before, confident after → highest"
    assert np.allclose(error_block(sure[0].numpy(), p[0].numpy()), e[0].numpy())


def test_pixels_uncertain_before_and_confident_after_are_chosen_first():
    rng = np.random.default_rng(0)
    before = rng.dirichlet(np.ones(4), size=(32, 32)).transpose(2, 0, 1).astype(np.float32)
    after = rng.dirichlet(np.ones(4) * 0.3, size=(32, 32)).transpose(2, 0, 1).astype(np.float32)
    e = error_block(after, before)
    t = mg.topk_threshold(e, 100)
    chosen = e >= t
    cert_after = np.sort(after, 0)[-1] - np.sort(after, 0)[-2]
    cert_before = np.sort(before, 0)[-1] - np.sort(before, 0)[-2]
    assert cert_after[chosen].mean() > cert_after[~chosen].mean()
    assert cert_before[chosen].mean() < cert_before[~chosen].mean()


@pytest.mark.parametrize("k", [0, 1, 37, 500, 1024])
def test_histogram_threshold_equals_topk_and_honours_the_count(k):
    rng = np.random.default_rng(k)
    e = rng.random((32, 32)).astype(np.float16).astype(np.float32)
    t_hist = threshold_from_histogram(_histogram(e)[0, 0], k)
    assert t_hist == mg.topk_threshold(e, k)
    if k:
        chosen = int((e >= t_hist).sum())
        ties = int((e == t_hist).sum())
        assert k <= chosen <= k + ties - 1, "the count is honoured up to ties at the threshold"


def test_median_filter_matches_brute_force():
    x = np.random.default_rng(1).random((23, 17)).astype(np.float32)
    got = mg.median_filter(x, 5)
    padded = np.pad(x, 2, mode="edge")
    ref = np.array([[np.median(padded[i : i + 5, j : j + 5]) for j in range(17)] for i in range(23)])
    np.testing.assert_allclose(got, ref)
    with pytest.raises(ValueError, match="odd"):
        mg.median_filter(x, 4)


def test_refiner_shapes_and_checkpoint_round_trip():
    data = mg.seeded_refiner(3, seed=1, width=16)
    assert data == mg.seeded_refiner(3, seed=1, width=16)
    refiner = mg.load_refiner(data, 3)
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert refiner(a, b).shape == (2, 3, 32, 32)
    from pipeline.errors import CheckpointError

    with pytest.raises(CheckpointError, match="3 classes but the segmenter predicts 4"):
        mg.load_refiner(data, 4)
    with pytest.raises(CheckpointError):
        mg.load_refiner(b"garbage-bytes-not-safetensors", 3)


def test_config_counts_and_levels():
    cfg = MagnetConfig(scales=3, replace=0.5, median=3)
    assert cfg.levels() == (2, 1, 0) and cfg.count(10, 10) == 50
    assert MagnetConfig(replace=30).count(4, 4) == 16
    with pytest.raises(ValueError):
        MagnetConfig(scales=1)


@pytest.mark.integration
def test_tiled_magnet_matches_the_whole_image_algorithm(tmp_path, ray_cluster):
    """A tiled MagNet run (3 scales, 256² tiles, 50 % overlap) vs the same algorithm on whole arrays.

    The networks are trained for a few seconds (``tests/trained.py``) so their argmax is decisive: with
    untrained weights the probabilities are near uniform and any difference at all flips labels.
    What may differ: near tile borders a tile's convolutions see their own padding where the whole-image
    run sees neighbours (the seam effect, damped by the blend), so R and E differ slightly there, and a
    pixel whose E sits at the global threshold can be replaced in one run and not the other.
    """
    from jobs.demo import land_cover
    from jobs.runner import resolve_model, run_spec
    from jobs.spec import parse_spec
    from models.checkpoint import load_checkpoint
    from pipeline.magnet import whole_image
    from tests.archive import spec_dict

    from tests.trained import tiny_magnet

    ckpt, refiner_bytes = tiny_magnet()
    (tmp_path / "model.safetensors").write_bytes(ckpt)
    (tmp_path / "refiner.safetensors").write_bytes(refiner_bytes)
    (tmp_path / "in").mkdir()
    zarr.create_array(store=str(tmp_path / "in" / "scene.zarr"), shape=(1024, 1024, 3), chunks=(256, 256, 3),
                      dtype="uint8")[:] = land_cover(0, 0, 1024, 1024, seed=4)
    spec = parse_spec(spec_dict(
        str(tmp_path / "in"), str(tmp_path / "out"), model__framework="magnet", model__name="fpn_resnet10",
        model__classes=None, model__checkpoint=str(tmp_path / "model.safetensors"),
        model__magnet={"scales": 3, "replace": 0.75, "median": 3, "refiner": str(tmp_path / "refiner.safetensors")},
        tiling__tile=256, tiling__overlap=128, tiling__margin=64, tiling__chunk=256,
    ))
    [result] = run_spec(spec)
    assert result.status == "ok", result.error
    assert result.tiles == 2**2 + 4**2 + 8**2  # ⌈(H + 2·64 − 128)/128⌉² for H = 256, 512, 1024
    tiled = zarr.open_array(str(tmp_path / "out" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]

    model = resolve_model(spec)
    segmenter, info = load_checkpoint(model.checkpoint)
    refiner = mg.load_refiner(model.refiner, 4)
    group = zarr.open_group(str(tmp_path / "out" / "scene.zarr"), mode="r")
    levels = [np.asarray(group[str(level)][:]) for level in range(3)]
    whole = whole_image(levels, segmenter, refiner, MagnetConfig(scales=3, replace=0.75, median=3),
                        margin=64, normalization=info.normalization).argmax(0)
    agree = (tiled == whole).mean()
    assert agree >= 0.999, f"tiled and whole-image MagNet agree on {agree:.4%} of pixels"
    assert len(np.unique(whole)) >= 3, "a near one-class result would make the comparison vacuous"
