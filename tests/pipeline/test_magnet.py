"""MagNet: the pure pieces, and a tiled run through the pipeline against the whole-image algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from models import magnet as mg
from pipeline.frameworks.magnet_maps import (
    MagnetConfig,
    histogram,
    error_block,
    footprint,
    mean_uncertainty,
    select_tiles,
    threshold_from_histogram,
)
from pipeline.tiling import TileGrid, Window


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
    t_hist = threshold_from_histogram(histogram(e), k)
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
    from models.errors import CheckpointError

    with pytest.raises(CheckpointError, match="3 classes but the segmenter predicts 4"):
        mg.load_refiner(data, 4)
    with pytest.raises(CheckpointError):
        mg.load_refiner(b"garbage-bytes-not-safetensors", 3)


def test_residual_refiner_starts_as_the_fine_prediction_and_keeps_its_kind_in_the_checkpoint():
    torch.manual_seed(0)
    fine = torch.softmax(3 * torch.randn(2, 4, 24, 24), dim=1)
    coarse = torch.softmax(torch.randn(2, 4, 24, 24), dim=1)
    residual = mg.Refiner(4, width=8, residual=True).eval()
    np.testing.assert_allclose(torch.softmax(residual(fine, coarse), dim=1).detach(), fine, atol=1e-5)
    plain = mg.Refiner(4, width=8).eval()
    assert (torch.softmax(plain(fine, coarse), dim=1) - fine).abs().max() > 0.05  # the reference's: from noise

    with torch.no_grad():  # a trained residual refiner: its correction survives the checkpoint
        residual.net[-1].weight.normal_()
    again = mg.load_refiner(mg.save_refiner(residual, width=8), 4)
    assert again.residual and not mg.load_refiner(mg.save_refiner(plain, width=8), 4).residual
    torch.testing.assert_close(again(fine, coarse), residual(fine, coarse))

    from safetensors.torch import save  # a checkpoint written before the flag existed is a plain refiner

    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    old = save(state, metadata={"format": mg.REFINER_FORMAT, "num_classes": "4", "width": "8"})
    assert not mg.load_refiner(old, 4).residual


def test_config_counts_and_levels():
    cfg = MagnetConfig(scales=3, replace=0.5, median=3)
    assert cfg.levels() == (2, 1, 0) and cfg.count(10, 10) == 50
    assert MagnetConfig(replace=30).count(4, 4) == 16
    with pytest.raises(ValueError):
        MagnetConfig(scales=1)


def test_fast_counts_scale_with_the_tiles_run():
    cfg = MagnetConfig(replace=0.5, patches=0.25)
    assert cfg.tile_count(64) == 16 and cfg.tile_count(2) == 1  # at least one tile
    assert MagnetConfig(patches=5).tile_count(64) == 5 and MagnetConfig(patches=500).tile_count(64) == 64
    assert MagnetConfig().tile_count(64) == 64
    assert cfg.count(100, 100, share=0.25) == 1250  # the reference: replace · pixels · tiles run / tiles
    assert MagnetConfig(replace=3000).count(100, 100, share=0.25) == 2500
    with pytest.raises(ValueError):
        MagnetConfig(patches=0)


def test_footprint_halves_the_clipped_window():
    assert footprint(Window(-64, 100, 256, 256), (500, 300)) == Window(0, 50, 96, 100)
    assert footprint(Window(10, 11, 5, 5), (500, 300)) == Window(5, 5, 3, 3)


def test_the_most_uncertain_tiles_are_chosen():
    p = np.zeros((3, 4, 6), np.float32)
    p[0] = 1.0  # certain everywhere ...
    p[:, 0:2, 3:6] = 1 / 3  # ... except the top-right, where the classes tie
    assert mean_uncertainty(p[:, 0:2, 3:6]) == pytest.approx(1.0)
    assert mean_uncertainty(p[:, 2:4, 0:3]) == pytest.approx(0.0)
    scores = np.array([[0.1, 0.9, 0.5], [0.9, 0.2, 0.0]])
    assert select_tiles(scores, 2) == ((0, 1), (1, 0))  # ties: the lower index first, returned in grid order
    assert select_tiles(scores, 3) == ((0, 1), (0, 2), (1, 0))


@pytest.mark.integration
@pytest.mark.parametrize("patches", [None, 0.4])
def test_tiled_magnet_matches_the_whole_image_algorithm(tmp_path, ray_cluster, patches):
    """A tiled MagNet run (3 scales, 256² tiles, 50 % overlap) vs the same algorithm on whole arrays.

    With ``patches`` (MagNet-Fast) each refinement stage runs only the 40 % most uncertain tiles; the
    whole-image run applies the refiner's result only inside those tiles' windows.

    The networks are trained briefly (``tests/trained.py``) so their argmax is decisive: with untrained
    weights the probabilities are near uniform and any difference at all flips labels.
    What may differ, and why the bound is about these weights: the segmenter's receptive field is larger
    than a 256² tile, so a tile's prediction of a pixel differs a little from the whole-image one
    wherever the pixel is (not only at tile edges: measured, the mean |ΔE| is the same across a tile),
    and a pixel whose E sits near the global threshold is replaced in one run and not the other. How
    much that moves labels is a property of the weights, so they are stored (``tests/data``), not trained
    here: trained on an AVX2 CPU the same seeded run ends at other weights, which gave 99.75 % (the
    failure on CPUs without avx512_bf16). With the stored weights, both runs are fp32 and the agreement
    was the same to every digit with oneDNN/ATen capped at AVX-512, AVX2 and SSE4.1 (99.935 %, and
    99.884 % with MagNet-Fast).
    """
    from jobs.runner import resolve_model, run_spec
    from jobs.spec import parse_spec
    from models.checkpoint import load_checkpoint
    from pipeline.frameworks.magnet_maps import whole_image
    from pipeline.synth.land_cover import land_cover
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
        model__magnet={"scales": 3, "replace": 0.75, "median": 3, "refiner": str(tmp_path / "refiner.safetensors"),
                       "patches": patches},
        tiling__tile=256, tiling__overlap=128, tiling__margin=64, tiling__chunk=256,
    ))
    [result] = run_spec(spec)
    assert result.status == "ok", result.error
    # ⌈(H + 2·64 − 128)/128⌉² tiles for H = 256, 512, 1024; MagNet-Fast runs 40 % of the refinement stages'
    assert result.tiles == (2**2 + 4**2 + 8**2 if patches is None else 2**2 + round(0.4 * 16) + round(0.4 * 64))
    tiled = zarr.open_array(str(tmp_path / "out" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]

    model = resolve_model(spec)
    segmenter, info = load_checkpoint(model.checkpoint)
    refiner = mg.load_refiner(model.weights["refiner"], 4)
    group = zarr.open_group(str(tmp_path / "out" / "scene.zarr"), mode="r")
    # level 0 is read where it is (the input Zarr, (H, W, 3)); the coarser levels MagNet reads were built
    source = zarr.open_array(str(tmp_path / "in" / "scene.zarr"), mode="r")[:]
    levels = [np.ascontiguousarray(source.transpose(2, 0, 1))] + [np.asarray(group[str(lv)][:]) for lv in (1, 2)]
    grids = [TileGrid(256 * 2**s, 256 * 2**s, 256, 128, margin=64) for s in range(3)]
    whole = whole_image(levels, segmenter, refiner, MagnetConfig(scales=3, replace=0.75, median=3, patches=patches),
                        margin=64, normalization=info.normalization, grids=grids).argmax(0)
    agree = (tiled == whole).mean()
    # MagNet-Fast: at the rim of the chosen tiles one tile's border pixels alone give R (no neighbour to blend
    # with), where its convolutions saw its own padding: a few more pixels differ there (measured 99.88 %)
    bound = 0.999 if patches is None else 0.998
    assert agree >= bound, f"tiled and whole-image MagNet agree on {agree:.4%} of pixels"
    assert len(np.unique(whole)) >= 3, "a near one-class result would make the comparison vacuous"
