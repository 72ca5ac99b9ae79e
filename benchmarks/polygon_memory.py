"""Memory of the polygon export (``gigaseg export-masks --to polygons``) for growing masks.

Each size's mask is written first, chunk by chunk, by a subprocess (a finished one-image output, as ``gigaseg run``
leaves it: labels in 1024² Zarr chunks). A fresh subprocess per size and scenario then runs
``pipeline.export.vector.export_polygons`` (GeoPackage, 1024² chunks, simplify 0.5 px) while a thread samples its
RSS every 20 ms. The mask: on a class-0 background, one ellipse per 256² cell (radius 24–180 px, centre anywhere in
the cell, class 1–6, later ones painted over earlier ones), so objects cross chunk borders at every size and the
number of objects grows with the area while each stays bounded. Two scenarios:

- ``objects``: ``--exclude 0``: every region is bounded, so the regions the sweep holds (those crossing it) are
  about one chunk row's worth: memory should not grow with the image.
- ``all classes``: the background too: it is one region with a hole per object, as large as the image, held until
  the sweep ends (any polygoniser holds it: it is one feature of the output), so memory grows with it.

    python -m benchmarks.polygon_memory [--quick] [--sizes 4096,8192,16384] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._results import REPO, append_results, machine, markdown_table
from benchmarks._sampler import TreeSampler

CELL, CHUNK, MIB = 256, 1024, 2**20
SCENARIOS = {"objects": [0], "all classes": []}  # scenario → classes excluded


def cell_objects(cy: int, cx: int, seed: int = 0) -> tuple[float, float, float, float, int]:
    """(centre y, centre x, radius y, radius x, class) of cell (cy, cx): a pure function of the cell."""
    rng = np.random.default_rng([seed, cy, cx])
    y, x = (cy + rng.random()) * CELL, (cx + rng.random()) * CELL
    ry, rx = rng.uniform(24, 180, 2)
    return y, x, ry, rx, int(rng.integers(1, 7))


def object_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """The benchmark mask's window [y0:y1, x0:x1]: the ellipses of every cell that can reach it, in cell order."""
    out = np.zeros((y1 - y0, x1 - x0), np.uint8)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    reach = 180 // CELL + 1
    for cy in range(y0 // CELL - reach, (y1 - 1) // CELL + reach + 1):
        for cx in range(x0 // CELL - reach, (x1 - 1) // CELL + reach + 1):
            if cy < 0 or cx < 0:
                continue
            y, x, ry, rx, value = cell_objects(cy, cx)
            inside = ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1
            out[inside] = value
    return out


def write_mask(size: int, workdir: Path) -> Path:
    """A finished one-image output of a ``size``² object mask (not georeferenced), written chunk by chunk."""
    from pipeline.output.arrays import create_outputs
    from pipeline.output.layout import image_output
    from pipeline.output.state import mark

    out = image_output(str(workdir / f"out-{size}"), "objects", {})
    arrays = create_outputs(out, label_name="segmentation", shapes=[(size, size)], chunk=CHUNK, extras=[],
                            class_names=[f"class {i}" for i in range(7)],
                            class_colors=[(i * 30, 0, 0) for i in range(7)], labels_dtype="uint8")
    for y in range(0, size, CHUNK):
        for x in range(0, size, CHUNK):
            arrays.labels[0][y : y + CHUNK, x : x + CHUNK] = object_mask(y, min(y + CHUNK, size), x,
                                                                         min(x + CHUNK, size))
    mark(out, complete=True)
    return Path(out.group_url)


def run_one(group: Path, exclude: list[int], dest: Path) -> dict:
    """The measured export (in this fresh process)."""
    from pipeline.export.masks import read_mask
    from pipeline.export.vector import export_polygons
    from pipeline.output.layout import image_output

    mask = read_mask(str(group))
    # warm-up on a tiny mask: libraries loaded and GDAL's drivers registered before "RSS before" is read
    tiny = image_output(str(dest.parent / "warm"), "tiny", {})
    from pipeline.output.arrays import create_outputs
    from pipeline.output.state import mark

    create_outputs(tiny, label_name="segmentation", shapes=[(8, 8)], class_names=["a", "b"],
                   class_colors=[(0, 0, 0), (1, 1, 1)], chunk=8, extras=[], labels_dtype="uint8").labels[0][:4] = 1
    mark(tiny, complete=True)
    export_polygons(read_mask(tiny.group_url), str(dest.parent / "warm.gpkg"))
    with TreeSampler(interval=0.02) as sampler:
        baseline = sampler.root.memory_info().rss
        t0 = time.perf_counter()
        n = export_polygons(mask, str(dest), fmt="gpkg", tolerance=0.5, chunk=CHUNK, exclude=exclude)
        seconds = time.perf_counter() - t0
    return {"features": n, "seconds": seconds, "baseline": baseline, "peak": max(sampler.peak_rss, baseline),
            "file": dest.stat().st_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4096,8192,16384")
    p.add_argument("--quick", action="store_true", help="sizes 2048,4096 (a smoke run)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--write", type=int, default=None, help=argparse.SUPPRESS)  # internal: write one mask
    p.add_argument("--one", type=str, default=None, help=argparse.SUPPRESS)  # internal: measure one export
    p.add_argument("--exclude", type=str, default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write:
        write_mask(args.write, args.workdir)
        return
    if args.one:
        exclude = [int(v) for v in args.exclude.split(",") if v]
        print(json.dumps(run_one(Path(args.one), exclude, args.workdir / "export.gpkg")))
        return
    sizes = [2048, 4096] if args.quick else [int(s) for s in args.sizes.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gigaseg-polymem-"))
    rows, figures = [], {}
    try:
        for size in sizes:
            subprocess.run([sys.executable, "-m", "benchmarks.polygon_memory", "--write", str(size), "--workdir",
                            str(workdir)], check=True, cwd=REPO)
            group = workdir / f"out-{size}" / "objects.zarr"
            for scenario, exclude in SCENARIOS.items():
                done = subprocess.run([sys.executable, "-m", "benchmarks.polygon_memory", "--one", str(group),
                                       "--exclude", ",".join(map(str, exclude)), "--workdir", str(workdir)],
                                      check=True, cwd=REPO, capture_output=True, text=True)
                f = json.loads(done.stdout.strip().splitlines()[-1])
                figures[(scenario, size)] = f
                rows.append((scenario, f"{size}²", f["features"], f"{f['seconds']:.1f}",
                             f"{f['baseline'] / MIB:.0f} MiB", f"{f['peak'] / MIB:.0f} MiB",
                             f"{(f['peak'] - f['baseline']) / MIB:.0f} MiB", f"{f['file'] / MIB:.1f} MiB"))
                print(rows[-1], flush=True)
            shutil.rmtree(workdir / f"out-{size}", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    table = markdown_table(("scenario", "size", "polygons", "seconds", "RSS before", "peak RSS", "peak − before",
                            "GeoPackage"), rows)
    lo, hi = sizes[0], sizes[-1]
    ratios = []
    for scenario in SCENARIOS:
        a, b = figures[(scenario, lo)], figures[(scenario, hi)]
        ratios.append(f"{scenario}: peak RSS {hi}² ÷ {lo}² = {b['peak'] / a['peak']:.3f}, growth over the "
                      f"process's own start {(b['peak'] - b['baseline']) / max(a['peak'] - a['baseline'], 1):.2f}×, "
                      f"for {hi * hi / (lo * lo):.0f}× the pixels and {b['features'] / max(a['features'], 1):.1f}× "
                      f"the polygons")
    body = (f"Mask: one ellipse per {CELL}² cell (radius 24–180 px, 6 classes) on a class-0 background, Zarr "
            f"{CHUNK}² chunks; export to GeoPackage, {CHUNK}² chunks, simplify 0.5 px; one fresh process per row, "
            f"RSS sampled every 20 ms; RSS before: after a warm-up export of an 8² mask (libraries loaded). "
            f"`objects` excludes class 0 (every region bounded); `all classes` keeps the background, one region "
            f"with a hole per object, held whole until the sweep ends.\n\n{table}\n\n"
            + "\n".join(f"- {r}" for r in ratios))
    print("\n" + body)
    append_results(f"Polygon export memory, {lo}² to {hi}²", body, machine())


if __name__ == "__main__":
    main()
