"""``gigaseg eval PRED GT``: score a job's masks against ground truth, image by image and overall.

The command's arguments and exit codes are in ``jobs.eval_cli``; this module scores.

PRED is a job's ``output.url`` (images from ``report.json``, else its ``<name>.zarr`` groups) or one Zarr
mask. Each image's ground truth is looked up by name in GT (a folder, bucket or one file): the first of
``<stem>_mask`` (for an image named ``<stem>_sat``, DeepGlobe's naming), ``<name>_mask``, ``<name>``, each a
Zarr array or (OME-)Zarr group, a ``.png`` or a ``.tif``; names follow ``pipeline.discover`` (``a/b.png`` is
``a__b``). Ground truth holds class ids, or colours decoded with a palette (``pipeline.palette``).

Every image is scored chunk by chunk (``pipeline.metrics``); overall scores come from the confusion matrix
and boundary counts summed over images (pixel-weighted, not a mean of per-image scores). Results go to
``<out>/eval.json`` and ``<out>/confusion.png`` (row-normalised heat map).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import numpy as np
from dask.callbacks import Callback

from jobs.eval_report import write_outputs
from models.errors import GigasegError
from pipeline.errors import InputNotFoundError
from pipeline.evaluation import metrics
from pipeline.evaluation.masks import _ZARR_MARKERS, open_mask, read_class_names
from pipeline.evaluation.palette import get_palette
from pipeline.output.layout import REPORT_NAME, image_output
from pipeline.output.state import read_state
from pipeline.sources.discover import discover
from pipeline.storage import filesystem, fs_path, join

log = logging.getLogger(__name__)

GT_FORMATS = ("zarr", "ome-zarr", "png", "tiff")  # never JPEG: lossy, and DeepGlobe's images are JPEGs


def score_pair(
    pred_url: str,
    gt_url: str,
    *,
    num_classes: int,
    ignore_index: int | None = 255,
    boundary_tol: int = 3,
    storage_options: Mapping[str, Any] | None = None,
    colors: Sequence[tuple[int, int, int]] | None = None,
    label_name: str = "segmentation",
) -> tuple[np.ndarray, metrics.BoundaryCounts, tuple[int, ...]]:
    """Confusion matrix ``(C, C)``, boundary counts and shape of one pair, in one Dask pass over the chunks."""
    so = dict(storage_options or {})
    pred = open_mask(pred_url, so, label_name=label_name)
    gt = open_mask(gt_url, so, colors=colors, unknown=255 if ignore_index is None else ignore_index,
                   label_name=label_name)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction {pred_url} has shape {pred.shape} but ground truth {gt_url} has {gt.shape}; the "
            "ground truth must be the full-resolution mask of the same image."
        )
    with _Progress(pred_url):
        cm, bc = dask.compute(
            metrics.confusion_graph(pred, gt, num_classes, ignore_index),
            metrics.boundary_graph(pred, gt, boundary_tol, ignore_index),
        )
    cm = metrics.check_confusion(np.asarray(cm), where=f"{pred_url} vs {gt_url}")
    return cm, metrics.BoundaryCounts(*(int(v) for v in bc)), tuple(pred.shape)


class _Progress(Callback):
    """Logs ``tasks done/total`` of a long Dask computation every ``every`` seconds."""

    def __init__(self, what: str, every: float = 10.0):
        super().__init__()
        self.what, self.every = what, every
        self.done, self.total, self.last = 0, 0, time.monotonic()

    def _start_state(self, dsk, state) -> None:
        self.total = len(dsk)

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self.done += 1
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            log.info("%s: %d/%d tasks (%.0f%%)", self.what, self.done, self.total, 100 * self.done / max(self.total, 1))


def scores(
    cm: np.ndarray, boundary: metrics.BoundaryCounts, exclude: Sequence[int], class_names: Sequence[str]
) -> dict[str, Any]:
    """JSON-ready scores of a confusion matrix and boundary counts (NaN, undefined, becomes null)."""
    iou = metrics.iou_per_class(cm)
    precision, recall = metrics.precision_recall(cm)
    bp, br, bf = boundary.scores()
    return {
        "pixels": int(cm.sum()),
        "miou": _num(metrics.mean_iou(cm, exclude)),
        "pixel_accuracy": _num(metrics.pixel_accuracy(cm)),
        "boundary_f1": {
            "f1": _num(bf), "precision": _num(bp), "recall": _num(br),
            "pred_px": boundary.pred, "pred_matched_px": boundary.pred_matched,
            "gt_px": boundary.gt, "gt_matched_px": boundary.gt_matched,
        },
        "per_class": [
            {"id": c, "name": class_names[c], "iou": _num(iou[c]), "precision": _num(precision[c]),
             "recall": _num(recall[c]), "gt_px": int(cm[c].sum()), "pred_px": int(cm[:, c].sum()),
             "in_miou": c not in exclude}
            for c in range(len(cm))
        ],
        "confusion": np.asarray(cm).tolist(),
    }


def _num(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x), 6)


def evaluate_pair(
    pred_url: str,
    gt_url: str,
    *,
    num_classes: int,
    ignore_index: int | None = 255,
    exclude: Sequence[int] = (),
    boundary_tol: int = 3,
    class_names: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    palette: str | Sequence[tuple[int, int, int]] | None = None,
    label_name: str = "segmentation",
) -> dict[str, Any]:
    """Scores of one predicted mask against one ground-truth mask (see ``scores`` for the keys)."""
    _, colors = _palette(palette)
    names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    _check_classes(names, num_classes, exclude)
    cm, bc, shape = score_pair(pred_url, gt_url, num_classes=num_classes, ignore_index=ignore_index,
                               boundary_tol=boundary_tol, storage_options=storage_options, colors=colors,
                               label_name=label_name)
    return {"pred": pred_url, "gt": gt_url, "shape": list(shape), **scores(cm, bc, exclude, names)}


def evaluate_job(
    pred_output_url: str,
    gt_url: str,
    *,
    label_name: str = "segmentation",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    ignore_index: int | None = 255,
    exclude: Sequence[int] = (),
    boundary_tol: int = 3,
    palette: str | Sequence[tuple[int, int, int]] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    """Score every image of a job output against the ground truth under ``gt_url``; write
    ``<out>/eval.json`` and ``<out>/confusion.png`` when ``out`` is given.

    Classes: ``class_names``, else the palette's, else the prediction's NGFF label properties; ``num_classes``
    alone names them ``class_<i>``. An image without ground truth is listed with status
    ``"no ground truth"``; one that cannot be scored (failed or incomplete prediction, unreadable mask,
    shape mismatch, out-of-range ids) with ``"error"`` and its message. Bad paths raise
    ``InputNotFoundError``, inconsistent class settings ``ValueError``.
    """
    so = dict(storage_options or {})
    palette_names, colors = _palette(palette)
    images = job_images(pred_output_url, so)
    gt_index = ground_truth_index(gt_url, so)
    if len(images) == 1 and list(gt_index.values()) == [gt_url]:  # one mask against one mask: any names
        gt_index = {images[0][0]: gt_url}
    names = _resolve_names(class_names, num_classes, palette_names, images, label_name, so)
    _check_classes(names, len(names), exclude)
    total, total_bc = np.zeros((len(names),) * 2, np.int64), metrics.BoundaryCounts(0, 0, 0, 0)
    rows = []
    for i, (name, url, problem) in enumerate(images, 1):
        gt = find_gt(name, gt_index)
        row: dict[str, Any] = {"name": name, "status": "ok", "pred": url, "gt": gt, "error": problem}
        if problem:
            row["status"] = "error"
        elif gt is None:
            row["status"] = "no ground truth"
        else:
            try:
                cm, bc, shape = score_pair(url, gt, num_classes=len(names), ignore_index=ignore_index,
                                           boundary_tol=boundary_tol, storage_options=so, colors=colors,
                                           label_name=label_name)
            except Exception as exc:  # noqa: BLE001 - one image's problem must not stop the others
                known = isinstance(exc, (GigasegError, ValueError, OSError))
                row.update(status="error", error=str(exc) if known else f"{type(exc).__name__}: {exc}")
            else:
                total += cm
                total_bc += bc
                row.update(shape=list(shape), **scores(cm, bc, exclude, names))
        log.info("eval %d/%d %s: %s%s", i, len(images), name, row["status"],
                 f" mIoU {row['miou']}" if row.get("miou") is not None else "")
        rows.append(row)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "no ground truth", "error")}
    result: dict[str, Any] = {
        "pred": pred_output_url, "gt": gt_url, "label_name": label_name, "class_names": names,
        "ignore_index": ignore_index, "exclude": sorted(set(exclude)),
        "palette": palette if isinstance(palette, str) else (None if palette is None else "custom"),
        "boundary": {"tol_px": boundary_tol, "distance": "euclidean", "neighbourhood": 4,
                     "scope": "overall: class-agnostic boundaries"},
        "counts": counts,
        "overall": scores(total, total_bc, exclude, names) if counts["ok"] else None,
        "images": rows,
    }
    if out is not None:
        result["outputs"] = write_outputs(result, out, so)
    return result


def job_images(pred_url: str, so: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """``(name, mask url, problem or None)`` per image of a job output (or of one Zarr mask)."""
    fs = filesystem(pred_url, so)
    root = fs_path(pred_url).rstrip("/")
    if not fs.isdir(root):
        raise InputNotFoundError(f"{pred_url}: prediction output does not exist; point PRED at a job's output.url.")
    if any(fs.exists(f"{root}/{m}") for m in _ZARR_MARKERS):  # one mask, not a job output
        base = root.rsplit("/", 1)[-1]
        return [(base[: -len(".zarr")] if base.endswith(".zarr") else base, pred_url, None)]
    try:  # not jobs.report.read_json: importing jobs.report loads the engine (torch, Ray)
        report = json.loads(fs.cat_file(f"{root}/{REPORT_NAME}"))
    except FileNotFoundError:
        report = None
    if report is not None:
        entries = [(e["name"], e.get("status"), e.get("error")) for e in report.get("images", [])]
    else:
        dirs = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        entries = [(d[: -len(".zarr")], None, None) for d in dirs if d.endswith(".zarr")]
    if not entries:
        raise InputNotFoundError(
            f"{pred_url}: no {REPORT_NAME} and no <name>.zarr groups, so not a gigaseg output; point PRED at a "
            "job's output.url or at one Zarr mask."
        )
    out = []
    for name, status, error in entries:
        image = image_output(pred_url, name, dict(so))
        problem = None
        if status == "failed":
            problem = f"prediction failed in the job ({error}); fix it and run the job again"
        else:
            state = read_state(image)
            if state is None:
                problem = f"{image.group_url}: no prediction written for this image; run the job again"
            elif "fingerprint" in state and not state.get("complete"):
                problem = f"{image.group_url}: prediction incomplete (job interrupted); run the job again to finish it"
        out.append((name, image.group_url, problem))
    return out


def ground_truth_index(gt_url: str, so: Mapping[str, Any]) -> dict[str, str]:
    """Name → URL of every mask under ``gt_url`` (names as ``pipeline.discover`` gives them)."""
    if not filesystem(gt_url, so).exists(fs_path(gt_url)):
        raise InputNotFoundError(f"{gt_url}: ground truth does not exist; check GT (and --storage-options).")
    try:
        refs = discover(gt_url, storage_options=so)
    except InputNotFoundError:
        refs = []
    index = {r.name: r.url for r in refs if r.format in GT_FORMATS}
    if not index:
        raise InputNotFoundError(
            f"{gt_url}: no mask found in the ground truth (Zarr, .png or .tif; JPEG is never a mask); check GT."
        )
    return index


def find_gt(name: str, gt_index: Mapping[str, str]) -> str | None:
    """URL of the ground truth of image ``name``: ``<stem>_mask`` for ``<stem>_sat``, ``<name>_mask``, ``<name>``."""
    candidates = ([name[: -len("_sat")] + "_mask"] if name.endswith("_sat") else []) + [f"{name}_mask", name]
    return next((gt_index[c] for c in candidates if c in gt_index), None)


def _palette(palette) -> tuple[list[str] | None, list[tuple[int, int, int]] | None]:
    if palette is None or palette == "none":
        return None, None
    if isinstance(palette, str):
        entries = get_palette(palette)
        return [n for n, _ in entries], [c for _, c in entries]
    return None, [tuple(c) for c in palette]


def _resolve_names(class_names, num_classes, palette_names, images, label_name, so) -> list[str]:
    found = None
    for _, url, problem in images:
        if problem is None:
            for label_url in (join(url, "labels", label_name), url, url.rstrip("/").rsplit("/", 1)[0]):
                found = found or read_class_names(label_url, so)
            break
    if class_names and palette_names and len(class_names) != len(palette_names):
        raise ValueError(f"{len(class_names)} class names {list(class_names)} but the palette has "
                         f"{len(palette_names)} colours ({palette_names}); give one name per palette colour.")
    names = list(class_names or palette_names or [])
    if names and num_classes is not None and num_classes != len(names):
        raise ValueError(f"--classes {num_classes} but the class names (given or from the palette) are "
                         f"{len(names)}: {names}.")
    if not names and num_classes:
        names = found if found and len(found) == num_classes else [f"class_{i}" for i in range(num_classes)]
    names = names or found or []
    if not names:
        raise ValueError(
            "the number of classes is unknown: the predictions carry no class names; pass --classes N or "
            "--classes name0,name1,... (or --palette)."
        )
    if found and len(found) != len(names):
        log.warning("predictions have %d classes %s, evaluating %d %s", len(found), found, len(names), names)
    return names


def _check_classes(names: Sequence[str], num_classes: int, exclude: Sequence[int]) -> None:
    if len(names) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes={num_classes} but {len(names)} class names were given ({list(names)}).")
    bad = [c for c in exclude if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"excluded class ids {bad} are not among the {num_classes} classes 0..{num_classes - 1}.")
