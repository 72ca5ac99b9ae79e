"""FCtL through ``gigaseg run``: contexts read by the workers from the pyramid, blended by the spine, locally."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from jobs.runner import resolve_model, run_spec
from jobs.spec import parse_spec
from models.checkpoint import seeded_checkpoint
from models.fctl_checkpoint import seeded_fctl
from pipeline.errors import SpecError
from pipeline.reader import resize_image
from pipeline.synth.land_cover import land_cover
from pipeline.tiling import TileGrid, window_2d
from pipeline.workers.predictor import PredictorConfig, TilePredictor
from tests.archive import spec_dict

SIZE = (600, 700)


def _archive(root):
    root.mkdir(parents=True)
    arr = zarr.create_array(store=str(root / "scene.zarr"), shape=(*SIZE, 3), chunks=(256, 256, 3), dtype="uint8")
    image = land_cover(0, 0, *SIZE, seed=21)
    arr[:] = image
    return image.transpose(2, 0, 1)


def _fctl_spec(inputs, output, **overrides):
    overrides = {"model__fctl": {"contexts": [2, 4], "gamma": 0.5}, **overrides}
    return parse_spec(spec_dict(str(inputs), str(output), model__framework="fctl", **overrides))


def reference_probs(spec, image: np.ndarray) -> np.ndarray:
    """FCtL's own recipe in one process: for each tile the ``c·T`` window around it cut from the whole
    image in memory (zeros outside), box-downsampled ``c×c`` to ``T``, then the spine's blend on a canvas."""
    model = resolve_model(spec)
    predictor = TilePredictor(model.checkpoint, PredictorConfig(precision="fp32"))
    c_, h, w = image.shape
    t = spec.tiling
    grid = TileGrid(h, w, t.tile, t.overlap, *t.offset, margin=t.margin)
    pad = 4 * t.tile
    canvas = np.zeros((3, h + 2 * pad, w + 2 * pad), np.float64)
    canvas[:, pad:pad + h, pad:pad + w] = image
    reflect = np.pad(image, ((0, 0), (t.tile, t.tile), (t.tile, t.tile)), mode="reflect")
    acc = np.zeros((len(model.class_names), h + 2 * t.tile, w + 2 * t.tile))
    wsum = np.zeros((h + 2 * t.tile, w + 2 * t.tile))
    win = window_2d(t.blend, t.tile, t.sigma_scale).astype(np.float64)
    for iy, ix in grid.indices():
        tw = grid.window(iy, ix)
        tile = reflect[:, tw.y0 + t.tile : tw.y1 + t.tile, tw.x0 + t.tile : tw.x1 + t.tile]
        contexts = []
        for c in predictor.contexts:
            r = int(c * t.tile)
            y0 = tw.y0 + t.tile // 2 - r // 2 + pad
            x0 = tw.x0 + t.tile // 2 - r // 2 + pad
            crop = canvas[:, y0 : y0 + r, x0 : x0 + r]
            k = int(c)
            box = crop.reshape(3, t.tile, k, t.tile, k).mean(axis=(2, 4)) if k == c else resize_image(crop, t.tile)
            contexts.append(np.clip(np.rint(box), 0, 255).astype(np.uint8))
        probs = predictor(tile[None], np.stack(contexts)[None])[0]
        sl = (slice(tw.y0 + t.tile, tw.y1 + t.tile), slice(tw.x0 + t.tile, tw.x1 + t.tile))
        acc[:, sl[0], sl[1]] += probs.astype(np.float64) * win
        wsum[sl] += win
    return (acc / np.maximum(wsum, 1e-12))[:, t.tile : t.tile + h, t.tile : t.tile + w]


@pytest.mark.integration
def test_fctl_job_matches_a_whole_image_reference(tmp_path, ray_cluster):
    image = _archive(tmp_path / "in")
    out = tmp_path / "out"
    spec = _fctl_spec(tmp_path / "in", out, model__precision="fp32", output__extras=["probabilities"])
    [result] = run_spec(spec)
    assert result.status == "ok", result.error
    assert result.tiles == 6 * 7
    probs = zarr.open_array(str(out / "scene.zarr" / "probabilities"), mode="r")[:].astype(np.float32)
    ref = reference_probs(spec, image)
    # the contexts come from the pyramid's 2×2 means (rounded per level) instead of a c×c box of level 0:
    # a grey level or so per pixel, so the probabilities agree closely, not exactly
    assert np.abs(probs - ref).mean() < 2e-3
    labels = zarr.open_array(str(out / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]
    assert (labels == ref.argmax(0)).mean() >= 0.995

    # the contexts matter: the same local weights with γ = 0 (exactly the local model) give another map
    plain = run_spec(_fctl_spec(tmp_path / "in", tmp_path / "gamma0", model__precision="fp32",
                                output__extras=["probabilities"], model__fctl={"contexts": [2, 4], "gamma": 0.0}))
    assert plain[0].status == "ok"
    p0 = zarr.open_array(str(tmp_path / "gamma0" / "scene.zarr" / "probabilities"), mode="r")[:].astype(np.float32)
    assert np.abs(p0 - probs).mean() > 10 * np.abs(probs - ref).mean()


@pytest.mark.integration
def test_fctl_with_gamma_zero_equals_the_segment_job(tmp_path, ray_cluster):
    _archive(tmp_path / "in")
    fctl = run_spec(_fctl_spec(tmp_path / "in", tmp_path / "fctl", model__fctl={"gamma": 0.0}))
    seg = run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "seg"))))
    assert fctl[0].status == seg[0].status == "ok"
    a = zarr.open_array(str(tmp_path / "fctl" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]
    b = zarr.open_array(str(tmp_path / "seg" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]
    assert np.array_equal(a, b)


def test_checkpoint_kind_must_match_the_framework(tmp_path):
    (tmp_path / "plain.safetensors").write_bytes(seeded_checkpoint("fpn_resnet10", 3, ["a", "b", "c"], width=8))
    (tmp_path / "fctl.safetensors").write_bytes(seeded_fctl("fpn_resnet10", 3, ["a", "b", "c"], width=8))
    spec = _fctl_spec("in", "out", model__checkpoint=str(tmp_path / "plain.safetensors"), model__name=None)
    with pytest.raises(SpecError, match="model.framework: fctl but .*plain segmenter"):
        resolve_model(spec)
    spec = parse_spec(spec_dict("in", "out", model__checkpoint=str(tmp_path / "fctl.safetensors"), model__name=None))
    with pytest.raises(SpecError, match="set model.framework: fctl"):
        resolve_model(spec)
    spec = _fctl_spec("in", "out", model__checkpoint=str(tmp_path / "fctl.safetensors"), model__name=None,
                      model__fctl={"contexts": [3]})
    with pytest.raises(SpecError, match=r"model.fctl.contexts: \[3.0\] but .* trained with contexts \[2.0, 4.0\]"):
        resolve_model(spec)
    ok = _fctl_spec("in", "out", model__checkpoint=str(tmp_path / "fctl.safetensors"), model__name=None,
                    model__fctl={})
    assert resolve_model(ok).class_names == ("a", "b", "c")


@pytest.mark.parametrize("contexts", [[1], [4, 2], [2, 2], [2, 3, 4]])
def test_bad_context_factors_name_the_field(contexts):
    with pytest.raises(SpecError, match="model.fctl.contexts"):
        _fctl_spec("in", "out", model__fctl={"contexts": contexts})


@pytest.mark.integration
def test_fctl_with_pointrend_runs_and_equals_its_local_pointrend_at_gamma_zero(tmp_path, ray_cluster):
    """FCtL around a PointRend local model: its tiles are subdivided by the point head after the fused
    features; with every γ at 0 the job's mask is the plain PointRend job's, bit for bit."""
    from models.checkpoint import save_checkpoint
    from models.fctl_checkpoint import load_fctl

    _archive(tmp_path / "in")
    data = seeded_fctl("fpn_resnet10", 3, ["a", "b", "c"], width=8, refine="pointrend")
    (tmp_path / "fctl.safetensors").write_bytes(data)
    model, info, config = load_fctl(data)
    save_checkpoint(tmp_path / "pointrend.safetensors", model.local, config.local, list(info.class_names))
    common = {"model__classes": None, "model__name": None}
    fctl = run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "fctl"), model__framework="fctl",
                                         model__checkpoint=str(tmp_path / "fctl.safetensors"), **common)))
    plain = run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(tmp_path / "plain"),
                                          model__checkpoint=str(tmp_path / "pointrend.safetensors"), **common)))
    assert fctl[0].status == plain[0].status == "ok", (fctl[0].error, plain[0].error)
    a = zarr.open_array(str(tmp_path / "fctl" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]
    b = zarr.open_array(str(tmp_path / "plain" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]
    assert np.array_equal(a, b) and len(np.unique(a)) >= 2
