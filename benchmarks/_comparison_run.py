"""Running and scoring half of ``benchmarks.context_comparison``: each method on the validation images, its
seconds and peak memory, its scores against the ground truth, the figures and the table."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks._comparison_train import Budget, Trained
from benchmarks._results import REPO, append_results, machine, markdown_table
from benchmarks._sampler import TreeSampler

FIGURES = REPO / "benchmarks" / "figures"
BOUNDARY_TOL = 3
LABELS = {
    "resize": "resize-only", "patch": "patch-only", "magnet": "MagNet", "fctl": "FCtL",
    "patch+pointrend": "patch-only + PointRend", "magnet+pointrend": "MagNet + PointRend",
    "fctl+pointrend": "FCtL + PointRend",
}
# ---------------------------------------------------------------- data


def deepglobe_data(data: Path, work: Path, commands: list[str]) -> tuple[str, list[tuple[str, str, str]], list[str]]:
    """The DeepGlobe sample as ``benchmarks.deepglobe_heads`` splits it: 8 training pairs → a dataset, 2 scored."""
    from benchmarks.deepglobe_heads import CLASS_NAMES, import_dataset, split_ids

    train_ids, eval_ids = split_ids(data)
    dataset, _ = import_dataset(data, train_ids, work, commands)
    val = [(f"{i}_sat", str(data / f"{i}_sat.jpg"), str(data / f"{i}_mask.png")) for i in eval_ids]
    return str(dataset), val, list(CLASS_NAMES)


def read_image(url: str) -> np.ndarray:
    """``(3, H, W)`` uint8 of a synth Zarr image or a JPEG/PNG."""
    if url.endswith(".zarr"):
        import zarr

        return np.asarray(zarr.open_array(url, mode="r")[:])
    from PIL import Image

    return np.moveaxis(np.asarray(Image.open(url).convert("RGB")), -1, 0)


# ---------------------------------------------------------------- methods


def resize_only(checkpoint: str, image: np.ndarray, crop: int) -> np.ndarray:
    """The resize-only baseline: the whole image → ``crop``² as training saw it (2×2 means down the pyramid
    to the level ``pipeline.training.crops.pyramid_level`` picks, then bilinear to ``crop``), one forward pass,
    probabilities bilinear back to full size, argmax → ``(H, W)`` uint8."""
    import torch

    from pipeline.reader import resize_image
    from pipeline.workers.predictor import PredictorConfig, TilePredictor

    predictor = TilePredictor(Path(checkpoint).read_bytes(), PredictorConfig(precision="fp32", torch_threads=2),
                              device="cpu")
    _, h, w = image.shape
    x = image.astype(np.float32)
    while min(x.shape[1:]) >= 2 * crop:  # the pyramid level whose side is the first below 2 · crop
        hh, ww = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
        x = x[:, :hh, :ww].reshape(3, hh // 2, 2, ww // 2, 2).mean((2, 4))
    small = resize_image(np.round(x).astype(np.uint8), crop)
    probs = torch.from_numpy(predictor(small[None]).astype(np.float32))
    up = torch.nn.functional.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
    return up[0].argmax(0).numpy().astype(np.uint8)


def run_spec(method: str, trained: dict[str, Trained], inputs: dict[str, Any], out: Path, budget: Budget) -> dict:
    model: dict[str, Any] = {"precision": "fp32"}
    if method in ("patch", "patch+pointrend"):
        model.update(checkpoint=trained[method].url)
    elif method in ("magnet", "magnet+pointrend"):
        model.update(checkpoint=trained[f"{method}-segmenter"].url, framework="magnet",
                     magnet={"scales": budget.magnet_scales, "refiner": trained[f"{method}-refiner"].url})
    elif method in ("fctl", "fctl+pointrend"):
        model.update(checkpoint=trained[method].url, framework="fctl")
    else:
        raise ValueError(f"{method!r} does not run through gigaseg run")
    return {
        "inputs": inputs, "model": model,
        "tiling": {"tile": budget.crop, "overlap": budget.crop // 4, "batch": 8},
        "output": {"url": str(out), "if_exists": "overwrite"},
        "resources": {"workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 1, "torch_threads": 1},
        "failure": {"mode": "fail_fast"},
    }


def predict(method: str, trained: dict[str, Trained], val: list[tuple[str, str, str]], inputs: dict[str, Any],
            work: Path, budget: Budget, commands: list[str]) -> tuple[dict[str, str], dict[str, float]]:
    """Masks of ``method`` on every validation image (``name → mask URL``) and its costs."""
    out = work / "runs" / method
    with TreeSampler(interval=0.2) as s:
        if method == "resize":
            import zarr

            masks, t0 = {}, time.perf_counter()
            for name, url, _ in val:
                mask = resize_only(trained["resize"].url, read_image(url), budget.crop)
                arr = zarr.create_array(store=str(out / f"{name}.zarr"), shape=mask.shape, chunks=(1024, 1024),
                                        dtype="uint8", overwrite=True)
                arr[:] = mask
                masks[name] = str(out / f"{name}.zarr")
            job_s = time.perf_counter() - t0
            commands.append(f"# resize-only: benchmarks._comparison_run.resize_only({trained['resize'].url}, image, "
                            f"{budget.crop}) per image, in process")
        else:
            spec = out.parent / f"run-{method}.yaml"
            spec.parent.mkdir(parents=True, exist_ok=True)
            spec.write_text(yaml.safe_dump(run_spec(method, trained, inputs, out, budget), sort_keys=False))
            commands.append(shlex.join(["gigaseg", "run", str(spec)]))
            log = work / "logs" / f"run-{method}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as f:
                rc = subprocess.call([sys.executable, "-m", "jobs.cli", "run", str(spec)], stdout=f,
                                     stderr=subprocess.STDOUT)
            if rc != 0:
                raise RuntimeError(f"gigaseg run {spec} failed (exit {rc}); see {log}")
            report = json.loads((out / "report.json").read_text())
            job_s = sum(i["seconds"] for i in report["images"])
            masks = {name: str(out / f"{name}.zarr") for name, _, _ in val}
    return masks, {"wall_s": s.wall, "job_s": job_s, "peak_rss": s.peak_rss, "other_load": s.other_load}


def score(masks: dict[str, str], val: list[tuple[str, str, str]], classes: list[str], exclude: list[int],
          colors) -> dict[str, Any]:
    """Scores pooled over the validation images (one confusion matrix, summed boundary counts)."""
    from jobs.evaluate import score_pair, scores
    from pipeline.evaluation.metrics import BoundaryCounts

    cm, bc = np.zeros((len(classes), len(classes)), np.int64), BoundaryCounts(0, 0, 0, 0)
    for name, _, gt in val:
        c, b, _ = score_pair(masks[name], gt, num_classes=len(classes), boundary_tol=BOUNDARY_TOL, colors=colors)
        cm, bc = cm + c, bc + b
    return scores(cm, bc, exclude, classes)


# ---------------------------------------------------------------- figures and the report


def figure_region(gt: np.ndarray, size: int, focus: tuple[int, ...]) -> tuple[int, int]:
    """Top-left of the ``size``² window (on a ``size/4`` grid) showing the most ``focus`` classes, then the most
    classes: the region every method's figure shows."""
    best, at = (-1, -1), (0, 0)
    h, w = gt.shape
    step = max(1, size // 4)
    for y in range(0, max(1, h - size + 1), step):
        for x in range(0, max(1, w - size + 1), step):
            key = _focus_key(gt[y:y + size, x:x + size], focus)
            if key > best:
                best, at = key, (y, x)
    return at


def _focus_key(window: np.ndarray, focus: tuple[int, ...]) -> tuple[int, int]:
    present = np.bincount(window.ravel(), minlength=256) > 0.002 * window.size
    return int(sum(present[c] for c in focus)), int(present.sum())


def _panel(rgb: np.ndarray, title: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + 22), "white")
    img.paste(Image.fromarray(rgb), (0, 22))
    ImageDraw.Draw(img).text((4, 5), title, fill="black")
    return img


def write_figures(tag: str, val: list[tuple[str, str, str]], masks: dict[str, dict[str, str]],
                  rows: dict[str, dict], colors, focus: tuple[int, ...], size: int = 512) -> list[Path]:
    """``benchmarks/figures/<tag>-<method>.png`` (image | truth | mask) per method and ``<tag>-all.png``, all of
    the same region (the window of a validation image showing the most ``focus`` classes); palette PNGs
    (256 colours) to stay small."""
    from pipeline.evaluation.masks import open_mask

    def region(item):
        gt = np.asarray(open_mask(item[2], {}, colors=colors, unknown=255))
        y, x = figure_region(gt, size, focus)
        return gt, y, x, _focus_key(gt[y:y + size, x:x + size], focus)

    picks = [(item, *region(item)) for item in val]
    (name, image_url, _), gt, y, x, _ = max(picks, key=lambda p: p[-1])
    window = (slice(y, y + size), slice(x, x + size))
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colors)] = np.asarray(colors, np.uint8)
    lut[255] = (255, 255, 255)
    image = np.moveaxis(read_image(image_url)[:, window[0], window[1]], 0, -1)
    base = [_panel(image, f"{name}, y {y} x {x}, {size} x {size} px"), _panel(lut[gt[window]], "ground truth")]
    FIGURES.mkdir(parents=True, exist_ok=True)
    paths, tiles = [], []
    for method, urls in masks.items():
        pred = np.asarray(open_mask(urls[name], {})[window])
        r = rows[method]
        title = f"{LABELS[method]}: mIoU {100 * r['miou']:.1f}, bF1 {100 * r['boundary_f1']['f1']:.1f}"
        panel = _panel(lut[pred], title)
        tiles.append(panel)
        paths.append(_save_row(base + [panel], FIGURES / f"{tag}-{method.replace('+', '-')}.png"))
    paths.append(_save_row(base + tiles, FIGURES / f"{tag}-all.png", per_row=4))
    return paths


def _save_row(panels, path: Path, per_row: int | None = None) -> Path:
    from PIL import Image

    per_row = per_row or len(panels)
    w, h = panels[0].size
    rows = -(-len(panels) // per_row)
    sheet = Image.new("RGB", (w * per_row + 4 * (per_row - 1), h * rows + 4 * (rows - 1)), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % per_row) * (w + 4), (i // per_row) * (h + 4)))
    sheet.quantize(256).save(path, optimize=True)
    return path


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def table(methods: list[str], rows: dict[str, dict], costs: dict[str, dict], classes: list[str], exclude: list[int],
          megapixels: float) -> str:
    shown = [c for c in range(len(classes)) if c not in exclude]
    headers = ["method", "mIoU", *(f"IoU {classes[c]}" for c in shown), "boundary F1", "s / MP (end to end)",
               "s / MP (job)", "peak ΣRSS"]
    body = []
    for m in methods:
        r, k = rows[m], costs[m]
        iou = {c["id"]: c["iou"] for c in r["per_class"]}
        body.append([LABELS[m], f"**{_pct(r['miou'])}**", *(_pct(iou[c]) for c in shown),
                     _pct(r["boundary_f1"]["f1"]), f"{k['wall_s'] / megapixels:.2f}", f"{k['job_s'] / megapixels:.2f}",
                     f"{k['peak_rss'] / 2**30:.2f} GiB"])
    return markdown_table(headers, body)


def targets(rows: dict[str, dict]) -> list[str]:
    """The issue's targets, each met or missed by how much (points)."""
    lines = []
    base = [rows[b]["miou"] for b in ("resize", "patch") if b in rows]
    for m in ("magnet", "fctl"):
        if m in rows and base:
            margin = 100 * (rows[m]["miou"] - max(base))
            lines.append(f"{LABELS[m]} beats both baselines by ≥ 10 mIoU points: {margin:+.1f} points over the "
                         f"better baseline — {'met' if margin >= 10 else f'NOT met (short by {10 - margin:.1f})'}")
    for m in ("patch", "magnet", "fctl"):
        pr = f"{m}+pointrend"
        if m in rows and pr in rows:
            gain = 100 * (rows[pr]["boundary_f1"]["f1"] - rows[m]["boundary_f1"]["f1"])
            lines.append(f"PointRend adds ≥ 3 boundary-F1 points to {LABELS[m]}: {gain:+.1f} — "
                         f"{'met' if gain >= 3 else f'NOT met (short by {3 - gain:.1f})'}")
    return lines


def report(args, budget: Budget, methods: list[str], trained: dict[str, Trained], val, classes: list[str],
           exclude_names: list[str], work: Path, commands: list[str]) -> None:
    from pipeline.evaluation.palette import PALETTES
    from pipeline.synth import CLASSES

    synth = args.dataset == "synth"
    colors = [c for _, c in CLASSES] if synth else [c for _, c in PALETTES["deepglobe"]]
    exclude = [classes.index(n) for n in exclude_names]
    inputs = {"url": str(Path(val[0][1]).parent), "patterns": [Path(u).name for _, u, _ in val]}
    megapixels = sum(np.prod(read_image(u).shape[1:]) for _, u, _ in val) / 1e6
    rows, costs, masks = {}, {}, {}
    for m in methods:
        print(f"  {m}: predicting ...", flush=True)
        masks[m], costs[m] = predict(m, trained, val, inputs, work, budget, commands)
        rows[m] = score(masks[m], val, classes, exclude, None if synth else colors)
        print(f"  {m}: mIoU {_pct(rows[m]['miou'])}, boundary F1 {_pct(rows[m]['boundary_f1']['f1'])}, "
              f"{costs[m]['wall_s']:.0f} s", flush=True)
    (work / "scores.json").write_text(json.dumps({"rows": rows, "costs": costs}, indent=1))
    focus = (2, 3, 5) if synth else (1, 2, 3)
    text = table(methods, rows, costs, classes, exclude, megapixels)
    goals = targets(rows)
    print("\n" + text + "\n\n" + "\n".join(goals))
    if args.no_results:
        return
    figures = write_figures(args.dataset, val, masks, rows, colors, focus)
    train_lines = [f"| {t.name} | {t.steps} | {t.seconds:.0f} |" for t in trained.values()]
    where = (f"synthetic archive: {args.train} training + {len(val)} validation images of {args.image}² "
             f"(seed {0}); mIoU over all 7 classes" if synth else
             "DeepGlobe sample: 8 training pairs, 2 scored (794214, 855); mIoU over classes 1–6 — 8 images and no "
             "pretrained encoder are far from the published setting (MagNet/FCtL report on 803 images with "
             "ImageNet-pretrained ResNet-50 FPN); read the ranking, not the absolute numbers")
    body = "\n".join([
        f"{where}. {budget.model} width {budget.width}, crop {budget.crop}, batch {budget.batch}, AdamW lr "
        f"{budget.lr}, poly schedule, seed 0, 1 Ray Train worker × 2 threads; loss CE (segmenters), OHEM (MagNet's "
        f"{'residual' if budget.refiner_residual else 'plain'} refiner), focal γ 3 (FCtL's stages), class weights "
        f"{budget.class_weights.replace('_', ' ')} (not for the refiner: OHEM), BatchNorm statistics recomputed on {budget.precise_bn_batches} batches after every "
        f"epoch. "
        f"**Same budget**: every segmenter "
        f"(resize-only, patch-only = FCtL's local model, MagNet's, the PointRend variants) takes {budget.steps} "
        f"steps × {budget.batch} crops of {budget.crop}² px; they differ only in the windows the crops cover "
        f"(resize-only: the whole {budget.image}² image, scale {budget.resize_scale:.3g}; patch-only: scale 1; "
        f"MagNet: scales {budget.magnet_crop_scales}) and in model.refine. Each extra stage of a method takes "
        f"{budget.stage_steps} steps of the same batch and crop (MagNet: its refiner; FCtL: "
        f"{', '.join(f'context ×{f:g}' for f in budget.fctl_contexts)}, fused). Inference: tile {budget.crop}, "
        f"overlap {budget.crop // 4}, fp32, 2 workers × 1 thread; "
        f"MagNet {budget.magnet_scales} scales; resize-only in one process (whole image → {budget.crop}², one "
        f"pass, bilinear upsampling). Boundary F1: {BOUNDARY_TOL} px tolerance. s / MP over {megapixels:.1f} MP: "
        f"end to end = the whole `gigaseg run` (Ray start included), job = report.json's image seconds; peak "
        f"ΣRSS over the process tree (resize-only: this benchmark's own process).",
        "", text, "", *(f"- {g}" for g in goals), "",
        "Figures (the same region of one validation image): " + ", ".join(
            f"[{p.stem}](figures/{p.name})" for p in figures),
        "", "Training (seconds = `gigaseg train` wall clock, Ray start included):", "",
        "| run | steps | seconds |", "|---|---|---|", *train_lines,
        "", "Commands:", "", "```", *commands, "```",
    ])
    append_results(f"Context comparison, {args.dataset}", body, machine())
