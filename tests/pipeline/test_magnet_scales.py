"""MagNet's scales as fractions of the image's size (pipeline/frameworks/magnet_scales.py): the resizes against
F.interpolate, the stages' geometry, the spec, and whole runs against the reference's algorithm on whole arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from jobs.spec import MagnetSpec
from pipeline.frameworks import magnet_scales as ms
from pipeline.frameworks.magnet_maps import MagnetConfig, footprint
from pipeline.plan import ArrayRef
from pipeline.pyramid import Pyramid
from pipeline.reader import upsample2x_window
from pipeline.row_reader import upsample2x_rows, upsample_source
from pipeline.tiling import Window


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference's image at a scale: bilinear (align_corners=False, no antialias), rounded to uint8."""
    x = F.interpolate(torch.from_numpy(image).float()[None], size=size, mode="bilinear", align_corners=False)
    return (x[0] + 0.5).floor().clamp(0, 255).to(torch.uint8).numpy()


@pytest.mark.parametrize(("coarse", "fine"), [((30, 26), (70, 61)), ((45, 40), (60, 52)), ((20, 24), (40, 48))])
def test_map_resize_is_bilinear_by_the_ratio_of_the_sizes(coarse, fine):
    """Windows of the map resized on its rows (mirrored past the stage, as tiles see it) equal F.interpolate of
    the whole map; ×2 between pyramid-level sizes as before."""
    prev = np.random.default_rng(1).random((3, *coarse)).astype(np.float32)
    whole = F.interpolate(torch.from_numpy(prev)[None], size=fine, mode="bilinear", align_corners=False)[0].numpy()
    for win in (Window(0, 0, *fine), Window(5, 7, 20, 30), Window(-8, -6, 24, 24), Window(fine[0] - 10, 3, 20, 16)):
        (r0, r1), (c0, c1) = (upsample_source((win.y0, win.y1), fine[0], coarse[0]),
                              upsample_source((win.x0, win.x1), fine[1], coarse[1]))
        got = upsample2x_rows(torch.from_numpy(prev[:, r0:r1, c0:c1]), (r0, c0), coarse, fine, win).numpy()
        np.testing.assert_array_equal(got, upsample2x_window(prev, coarse, fine, win))
        iy = np.abs(np.arange(win.y0, win.y1))
        iy = np.where(iy >= fine[0], 2 * fine[0] - 2 - iy, iy)
        ix = np.abs(np.arange(win.x0, win.x1))
        ix = np.where(ix >= fine[1], 2 * fine[1] - 2 - ix, ix)
        np.testing.assert_allclose(got, whole[:, iy][:, :, ix], atol=1e-6)


def test_footprint_covers_what_the_resize_reads_of_the_map():
    assert footprint(Window(64, 64, 64, 64), (256, 256)) == Window(32, 32, 32, 32)  # pyramid levels: ÷ 2
    assert footprint(Window(64, 64, 64, 64), (256, 256), (128, 128)) == Window(32, 32, 32, 32)
    assert footprint(Window(64, 0, 64, 64), (192, 192), (64, 64)) == Window(21, 0, 22, 22)  # ⌊64/3⌋, ⌈128/3⌉
    assert footprint(Window(128, 128, 128, 128), (192, 200), (64, 70)) == Window(42, 44, 22, 26)  # clipped


def _image_ref(tmp_path, image: np.ndarray, chunk: int) -> ArrayRef:
    zarr.create_array(store=str(tmp_path / "src.zarr"), shape=image.shape, chunks=(image.shape[0], chunk, chunk),
                      dtype="uint8")[:] = image
    return ArrayRef(str(tmp_path / "src.zarr"), "", "cyx", image.shape[1:])


@pytest.mark.parametrize("size", [(37, 41), (150, 170), (64, 45)])
def test_resized_image_is_interpolate_chunk_by_chunk(tmp_path, size):
    image = np.random.default_rng(2).integers(0, 256, (3, 100, 90), dtype=np.uint8)
    image[:, 40:60] = 200  # flat runs, as images have
    source = _image_ref(tmp_path, image, 32)
    outs = []
    for chunk in (16, 256):
        dst = ArrayRef(str(tmp_path / f"maps{chunk}"), ms.IMAGE, "cyx", size)
        stage = ms.ResizedStage(0, dst, None, dst.group_url, 3, source=source, image_chunk=chunk)
        ms.make_image(stage, chunk, "sync")
        outs.append(zarr.open_array(str(tmp_path / f"maps{chunk}" / ms.IMAGE), mode="r")[:])
    np.testing.assert_array_equal(outs[0], outs[1])
    want = _resized(image, size)
    assert np.abs(outs[0].astype(int) - want).max() <= 1 and (outs[0] == want).mean() > 0.999


def test_fractions_read_pyramid_levels_where_they_are_and_resize_the_nearest_finer_one():
    shapes = ((601, 500), (301, 250), (151, 125))
    pyramid = Pyramid("mem://p", ("0", "1", "2"), shapes, "cyx", False)
    count = ms.stage_scales(MagnetConfig(scales=3), pyramid)
    assert ms.stage_scales(MagnetConfig(scales=(0.25, 0.5, 1.0)), pyramid) == count  # the count form, level for level
    assert [(s.level, s.shape) for s in count] == [(2, (151, 125)), (1, (301, 250)), (0, (601, 500))]
    got = ms.stage_scales(MagnetConfig(scales=(0.1, 0.3, 0.75, 1.0)), pyramid)
    # 0.1: the coarsest level at least as fine is 3, absent: the last there is (2); sizes round half up
    assert got == [ms.StageScale(2, (60, 50), False), ms.StageScale(1, (180, 150), False),
                   ms.StageScale(0, (451, 375), False), ms.StageScale(0, (601, 500), True)]
    assert MagnetConfig(scales=(0.1, 0.3, 0.75, 1.0)).levels() == (3, 1, 0, 0)
    quarter = Pyramid("mem://q", ("0", "1"), ((600, 500), (150, 125)), "cyx", True)  # an OME-Zarr ×4 pyramid
    assert ms.stage_scales(MagnetConfig(scales=(0.5, 1.0)), quarter)[0] == ms.StageScale(0, (300, 250), False)
    assert ms.stage_scales(MagnetConfig(scales=(0.25, 1.0)), quarter)[0] == ms.StageScale(1, (150, 125), True)
    with pytest.raises(ValueError, match="strictly increasing"):
        MagnetConfig(scales=(0.5, 0.5, 1.0))


def test_fingerprint_of_the_count_form_is_unchanged_and_levels_built_are_the_ones_read():
    import json

    from pipeline.frameworks.magnet import Magnet
    from pipeline.plan import WeightsRef

    def magnet(scales):
        return Magnet(WeightsRef("m", "a"), WeightsRef("r", "b"), MagnetConfig(scales=scales))

    assert magnet(3).fingerprint() == {"framework": "magnet", "maps": 2, "checkpoint": "a", "refiner": "b",
                                       "scales": 3, "replace": 0.75, "median": 5, "patches": None}
    fractions = magnet([0.1, 0.3, 1]).fingerprint()
    assert json.loads(json.dumps(fractions))["scales"] == [0.1, 0.3, 1.0]
    assert magnet(3).levels(2) == {0, 1} and magnet([0.1, 0.3, 1]).levels(3) == {2, 1, 0}
    assert magnet([0.1, 0.3, 1]).levels(1) == {0}


def test_spec_scales_as_fractions():
    assert MagnetSpec(scales=[0.25, 0.6, 1]).scales == [0.25, 0.6, 1.0]
    assert MagnetSpec(scales=[0.3, 0.6, 1.0], refiner=["a", "b"]).refiner == ["a", "b"]
    for bad, message in (([0.5, 0.9], "the last 1"), ([0.6, 0.5, 1.0], "increase strictly"), ([1.0], "2 to 12"),
                         ([0, 1.0], r"in \(0, 1\]"), (1, "count of stages"), ("x", "count of stages")):
        with pytest.raises(ValueError, match=message):
            MagnetSpec(scales=bad)
    with pytest.raises(ValueError, match="3 refiners for 2 refinement stages"):
        MagnetSpec(refiner=["a", "b", "c"], scales=[0.3, 0.6, 1.0])


def _run(tmp_path, name: str, image: np.ndarray, magnet: dict, **tiling):
    from jobs.runner import run_spec
    from jobs.spec import parse_spec
    from tests.archive import spec_dict

    if not (tmp_path / "in").exists():
        (tmp_path / "in").mkdir()
        zarr.create_array(store=str(tmp_path / "in" / "scene.zarr"), shape=image.shape, chunks=(128, 128, 3),
                          dtype="uint8")[:] = image
    overrides = {f"tiling__{k}": v for k, v in tiling.items()}
    extra = {k: v for k, v in magnet.items() if k.startswith("model__")}
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / name), model__framework="magnet",
                                model__magnet={k: v for k, v in magnet.items() if not k.startswith("model__")},
                                output__extras=["confidence", "probabilities"], **overrides, **extra))
    [result] = run_spec(spec)
    assert result.status == "ok", result.error
    return zarr.open_group(str(tmp_path / name / "scene.zarr"), mode="r")


@pytest.mark.integration
def test_fractions_at_pyramid_levels_equal_the_count_form(tmp_path, ray_cluster):
    from pipeline.synth.land_cover import land_cover

    image = land_cover(0, 0, 300, 280, seed=6)
    tiling = {"tile": 64, "overlap": 16, "chunk": 128}
    count = _run(tmp_path, "count", image, {"scales": 2, "median": 3}, **tiling)
    fractions = _run(tmp_path, "fractions", image, {"scales": [0.5, 1.0], "median": 3}, **tiling)
    for path in ("labels/segmentation/0", "confidence", "probabilities"):
        np.testing.assert_array_equal(count[path][:], fractions[path][:], err_msg=path)


@pytest.mark.integration
def test_fractions_match_the_references_algorithm(tmp_path, ray_cluster):
    """``scales: [0.25, 0.75, 1.0]`` with ``procedure: reference`` on a 256² image (one pyramid level: stages 0
    and 1 resized from it) against the reference's test loop on whole arrays, each scale ``F.interpolate``d from
    the image, the maps ``F.interpolate``d to the next scale."""
    from models import magnet as mg
    from models.checkpoint import load_checkpoint
    from pipeline.synth.land_cover import land_cover
    from tests.pipeline.test_magnet_reference import _reference_magnet, _sensitive_models

    ckpt, first, second = _sensitive_models()
    for name, data in (("model", ckpt), ("r1", first), ("r2", second)):
        (tmp_path / f"{name}.safetensors").write_bytes(data)
    image = land_cover(0, 0, 256, 256, seed=4)
    magnet = {"scales": [0.25, 0.75, 1.0], "median": 3, "procedure": "reference",
              "refiner": [str(tmp_path / "r1.safetensors"), str(tmp_path / "r2.safetensors")],
              "model__name": "fpn_resnet10", "model__classes": None,
              "model__checkpoint": str(tmp_path / "model.safetensors")}
    out = _run(tmp_path, "out", image, magnet, tile=64, overlap=0, margin=0, chunk=128)
    tiled = out["labels/segmentation/0"][:]
    chw = image.transpose(2, 0, 1)
    scales = [chw, _resized(chw, (192, 192)), _resized(chw, (64, 64))]  # fine to coarse, as _reference_magnet reads
    segmenter, info = load_checkpoint(ckpt)
    with torch.no_grad():
        expected = _reference_magnet(scales, segmenter, [mg.load_refiner(d, 4) for d in (first, second)],
                                     info.normalization, 64, 3).argmax(0).numpy()
        coarse = _reference_magnet(scales[2:], segmenter, [], info.normalization, 64, 3)[None]
        coarse = F.interpolate(coarse, size=(256, 256), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    agree = (tiled == expected).mean()
    assert agree >= 0.999, f"tiled fractions and the reference's algorithm agree on {agree:.4%}"
    assert len(np.unique(expected)) >= 2 and (expected != coarse).mean() > 0.01, "the refinement changed little"


@pytest.mark.integration
def test_masks_at_fractions_do_not_depend_on_the_blocks(tmp_path, ray_cluster):
    """Resized stages (ratios 7/3 and 10/7), MagNet-Fast's footprints on them and the median's halo: one block per
    stage against blocks of one chunk. The labels bit for bit; the probabilities to a float16 step, as a block's
    tiles run in batches of another size, where CPU convolutions round differently (~4e-7; the count form shows
    it too, e.g. at tile 64)."""
    from pipeline.synth.land_cover import land_cover

    image = land_cover(0, 0, 520, 440, seed=8)
    outs = [_run(tmp_path, name, image, {"scales": [0.3, 0.7, 1.0], "median": 5, "patches": 0.6},
                 tile=128, overlap=32, chunk=128, tiles_per_call=per_call)
            for name, per_call in (("one", "auto"), ("many", 1))]
    np.testing.assert_array_equal(outs[0]["labels/segmentation/0"][:], outs[1]["labels/segmentation/0"][:])
    for path in ("confidence", "probabilities"):
        a, b = outs[0][path][:].astype(np.float32), outs[1][path][:].astype(np.float32)
        np.testing.assert_allclose(a, b, atol=1e-3, err_msg=path)
        assert (a == b).mean() > 0.9999, path
    assert len(np.unique(outs[0]["labels/segmentation/0"][:])) >= 2
