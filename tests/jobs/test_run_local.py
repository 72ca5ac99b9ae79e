"""End to end on a real local Ray cluster with Zarr in tmp_path: masks exact, bad input isolated, audit."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import zarr

from jobs.runner import resolve_model, run_spec
from jobs.spec import parse_spec
from pipeline.pyramid import level_shapes, open_pyramid
from pipeline.reader import read_window
from pipeline.tiling import TileGrid, window_2d
from pipeline.workers.predictor import PredictorConfig, TilePredictor
from tests.archive import spec_dict, write_archive

pytestmark = pytest.mark.integration


def reference_labels(spec, group_url: str) -> np.ndarray:
    """The same algorithm in one process: every tile predicted (float32 probabilities, as workers blend them),
    blended on a whole canvas in float64."""
    model = resolve_model(spec)
    predictor = TilePredictor(model.checkpoint, PredictorConfig(precision="fp32"))
    state = zarr.open_group(group_url, mode="r").attrs["gigaseg"]
    if state["in_place"]:  # a Zarr array (H, W, 3) read where it is
        src, axes = zarr.open_array(store=state["source"], mode="r"), "yxc"
        h, w = src.shape[:2]
    else:
        pyr = open_pyramid(group_url, {})
        src, axes = zarr.open_array(store=f"{group_url}/{pyr.paths[0]}", mode="r"), pyr.axes
        h, w = pyr.shapes[0]
    t = spec.tiling
    grid = TileGrid(h, w, t.tile, t.overlap, *t.offset, margin=t.margin)
    pad = t.tile
    acc = np.zeros((len(model.class_names), h + 2 * pad, w + 2 * pad))
    wsum = np.zeros((h + 2 * pad, w + 2 * pad))
    win = window_2d(t.blend, t.tile, t.sigma_scale).astype(np.float64)
    for iy, ix in grid.indices():
        tw = grid.window(iy, ix)
        probs = predictor.probabilities(read_window(src, axes, (h, w), tw)[None])[0].cpu().numpy()
        acc[:, tw.y0 + pad : tw.y1 + pad, tw.x0 + pad : tw.x1 + pad] += probs.astype(np.float64) * win
        wsum[tw.y0 + pad : tw.y1 + pad, tw.x0 + pad : tw.x1 + pad] += win
    return (acc / np.maximum(wsum, 1e-12)).argmax(0)[pad : pad + h, pad : pad + w]


def test_local_job_end_to_end(tmp_path, ray_cluster):
    write_archive(tmp_path / "in")
    out = tmp_path / "out"
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(out), output__extras=["confidence", "probabilities"]))
    results = run_spec(spec)
    assert sorted((r.name, r.status) for r in results) == [
        ("photo", "ok"), ("scene", "ok"), ("small", "ok"), ("sub__survey", "ok")]

    report = json.loads((out / "report.json").read_text())
    assert {e["name"] for e in report["images"]} == {"photo", "scene", "small", "sub__survey"}
    assert report["totals"]["ok"] == 4 and report["totals"]["failed"] == 0
    entry = next(e for e in report["images"] if e["name"] == "scene")
    assert entry["shape"] == [520, 610] and entry["tiles"] == 6 * 7 and entry["error"] is None

    # masks read back with plain zarr, same height and width as the input, a pyramid like the image's: the
    # chunked Zarr input is read in place (no copy), the PNG ingested, and both get every level of the image
    labels = zarr.open_array(str(out / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")
    assert labels.shape == (520, 610) and labels.dtype == np.uint8
    image = zarr.open_group(str(out / "scene.zarr"), mode="r")
    assert image.attrs["gigaseg"]["in_place"] is True and "0" not in list(image.array_keys())
    n_levels = len(level_shapes((520, 610)))
    label_group = zarr.open_group(str(out / "scene.zarr" / "labels" / "segmentation"), mode="r")
    assert len(label_group.attrs["ome"]["multiscales"][0]["datasets"]) == n_levels
    small = zarr.open_group(str(out / "small.zarr"), mode="r")
    assert len(small.attrs["ome"]["multiscales"][0]["datasets"]) == len(level_shapes((200, 260)))
    props = label_group.attrs["ome"]["image-label"]["properties"]
    assert [p["name"] for p in props] == ["a", "b", "c"]
    assert not (out / "_work" / "scene").exists(), "the work area is removed once the image is done"

    # exactly right for the loaded model: same as a whole-canvas blend computed in one process
    ref = reference_labels(spec, str(out / "scene.zarr"))
    assert (labels[:] == ref).mean() >= 0.9995
    assert len(np.unique(labels[:])) >= 2, "a degenerate mask would make this comparison vacuous"
    conf = zarr.open_array(str(out / "scene.zarr" / "confidence"), mode="r")[:]
    probs = zarr.open_array(str(out / "scene.zarr" / "probabilities"), mode="r")[:]
    assert probs.shape == (3, 520, 610)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    np.testing.assert_allclose(conf, probs.astype(np.float32).max(0), atol=2e-3)

    # a second run resumes: everything is skipped and nothing changes
    before = labels[:]
    again = run_spec(spec)
    assert {r.status for r in again} == {"skipped"}
    assert np.array_equal(zarr.open_array(str(out / "scene.zarr/labels/segmentation/0"), mode="r")[:], before)


def test_bad_image_is_isolated_and_writes_are_single_owner(tmp_path, ray_cluster):
    write_archive(tmp_path / "in", corrupt=True)
    out = tmp_path / "out"
    audit = tmp_path / "audit"
    audit.mkdir()
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(out), inputs__patterns=["*.png", "*.zarr"]))
    results = {r.name: r for r in run_spec(spec, audit_dir=str(audit))}
    assert results["broken"].status == "failed"
    assert "broken.png" in results["broken"].error
    assert results["scene"].status == "ok" and results["small"].status == "ok"
    report = json.loads((out / "report.json").read_text())
    failed = [e for e in report["images"] if e["status"] == "failed"]
    assert [e["name"] for e in failed] == ["broken"] and failed[0]["error"]

    writes = collections.Counter()
    writers = collections.defaultdict(set)
    for log in audit.glob("*.log"):
        for line in log.read_text().splitlines():
            who, key = line.split("\t")
            writes[key] += 1
            writers[key].add(who)
    chunk_keys = [k for k in writes if "/c/" in k]
    assert all(writes[k] == 1 for k in chunk_keys), "a chunk written twice"
    label_keys = [k for k in chunk_keys if "/labels/segmentation/0/c/" in k]
    assert len(label_keys) == 3 * 3 + 1 * 2, "scene: 520×610 in 256² chunks; small: 200×260 in 200×256"
    # the blocks write their masks themselves (no tile store, no blend pass on the driver), on both workers
    assert {w.split("-")[0] for k in label_keys for w in writers[k]} == {"worker"}
    assert len({w for k in label_keys for w in writers[k]}) == 2, "both workers took part"
    # a block covering a whole level makes the label pyramid on its device too (workers.label_pyramid)
    pyramid_keys = [k for k in chunk_keys if "/labels/segmentation/1/c/" in k]
    assert pyramid_keys and {w.split("-")[0] for k in pyramid_keys for w in writers[k]} == {"worker"}


def test_ome_zarr_pyramid_is_used_in_place(tmp_path, ray_cluster):
    from pipeline import ome
    from pipeline.synth.land_cover import land_cover

    src = tmp_path / "in" / "slide.ome.zarr"
    group = zarr.open_group(str(src), mode="w")
    rgb = land_cover(0, 0, 400, 300, seed=9).transpose(2, 0, 1).astype(np.uint16) * 257  # uint16 input
    group.create_array("0", shape=rgb.shape, chunks=(3, 128, 128), dtype="uint16")[:] = rgb
    group.create_array("1", shape=(3, 200, 150), chunks=(3, 128, 128), dtype="uint16")[:] = rgb[:, ::2, ::2]
    group.attrs["ome"] = ome.image_multiscales("slide", 2)
    out = tmp_path / "out"
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(out)))
    [result] = run_spec(spec)
    assert (result.name, result.status, result.shape) == ("slide", "ok", (400, 300))

    image_group = zarr.open_group(str(out / "slide.zarr"), mode="r")
    assert "0" not in list(image_group.array_keys()), "the source pyramid is read in place, not copied"
    assert image_group.attrs["gigaseg"]["in_place"] is True and image_group.attrs["gigaseg"]["source"].endswith("slide.ome.zarr")
    labels = zarr.open_group(str(out / "slide.zarr" / "labels" / "segmentation"), mode="r")
    assert [labels[p].shape for p in ("0", "1")] == [(400, 300), (200, 150)]

    # same mask as the same image given as plain RGB uint8 (uint16 → round(v / 257) is exact here)
    plain = tmp_path / "plain"
    plain.mkdir()
    zarr.create_array(store=str(plain / "slide.zarr"), shape=(400, 300, 3), chunks=(128, 128, 3), dtype="uint8")[:] = (
        land_cover(0, 0, 400, 300, seed=9))
    run_spec(parse_spec(spec_dict(str(plain), str(tmp_path / "out-plain"))))
    expected = zarr.open_array(str(tmp_path / "out-plain" / "slide.zarr" / "labels" / "segmentation" / "0"), mode="r")
    assert np.array_equal(labels["0"][:], expected[:])


def test_a_tile_failing_every_retry_fails_its_image_only(tmp_path, ray_cluster):
    from pipeline import ome
    from pipeline.synth.land_cover import land_cover

    src = tmp_path / "in" / "damaged.ome.zarr"
    group = zarr.open_group(str(src), mode="w")
    rgb = land_cover(0, 0, 256, 256, seed=2).transpose(2, 0, 1)
    group.create_array("0", shape=rgb.shape, chunks=(3, 128, 128), dtype="uint8")[:] = rgb
    group.create_array("1", shape=(3, 128, 128), chunks=(3, 128, 128), dtype="uint8")[:] = rgb[:, ::2, ::2]
    group.attrs["ome"] = ome.image_multiscales("damaged", 2)
    (src / "0" / "c" / "0" / "1" / "1").write_bytes(b"not a zstd frame")  # one corrupt chunk, read by workers
    write_archive(tmp_path / "in")
    out = tmp_path / "out"
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(out), inputs__patterns=["*.zarr"]))
    results = {r.name: r for r in run_spec(spec)}
    bad = results["damaged"]
    assert bad.status == "failed" and "tile(s) failed after 2 retries" in bad.error
    assert "damaged.ome.zarr/0: cannot read window" in bad.error, bad.error
    assert bad.tiles_retried > 0
    assert results["scene"].status == "ok"
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["tiles_retried"] == bad.tiles_retried
    assert zarr.open_group(str(out / "damaged.zarr"), mode="r").attrs["gigaseg"]["complete"] is False
