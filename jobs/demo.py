"""``gigaseg demo``: generate a small synthetic archive with ground truth, run MagNet with PointRend on it
with the checkpoints shipped in ``jobs/checkpoints/``, print each image's mIoU, write a preview.

The archive (``pipeline.synth`` scenes, each with its own seed, never one the checkpoints were trained on)
exercises every input path: a chunked Zarr v3 array (the large one, generated chunk by chunk with Dask; only
its uint8 truth is held whole, to write the PNG), a tiled BigTIFF, a grayscale uint16 TIFF, a PNG with alpha
and a JPEG. The tiled BigTIFF is a GeoTIFF (EPSG:32633, 0.5 m pixels) when the ``geo`` extra is installed (reading
its georeferencing needs rasterio). The ground truth of each goes to ``<output>/truth/<name>.png`` (class ids), the
scores to ``<output>/scores.json``, and ``<output>/preview/index.html`` shows image | truth | mask of each,
downscaled (one PNG per image), with a scale bar and, for the GeoTIFF, its CRS.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import yaml
import zarr
from PIL import Image

from jobs.console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, print_results
from jobs.evaluate import score_pair, scores
from jobs.preview import image_preview, spatial_html
from jobs.runner import run_spec
from jobs.spec import InputsSpec, parse_spec
from pipeline.evaluation.masks import open_mask
from pipeline.evaluation.metrics import BoundaryCounts
from pipeline.optional import available
from pipeline.sources.discover import _safe_name, discover
from pipeline.sources.formats import open_source
from pipeline.spatial import Spatial
from pipeline.storage import write_bytes
from pipeline.synth import CLASSES, SynthConfig, image_and_labels, synth_dask

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the demo archive (synthetic, with ground truth)

CHECKPOINTS = Path(__file__).with_name("checkpoints")
SEGMENTER = CHECKPOINTS / "magnet-pointrend-segmenter.safetensors"
REFINER = CHECKPOINTS / "magnet-pointrend-refiner.safetensors"
MAGNET_SCALES = 4
DEMO_SEED = 9000  # the checkpoints were trained on split_seed(0, "train", i): other scenes
PREVIEW_SIDE = 512
#: GeoKeys of the demo GeoTIFF: projected, pixel is area, EPSG:32633 (WGS 84 / UTM zone 33N); 0.5 m pixels whose
#: top-left corner is at (500000 E, 5000000 N).
GEOKEYS = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)
GEOTIFF_TAGS = [(33550, "d", 3, (0.5, 0.5, 0.0), False), (33922, "d", 6, (0, 0, 0, 500000.0, 5000000.0, 0), False),
                (34735, "H", len(GEOKEYS), GEOKEYS, False)]


@dataclass(frozen=True)
class DemoImage:
    name: str  # pipeline.sources.discover's name of the file
    path: Path
    height: int
    width: int
    seed: int
    kind: str  # how it is stored, for the table


def _configs(large: int) -> list[tuple[str, str, int, int, str]]:
    """(relative path, kind, height, width, how) per demo image; the Zarr one is ``large``². Every long side is
    over 1024 px: the pyramid stops at 256 px, and MagNet's ``MAGNET_SCALES`` = 4 stages need 4 levels."""
    return [
        ("large.zarr", "Zarr v3, chunked", large, large, "zarr"),
        ("tiles/survey.tif", "tiled BigTIFF", 1280, 2048, "bigtiff"),
        ("tiles/thermal.tif", "grayscale uint16 TIFF", 1088, 1088, "gray"),
        ("overview.png", "RGBA PNG", 1152, 1280, "png"),
        ("aerial.jpg", "JPEG q90", 1280, 1280, "jpeg"),
    ]


def _write_one(path: Path, how: str, cfg, truth: Path) -> None:
    if how == "zarr":
        image, labels = synth_dask(cfg)
        arr = zarr.create_array(store=str(path), shape=image.shape, chunks=(3, 512, 512), dtype="uint8",
                                dimension_names=("c", "y", "x"), overwrite=True)
        gt = np.empty(labels.shape, np.uint8)
        da.store([image, labels], [arr, gt], lock=False)
        Image.fromarray(gt).save(truth)
        return
    image, labels = image_and_labels(cfg, 0, 0, cfg.height, cfg.width)
    hwc = np.ascontiguousarray(np.moveaxis(image, 0, -1))
    if how == "bigtiff":
        geo = GEOTIFF_TAGS if available("rasterio") else []  # a GeoTIFF only where gigaseg can read it back
        tifffile.imwrite(path, hwc, bigtiff=True, tile=(256, 256), photometric="rgb", compression="zlib",
                         extratags=geo)
    elif how == "gray":
        gray = (hwc.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint16)
        tifffile.imwrite(path, gray * 257, tile=(256, 256), compression="zlib")
    elif how == "png":
        Image.fromarray(np.concatenate([hwc, np.full((*hwc.shape[:2], 1), 255, np.uint8)], -1), "RGBA").save(path)
    else:
        Image.fromarray(hwc).save(path, quality=90)
    Image.fromarray(labels).save(truth)


def make_archive(root: Path, large: int = 8192) -> list[DemoImage]:
    """Write the demo archive under ``root/archive`` and its ground truth under ``root/truth``; images already
    there with the same size and seed are kept (``root/archive.json`` records them)."""
    archive, truth = root / "archive", root / "truth"
    (archive / "tiles").mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    record = root / "archive.json"
    known = json.loads(record.read_text()) if record.exists() else {}
    images = []
    for i, (rel, kind, h, w, how) in enumerate(_configs(large)):
        seed = DEMO_SEED + i
        name = _safe_name(rel.rsplit(".", 1)[0])
        path, gt = archive / rel, truth / f"{name}.png"
        stamp = [h, w, seed] + (["geotiff"] if how == "bigtiff" and available("rasterio") else [])
        if known.get(rel) != stamp or not gt.exists():
            _write_one(path, how, SynthConfig(height=h, width=w, seed=seed), gt)
            known[rel] = stamp
            write_bytes(str(record), json.dumps(known).encode())  # whole or not at all: a rerun trusts it
        images.append(DemoImage(name, path, h, w, seed, kind))
    return images


def demo_spec(root: Path) -> dict:
    return {
        "inputs": {"url": str(root / "archive")},
        "model": {"checkpoint": str(SEGMENTER), "framework": "magnet", "precision": "fp32",
                  "magnet": {"scales": MAGNET_SCALES, "refiner": str(REFINER)}},
        "tiling": {"tile": 256, "overlap": 64, "batch": 8, "blend": "gaussian"},
        "output": {"url": str(root / "masks"), "extras": ["confidence"]},
        "resources": {"workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 1, "torch_threads": 1},
        "failure": {"mode": "continue", "tile_retries": 2},
    }


# ---------------------------------------------------------------- scores and preview


def score_images(root: Path, images: list[DemoImage], masks_url: str) -> dict:
    """Per image and pooled: mIoU over the 7 synth classes, per-class IoU, boundary F1 (3 px) vs the truth."""
    names = [n for n, _ in CLASSES]
    out, cm_all, bc_all = {}, np.zeros((len(names),) * 2, np.int64), BoundaryCounts(0, 0, 0, 0)
    for im in images:
        cm, bc, _ = score_pair(f"{masks_url}/{im.name}.zarr", str(root / "truth" / f"{im.name}.png"),
                               num_classes=len(names))
        out[im.name] = scores(cm, bc, [], names)
        cm_all, bc_all = cm_all + cm, bc_all + bc
    out["all"] = scores(cm_all, bc_all, [], names)
    return out


def write_preview(root: Path, images: list[DemoImage], masks_url: str, table: dict,
                  inputs: InputsSpec | None = None) -> Path:
    """``root/preview/<name>.png`` (image | truth | mask, each at most ``PREVIEW_SIDE`` px) and ``index.html``. The
    image is shown as the job fed it to the model (``inputs``: its bands, ``preview_bands`` of them as RGB)."""
    inputs = inputs or InputsSpec(url=str(root / "archive"))
    refs = {ref.name: ref for ref in discover(inputs.url, inputs.patterns, inputs.storage_options)}
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(CLASSES)] = [c for _, c in CLASSES]
    preview = root / "preview"
    preview.mkdir(exist_ok=True)
    rows = []
    for im in images:
        step = max(1, -(-max(im.height, im.width) // PREVIEW_SIDE))
        mask = np.asarray(open_mask(f"{masks_url}/{im.name}.zarr", {})[::step, ::step])
        truth = np.asarray(Image.open(root / "truth" / f"{im.name}.png"))[::step, ::step]
        source = open_source(refs[im.name], inputs.storage_options, inputs.value_range, inputs.bands)
        rgb = image_preview(source, step, inputs.preview_bands)  # as the model saw it
        panels = [rgb, lut[truth], lut[mask]]
        sheet = np.concatenate([np.pad(p, ((0, 0), (0, 6), (0, 0)), constant_values=255) for p in panels], 1)
        Image.fromarray(sheet).save(preview / f"{im.name}.png")
        s = table[im.name]
        state = zarr.open_group(f"{masks_url}/{im.name}.zarr", mode="r").attrs.get("gigaseg", {})
        where = spatial_html(Spatial.from_json(state.get("spatial")), step, rgb.shape[1])
        rows.append(f"<h3>{html.escape(im.name)} — {html.escape(im.kind)}, {im.height}×{im.width}: mIoU "
                    f"{100 * (s['miou'] or 0):.1f} %</h3><img src='{html.escape(im.name)}.png'>{where}")
    legend = " ".join(f"<span style='background:rgb{tuple(c)};padding:0 8px'>&nbsp;</span> {n}" for n, c in CLASSES)
    page = (f"<html><head><meta charset='utf-8'><title>gigaseg demo</title></head><body>"
            f"<h2>MagNet + PointRend (shipped checkpoints): image | ground truth | mask</h2><p>{legend}</p>"
            f"<p>all images pooled: mIoU {100 * (table['all']['miou'] or 0):.1f} %</p>{''.join(rows)}</body></html>")
    (preview / "index.html").write_text(page)
    return preview / "index.html"


def run_demo(output: str, large: int = 8192) -> int:
    if large <= 1024:
        print(f"--large {large}: must be over 1024 px (MagNet's {MAGNET_SCALES} scales need 4 pyramid levels, and the "
              "pyramid stops at 256 px); try 2448")
        return EXIT_USAGE
    root = Path(output).resolve()
    t0 = time.perf_counter()
    print(f"generating the demo archive under {root / 'archive'} (largest image {large}×{large}) ...")
    images = make_archive(root, large)
    spec_path = root / "demo-spec.yaml"
    spec_path.write_text(yaml.safe_dump(demo_spec(root), sort_keys=False))
    print(f"archive ready in {time.perf_counter() - t0:.0f} s; spec: {spec_path}")
    spec = parse_spec(yaml.safe_load(spec_path.read_text()), str(spec_path))
    print(f"running MagNet ({MAGNET_SCALES} scales) with PointRend on a local Ray cluster: {spec.resources.workers} "
          f"workers × {spec.resources.gpus_per_worker:g} logical GPU, {os.cpu_count()} CPU cores")
    results = run_spec(spec)
    print_results(results)
    failed = any(r.status == "failed" for r in results)
    done = {r.name for r in results if r.status in ("ok", "skipped")}
    images = [im for im in images if im.name in done]
    if images:
        table = score_images(root, images, spec.output.url)
        (root / "scores.json").write_text(json.dumps(table, indent=1))
        print("\nagainst the generated ground truth (mIoU over the 7 classes; boundary F1, 3 px):")
        for im in images:
            s = table[im.name]
            print(f"  {im.name:16} {im.kind:22} mIoU {100 * (s['miou'] or 0):5.1f} %   "
                  f"boundary F1 {100 * (s['boundary_f1']['f1'] or 0):5.1f} %")
        s = table["all"]
        print(f"  {'all, pooled':16} {'':22} mIoU {100 * (s['miou'] or 0):5.1f} %   "
              f"boundary F1 {100 * (s['boundary_f1']['f1'] or 0):5.1f} %")
        preview = write_preview(root, images, spec.output.url, table, spec.inputs)
        print(f"\npreview: {preview}   scores: {root / 'scores.json'}")
    print(f"masks:   {spec.output.url}/<name>.zarr/labels/segmentation/0   report: {spec.output.url}/report.json")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return EXIT_FAILED if failed else EXIT_OK
