"""``gigaseg eval``: a tiny fake job output scored against Zarr, OME-Zarr, PNG and TIFF ground truth."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from jobs.eval_cli import add_eval_parser, cmd_eval
from jobs.eval_report import format_table
from jobs.evaluate import evaluate_job, evaluate_pair
from pipeline.evaluation.metrics import BoundaryCounts, boundary_counts
from pipeline.evaluation.palette import DEEPGLOBE_CLASSES
from pipeline.output.arrays import create_outputs
from pipeline.output.layout import image_output
from pipeline.output.state import mark
from tests.pipeline.test_metrics import IGNORE, blobs, numpy_confusion

NAMES = [n for n, _ in DEEPGLOBE_CLASSES]
COLORS = np.asarray([c for _, c in DEEPGLOBE_CLASSES], np.uint8)
C = len(NAMES)


def write_prediction(output, name, mask):
    out = image_output(str(output), name, {})
    arrays = create_outputs(out, label_name="segmentation", shapes=[mask.shape], class_names=NAMES,
                            class_colors=[tuple(c) for c in COLORS.tolist()], chunk=48, extras=[],
                            labels_dtype="uint8")
    arrays.labels[0][:] = mask
    mark(out, fingerprint="test", complete=True)


def write_report(output, entries):
    (output / "report.json").write_text(json.dumps({"images": entries, "totals": {}}))


@pytest.fixture
def job(tmp_path):
    """Job output with images a, b_sat, c, d, e and ground truth for all but c; returns (pred, gt, truth)
    where truth maps name → (pred ids, gt ids with IGNORE where unscored)."""
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "job", tmp_path / "gt"
    gt_dir.mkdir()
    truth = {}
    for i, (name, shape) in enumerate({"a": (150, 110), "b_sat": (90, 130), "c": (40, 40), "d": (77, 61),
                                       "e": (64, 100)}.items()):
        gt = blobs(shape, C, seed=i)
        pred = np.roll(gt, (1, 2), axis=(0, 1))
        pred[blobs(shape, 2, seed=i + 10, n=5) == 1] = 3
        write_prediction(pred_dir, name, pred)
        truth[name] = (pred, gt.copy())
    a_gt = truth["a"][1]
    a_gt[rng.random(a_gt.shape) < 0.05] = IGNORE
    zarr.create_array(str(gt_dir / "a.zarr"), data=a_gt, chunks=(40, 40))
    b_gt = truth["b_sat"][1]  # DeepGlobe-style colour PNG with blurred colours and a colour of no class
    rgb = COLORS[b_gt].astype(np.int16)
    rgb = np.where(rgb == 255, rgb - rng.integers(0, 100, rgb.shape), rgb + rng.integers(0, 100, rgb.shape))
    rgb[:10, :10] = (230, 20, 20)
    b_gt[:10, :10] = IGNORE
    Image.fromarray(rgb.astype(np.uint8)).save(gt_dir / "b_mask.png")
    tifffile.imwrite(gt_dir / "d.tif", truth["d"][1], tile=(32, 32))
    write_prediction(gt_dir, "e", truth["e"][1])  # an OME-Zarr labels group as ground truth
    write_report(pred_dir, [{"name": n, "status": "ok"} for n in truth])
    return pred_dir, gt_dir, truth


def expected_confusion(truth, names):
    return sum(numpy_confusion(*truth[n], C) for n in names)


def test_job_scores_equal_numpy_for_zarr_png_tiff_and_ome_gt(job, tmp_path):
    pred_dir, gt_dir, truth = job
    out = tmp_path / "eval"
    result = evaluate_job(str(pred_dir), str(gt_dir), palette="deepglobe", exclude=[0], out=str(out))
    rows = {r["name"]: r for r in result["images"]}
    assert {n: r["status"] for n, r in rows.items()} == {
        "a": "ok", "b_sat": "ok", "c": "no ground truth", "d": "ok", "e": "ok"}
    assert rows["b_sat"]["gt"].endswith("b_mask.png") and rows["d"]["gt"].endswith("d.tif")
    scored = ["a", "b_sat", "d", "e"]
    for name in scored:
        np.testing.assert_array_equal(rows[name]["confusion"], numpy_confusion(*truth[name], C))
    cm = expected_confusion(truth, scored)
    overall = result["overall"]
    np.testing.assert_array_equal(overall["confusion"], cm)
    assert result["class_names"] == NAMES and result["counts"] == {"ok": 4, "no ground truth": 1, "error": 0}

    inter, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = [c for c in range(1, C) if union[c]]
    assert overall["miou"] == pytest.approx(np.mean(inter[present] / union[present]), abs=1e-6)
    assert overall["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-6)
    assert [c["in_miou"] for c in overall["per_class"]] == [False] + [True] * (C - 1)
    for c in overall["per_class"]:
        assert c["gt_px"] == cm[c["id"]].sum() and c["pred_px"] == cm[:, c["id"]].sum()
        assert c["iou"] is None if not union[c["id"]] else c["iou"] == pytest.approx(inter[c["id"]] / union[c["id"]])

    bc = sum((boundary_counts(*truth[n], tol=3) for n in scored), BoundaryCounts(0, 0, 0, 0))
    b = overall["boundary_f1"]
    assert (b["pred_px"], b["pred_matched_px"], b["gt_px"], b["gt_matched_px"]) == bc.as_tuple()
    assert b["f1"] == pytest.approx(bc.scores()[2], abs=1e-6) and 0 < b["f1"] < 1

    saved = json.loads((out / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["overall"]["confusion"] == overall["confusion"]
    assert saved["outputs"]["confusion_png"].endswith("confusion.png")
    png = out / "confusion.png"
    assert png.stat().st_size > 2000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # a heat map, not blank

    table = format_table(result)
    assert "no ground truth" in table and "urban" in table and "(excluded)" in table


def test_evaluate_pair_on_arrays_and_groups(job):
    pred_dir, gt_dir, truth = job
    pred_url = str(pred_dir / "a.zarr" / "labels" / "segmentation" / "0")
    r = evaluate_pair(pred_url, str(gt_dir / "a.zarr"), num_classes=C, ignore_index=IGNORE, exclude=[0],
                      boundary_tol=2, class_names=NAMES, storage_options={})
    np.testing.assert_array_equal(r["confusion"], numpy_confusion(*truth["a"], C))
    assert r["shape"] == [150, 110] and r["boundary_f1"]["gt_px"] == boundary_counts(*truth["a"], tol=2).gt
    group = evaluate_pair(str(pred_dir / "e.zarr"), str(gt_dir / "e.zarr"), num_classes=C, ignore_index=IGNORE,
                          exclude=[], boundary_tol=3, class_names=None, storage_options=None)
    np.testing.assert_array_equal(group["confusion"], numpy_confusion(*truth["e"], C))


def test_colour_gt_without_palette_and_failed_images_are_errors_not_crashes(job):
    pred_dir, gt_dir, truth = job
    report = json.loads((pred_dir / "report.json").read_text())
    report["images"].append({"name": "broken", "status": "failed", "error": "tile (0, 0) failed"})
    (pred_dir / "report.json").write_text(json.dumps(report))
    result = evaluate_job(str(pred_dir), str(gt_dir))
    rows = {r["name"]: r for r in result["images"]}
    assert rows["b_sat"]["status"] == "error" and "--palette" in rows["b_sat"]["error"]
    assert rows["broken"]["status"] == "error" and "tile (0, 0) failed" in rows["broken"]["error"]
    assert rows["a"]["status"] == "ok" and result["counts"] == {"ok": 3, "no ground truth": 1, "error": 2}


def test_shape_mismatch_is_reported_per_image(job):
    pred_dir, gt_dir, _ = job
    zarr.create_array(str(gt_dir / "c.zarr"), data=np.zeros((41, 40), np.uint8))
    rows = {r["name"]: r for r in evaluate_job(str(pred_dir), str(gt_dir), palette="deepglobe")["images"]}
    assert rows["c"]["status"] == "error" and "(40, 40)" in rows["c"]["error"] and "(41, 40)" in rows["c"]["error"]


# ---------------------------------------------------------------- command line


def run(argv):
    parser = argparse.ArgumentParser(prog="gigaseg")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    assert args.func is cmd_eval
    return args.func(args)


def test_cmd_eval_exit_0_writes_report_and_png(job, tmp_path, capsys):
    pred_dir, gt_dir, _ = job
    assert run([str(pred_dir), str(gt_dir), "--palette", "deepglobe", "--exclude", "0"]) == 0
    out = capsys.readouterr().out
    assert "b_sat" in out and "no ground truth" in out and "mIoU" in out
    assert (pred_dir / "eval" / "eval.json").is_file() and (pred_dir / "eval" / "confusion.png").is_file()
    assert run([str(pred_dir), str(gt_dir), "--palette", "deepglobe", "--json", "--out", str(tmp_path / "o"),
                "--classes", ",".join(NAMES), "--ignore-index", "255", "--boundary-tol", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["boundary"]["tol_px"] == 1 and result["outputs"]["json"] == str(tmp_path / "o" / "eval.json")


def test_cmd_eval_exit_1_when_an_image_cannot_be_scored(job, capsys):
    pred_dir, gt_dir, _ = job
    assert run([str(pred_dir), str(gt_dir)]) == 1  # b_mask.png is a colour mask and no --palette
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: b_sat:") and "--palette" in err[0]


@pytest.mark.parametrize("case", ["no pred", "bad json", "bad exclude", "bad classes", "no gt match", "no gt"])
def test_cmd_eval_exit_2_on_bad_arguments_or_paths(job, tmp_path, capsys, case):
    pred_dir, gt_dir, _ = job
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(elsewhere / "zzz.png")
    argv = {
        "no pred": [str(tmp_path / "nowhere"), str(gt_dir)],
        "bad json": [str(pred_dir), str(gt_dir), "--storage-options", "{oops"],
        "bad exclude": [str(pred_dir), str(gt_dir), "--exclude", "0,9"],
        "bad classes": [str(pred_dir), str(gt_dir), "--classes", "3", "--palette", "deepglobe"],
        "no gt match": [str(pred_dir), str(elsewhere)],
        "no gt": [str(pred_dir), str(tmp_path / "missing-gt")],
    }[case]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
