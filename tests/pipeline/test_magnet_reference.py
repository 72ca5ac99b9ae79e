"""MagNet's ``procedure: reference`` (pipeline/frameworks/magnet_reference.py): each piece against the torch
operation the reference uses, and a tiled run against the reference's algorithm written in torch on whole arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from jobs.spec import MagnetSpec
from models import magnet as mg
from pipeline.frameworks import magnet_reference as ref
from pipeline.frameworks.magnet import MagnetModel, whole_pass
from pipeline.tiling import TileGrid, Window


@pytest.mark.parametrize(("out", "size"), [(508, 2448), (612, 1224), (1224, 612), (2448, 508), (7, 7), (128, 256)])
def test_nearest_index_is_torch_nearest(out, size):
    x = torch.arange(size, dtype=torch.float32)[None, None, None]
    expected = F.interpolate(x, size=(1, out), mode="nearest")[0, 0, 0].long().numpy()
    np.testing.assert_array_equal(ref.nearest_index(out, size), expected)


def _torch_median_view(e: torch.Tensor, view: tuple[int, int], k: int) -> torch.Tensor:
    """The reference's smoothing (test.py): nearest to the view, MedianBlur (conv with zero padding, then
    torch.median over the k² values), nearest back."""
    h, w = e.shape
    small = F.interpolate(e[None, None], size=view)
    patches = F.unfold(small, k, padding=k // 2)  # (1, k², view) with zeros past the edge
    med = patches.median(dim=1).values.reshape(1, 1, *view)
    return F.interpolate(med, size=(h, w))[0, 0]


def test_median_view_is_the_references_smoothing():
    e = torch.rand(97, 130)
    for view, k in (((40, 52), 5), ((97, 130), 3), ((200, 200), 7)):
        got = ref.median_view(e.numpy(), view, k, "zero")
        np.testing.assert_array_equal(got, _torch_median_view(e, view, k).numpy())
    edge = ref.median_view(e.numpy(), (97, 130), 3, "edge")
    np.testing.assert_array_equal(edge, mg.median_filter(e.numpy(), 3))  # a view of its own size: the plain median


def _blocks(h: int, w: int, side: int, halo: int):
    for y in range(0, h, side):
        for x in range(0, w, side):
            own = Window(y, x, min(side, h - y), min(side, w - x))
            yield own, Window(y - halo, x - halo, own.h + 2 * halo, own.w + 2 * halo).clip(h, w)


def _stream(median_rows, e: torch.Tensor, blend: Window, own: Window, rng) -> np.ndarray:
    """Feed ``blend``'s rows of ``e`` in bands of random heights; the own rows' medians, assembled."""
    out = np.full((own.h, own.w), np.nan, np.float32)
    y = blend.y0
    while y < blend.y1:
        n = min(int(rng.integers(1, 9)), blend.y1 - y)
        for y0, med in median_rows.add(y, e[y : y + n, blend.x0 : blend.x1]):
            out[y0 - own.y0 : y0 - own.y0 + med.shape[0]] = med.float().numpy()
        y += n
    median_rows.finish()
    return out


@pytest.mark.parametrize(("view", "padding"), [((20, 26), "zero"), ((37, 41), "zero"), ((20, 26), "edge"),
                                               (None, "zero")])
def test_block_medians_equal_the_whole_map_median(view, padding):
    """The reference's medians on a block's streamed rows (a halo of ``view_halo``) equal the whole map's."""
    rng = np.random.default_rng(3)
    e = torch.from_numpy(rng.random((61, 77)).astype(np.float16))
    k = 5
    whole = (ref.median_view(e.float().numpy(), view, k, padding) if view else
             mg.median_filter(e.float().numpy(), k, padding))
    halo = ref.view_halo((61, 77), view, k) if view else k // 2
    factory = ref.MedianFactory(view, padding)
    for own, blend in _blocks(61, 77, 24, halo):
        got = _stream(factory(k, blend, own, torch.device("cpu"), (61, 77)), e, blend, own, rng)
        np.testing.assert_array_equal(got, whole[own.y0 : own.y1, own.x0 : own.x1], err_msg=str(own))


def test_roi_align_crop_is_a_half_pixel_shifted_window():
    """roi_align(aligned=False), one sample per pixel at (i + ½, j + ½): the mean of each 2×2 block of Y_up, the
    last row and column clamped to the image, 0 past it."""
    rng = np.random.default_rng(0)
    prev = rng.random((3, 20, 24)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(prev)[None], scale_factor=2, mode="bilinear", align_corners=False)
    pooled = F.avg_pool2d(F.pad(up, (0, 1, 0, 1), mode="replicate"), 2, stride=1)[0].numpy()
    for win in (Window(0, 0, 16, 16), Window(24, 32, 16, 16), Window(30, 40, 10, 8)):
        got = ref.roi_align_window(prev, (20, 24), (40, 48), win)
        np.testing.assert_allclose(got, pooled[:, win.y0 : win.y1, win.x0 : win.x1], atol=1e-6)
    past = ref.roi_align_window(prev, (20, 24), (40, 48), Window(32, 40, 16, 16))
    np.testing.assert_allclose(past[:, :8, :8], pooled[:, 32:40, 40:48], atol=1e-6)
    assert not past[:, 9:].any() and not past[:, :, 9:].any()  # samples beyond H (y > 40) read 0


class AnySize(torch.nn.Module):
    """A segmenter of any input size whose output at a pixel depends on the whole input (its mean)."""

    def forward(self, x):
        return x[:, :2] + x.mean(dim=(2, 3), keepdim=True)[:, :2]


class FakePredictor:
    def __init__(self):
        self.runner = type("R", (), {"prepare": staticmethod(lambda m: m), "autocast": staticmethod(
            lambda: torch.autocast("cpu", enabled=False)), "tensor": staticmethod(torch.as_tensor)})()
        self.device = torch.device("cpu")
        self.net = AnySize()

    def probabilities(self, tiles):
        return torch.softmax(self.net(tiles.float()), 1)


def test_stage0_whole_pass_runs_on_the_image_alone():
    predictor = FakePredictor()
    tiles = torch.rand(1, 3, 32, 32)
    image = tiles[:, :, 4:24, 6:30]  # a 20 × 24 image inside a 32² tile (mirrored margins around it)
    out = whole_pass(predictor, tiles, np.array([[4, 6, 20, 24]]), 1)
    torch.testing.assert_close(out[:, :, 4:24, 6:30], predictor.probabilities(image))
    torch.testing.assert_close(out[:, :, :4, 6:30], out[:, :, 4:5, 6:30].expand(-1, -1, 4, -1))  # edges replicated
    tiled = predictor.probabilities(tiles)[:, :, 4:24, 6:30]
    assert (tiled - out[:, :, 4:24, 6:30]).abs().max() > 1e-3  # the mirrored margin changed the tiled pass
    rounded = whole_pass(predictor, tiles, np.array([[4, 6, 20, 24]]), 8)  # rounded up to 24 × 24 inside the tile
    torch.testing.assert_close(rounded[:, :, 4:24, 6:30], predictor.probabilities(tiles[:, :, 4:28, 6:30])[..., :20, :])
    assert ref.fits_one_tile(TileGrid(20, 24, 32, 8, margin=4), (20, 24))
    assert not ref.fits_one_tile(TileGrid(40, 24, 32, 8, margin=4), (40, 24))


def test_one_refiner_per_stage():
    predictor = FakePredictor()
    refiners = [lambda f, c, i=i: torch.full_like(f, float(i)) + f for i in range(2)]
    model = MagnetModel(predictor, [torch.nn.Identity(), torch.nn.Identity()])
    model.refiners = refiners
    tiles, up = torch.rand(1, 3, 8, 8), np.random.rand(1, 2, 8, 8).astype(np.float32)
    fine = predictor.probabilities(tiles)
    for stage, i in ((1, 0), (2, 1), (3, 1)):  # stage s runs refiners[min(s, n) − 1], as the reference
        torch.testing.assert_close(model(stage, tiles, [up]), torch.softmax(fine + i, 1))


def test_procedure_reference_sets_every_option_and_each_can_be_overridden():
    spec = MagnetSpec(procedure="reference", crop="exact", median_view=508).model_dump(mode="json")
    assert ref.options_of(spec) == {"median_view": 508, "median_padding": "zero", "crop": "exact", "stage0": "whole",
                                    "patch_choice": "least_uncertain"}
    assert ref.options_of(MagnetSpec().model_dump(mode="json")) == {}
    assert MagnetSpec(refiner=["a", "b"], scales=3).refiner == ["a", "b"]
    with pytest.raises(ValueError, match="3 refiners for 2 refinement stages"):
        MagnetSpec(refiner=["a", "b", "c"], scales=3)


def _reference_magnet(levels, segmenter, refiners, normalization, tile, k, replace=0.75):
    """The reference's test loop (VinAIResearch/MagNet test.py) on whole arrays, in torch, for a crop equal to the
    network input and patches that tile each scale exactly: F.interpolate, roi_align as a 2×2 mean of the
    upsampled map, the median on a tile-sized nearest view with zero padding, topk and scatter."""
    mean = torch.tensor(normalization.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std).view(1, 3, 1, 1)

    def seg(x):
        return torch.softmax(segmenter((torch.from_numpy(x)[None].float() / 255 - mean) / std), 1)

    y = seg(levels[-1])
    for s, level in enumerate(reversed(levels[:-1]), start=1):
        h, w = level.shape[1:]
        up = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        crops = F.avg_pool2d(F.pad(up, (0, 1, 0, 1), mode="replicate"), 2, stride=1)
        r = torch.empty_like(up)
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                window = (slice(None), slice(None), slice(y0, y0 + tile), slice(x0, x0 + tile))
                fine = seg(level[:, y0 : y0 + tile, x0 : x0 + tile])
                r[window] = torch.softmax(refiners[min(s, len(refiners)) - 1](fine, crops[window]), 1)
        e = mg.certainty(r)[0] * mg.uncertainty(up)[0]
        e = _torch_median_view(e, (tile, tile), k)
        idx = torch.topk(e.flatten(), int(h * w * replace)).indices
        y = up.flatten(2)
        y[:, :, idx] = r.flatten(2)[:, :, idx]
        y = y.reshape(up.shape)
    return y[0]


def _sensitive_models() -> tuple[bytes, bytes, bytes]:
    """A seeded segmenter and two seeded refiners whose logits spread over a few units (as trained ones do, not
    saturated, not flat), so that the refinement moves many labels and a misplaced crop or median shows."""
    from models import ModelConfig, build_model
    from models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    config = ModelConfig("fpn_resnet10", 4, width=8)
    segmenter = build_model(config, seed=1).eval()
    with torch.no_grad():
        segmenter.classifier.weight *= 3 / segmenter(x).std()
        p = torch.softmax(segmenter(x), 1)
        refiners = []
        for seed in (5, 6):
            refiner = mg.load_refiner(mg.seeded_refiner(4, seed=seed, width=16), 4)
            refiner.net[-1].weight *= 3 / refiner(p, p.flip(-1)).std()
            refiners.append(mg.save_refiner(refiner, width=16))
    names = [f"c{i}" for i in range(4)]
    return save_checkpoint(None, segmenter, config, names), *refiners


@pytest.mark.integration
def test_tiled_reference_procedure_matches_the_references_algorithm(tmp_path, ray_cluster):
    """``procedure: reference`` through ``gigaseg run`` (3 scales, stage 0 one tile, non-overlapping tiles as the
    reference's patches, two refiners) against ``_reference_magnet``. They differ only where the tiled run's
    float16 maps round the error score across the threshold."""
    from jobs.runner import run_spec
    from jobs.spec import parse_spec
    from models.checkpoint import load_checkpoint
    from pipeline.synth.land_cover import land_cover
    from tests.archive import spec_dict
    from tests.pipeline.fixtures_images import write_ome_zarr

    ckpt, refiner_bytes, second = _sensitive_models()
    (tmp_path / "model.safetensors").write_bytes(ckpt)
    for name, data in (("r1", refiner_bytes), ("r2", second)):
        (tmp_path / f"{name}.safetensors").write_bytes(data)
    image = land_cover(0, 0, 256, 256, seed=4).transpose(2, 0, 1)
    levels = [image, image.reshape(3, 128, 2, 128, 2).mean((2, 4)).round().astype(np.uint8)]
    levels.append(levels[1].reshape(3, 64, 2, 64, 2).mean((2, 4)).round().astype(np.uint8))
    (tmp_path / "in").mkdir()
    write_ome_zarr(tmp_path / "in" / "scene.ome.zarr", levels, chunk=64)
    spec = parse_spec(spec_dict(
        str(tmp_path / "in"), str(tmp_path / "out"), model__framework="magnet", model__name="fpn_resnet10",
        model__classes=None, model__checkpoint=str(tmp_path / "model.safetensors"),
        model__magnet={"scales": 3, "median": 3, "procedure": "reference",
                       "refiner": [str(tmp_path / "r1.safetensors"), str(tmp_path / "r2.safetensors")]},
        tiling__tile=64, tiling__overlap=0, tiling__margin=0, tiling__chunk=128,
    ))
    [result] = run_spec(spec)
    assert result.status == "ok", result.error
    tiled = zarr.open_array(str(tmp_path / "out" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]
    segmenter, info = load_checkpoint(ckpt)
    with torch.no_grad():
        expected = _reference_magnet(levels, segmenter, [mg.load_refiner(d, 4) for d in (refiner_bytes, second)],
                                     info.normalization, 64, 3).argmax(0).numpy()
        coarse = _reference_magnet(levels[2:], segmenter, [], info.normalization, 64, 3)[None]
        coarse = F.interpolate(coarse, size=(256, 256), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    agree = (tiled == expected).mean()
    assert agree >= 0.999, f"tiled reference procedure and the reference's algorithm agree on {agree:.4%}"
    assert len(np.unique(expected)) >= 2 and (expected != coarse).mean() > 0.01, "the refinement changed little"
