"""One network, three ways to bring it: a gigaseg checkpoint run by torch, the same network exported to ONNX
(``gigaseg export``) run by ONNX Runtime, and exported with ``torch.export`` (``.pt2``) run as its module. Tiles/s
of the block worker without Ray (``benchmarks.worker_feed``: real Zarr reads, the device blend, label and
confidence writes), and each source's labels against the torch fp32 ones.

Every source is resolved as ``gigaseg run`` resolves it (``pipeline.frameworks.segmenters``, the card from the
weights) and run by one ``BlockWorker`` with the same threads. ONNX Runtime runs the model at its own precision
(fp32), and so does ``.pt2`` (an exported graph at its exported precision); the torch checkpoint runs fp32 and, with
``--precision auto``, also bf16 autocast where the CPU has it. The
sources take turns image by image, so a busy machine slows them alike; one warm-up image each is left out.

    python -m benchmarks.model_sources [--size 2048] [--images 2] [--model fpn_resnet18] [--width 16]
                                       [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks._inputs import generate_scene, scene_path
from benchmarks._results import append_results, machine, machine_line, markdown_table
from benchmarks.worker_feed import prepare, run_image


def write_sources(workdir: Path, model: str, width: int, classes: int) -> dict[str, Path]:
    """The checkpoint, its ONNX export and its ``.pt2`` export (dynamic batch, height and width), each carrying
    the card."""
    import torch
    from torch.export import Dim

    from models.card import CARD_KEY, ModelCard
    from models.checkpoint import load_checkpoint, seeded_checkpoint
    from models.onnx_export import export_onnx

    stem = workdir / f"{model}-w{width}-c{classes}"
    paths = {"torch": stem.with_suffix(".safetensors"), "onnx": stem.with_suffix(".onnx"),
             "pt2": stem.with_suffix(".pt2")}
    data = seeded_checkpoint(model, classes, [f"class{i}" for i in range(classes)], seed=0, width=width)
    paths["torch"].write_bytes(data)
    t0 = time.perf_counter()
    paths["onnx"].write_bytes(export_onnx(data)[0])
    print(f"ONNX export {time.perf_counter() - t0:.1f} s")
    net, info = load_checkpoint(data)
    card = ModelCard.from_info(info)
    t0 = time.perf_counter()
    program = torch.export.export(net.eval(), (torch.zeros(2, 3, 64, 96),), dynamic_shapes=(
        {0: Dim("batch", min=1), 2: 32 * Dim("h", min=1), 3: 32 * Dim("w", min=1)},))
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={CARD_KEY: json.dumps(card.to_dict())})
    paths["pt2"].write_bytes(buf.getvalue())
    print(f"torch.export {time.perf_counter() - t0:.1f} s")
    return paths


def framework_of(path: Path):
    """The ``segment`` framework of a model file, resolved as ``gigaseg run`` resolves it."""
    from pipeline.frameworks.base import ModelSource
    from pipeline.frameworks.segment import Segment, runtime_of
    from pipeline.frameworks.segmenters import resolve_segmenter
    from pipeline.plan import WeightsRef

    resolution = resolve_segmenter(ModelSource(path.read_bytes(), str(path), "fpn_resnet18", ()), "segment")
    return Segment(WeightsRef(str(path), ""), runtime_of(resolution))


def labels(out_root: Path, name: str) -> np.ndarray:
    import zarr

    return zarr.open_array(str(out_root / f"{name}.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1024², 3 timed images (a smoke run)")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--images", type=int, default=5, help="timed images per source (one more warms up)")
    p.add_argument("--model", default="fpn_resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="auto", help="auto: bf16 rows too where the CPU or GPU has bf16")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gigaseg-bench"))
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.images = 1024, 3

    import torch

    from pipeline.plan import TilingPlan
    from pipeline.workers.predictor import DeviceConfig, resolve_device, resolve_precision
    from pipeline.workers.worker import BlockWorker

    m = machine()
    print(machine_line(m))
    args.workdir.mkdir(parents=True, exist_ok=True)
    scene = scene_path(args.workdir, args.size)
    generate_scene(scene, args.size, chunk=1024)
    paths = write_sources(args.workdir, args.model, args.width, args.classes)
    bf16 = args.precision == "auto" and resolve_precision("auto", resolve_device()) is not None
    runs = [("gigaseg checkpoint (torch)", "torch", "fp32"), ("ONNX (ONNX Runtime)", "onnx", "fp32"),
            ("torch.export .pt2", "pt2", "fp32")]
    if bf16:
        runs += [("gigaseg checkpoint (torch)", "torch", "auto")]  # .pt2, like ONNX, runs at its exported precision
    tiling = TilingPlan(tile=512, overlap=128, batch=args.batch)
    out_root = args.workdir / "model-sources-out"
    shutil.rmtree(out_root, ignore_errors=True)
    workers, seconds, tiles, rates = {}, defaultdict(float), defaultdict(int), defaultdict(list)
    try:
        for label, kind, precision in runs:
            framework = framework_of(paths[kind])
            job = {"framework": framework, "tiling": tiling, "classes": args.classes}
            worker = BlockWorker(framework, {}, DeviceConfig(precision, args.threads))
            stages, sink, _ = prepare(scene.parent, out_root, f"warm-{kind}-{precision}", job)
            run_image(worker, stages, sink, tiling, args.classes, defaultdict(float))
            workers[(kind, precision)] = (worker, job)
        for i in range(args.images):  # the sources take turns, image by image
            for _, kind, precision in runs:
                worker, job = workers[(kind, precision)]
                stages, sink, _ = prepare(scene.parent, out_root, f"{kind}-{precision}-{i}", job)
                t0 = time.perf_counter()
                n = run_image(worker, stages, sink, tiling, args.classes, defaultdict(float))
                if worker.model.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                tiles[(kind, precision)] += n
                seconds[(kind, precision)] += dt
                rates[(kind, precision)].append(n / dt)
        reference = labels(out_root, "torch-fp32-0")
        agree = {key: float((labels(out_root, f"{key[0]}-{key[1]}-0") == reference).mean()) for key in workers}
        device = str(next(iter(workers.values()))[0].model.device)
        dtypes = {key: w.model.runner.autocast_dtype for key, (w, _) in workers.items()}
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    # the median image: a shared machine's neighbours slow some images of every source, not the median
    rate = {key: float(np.median(rates[key])) for key in workers}
    best = max(rate, key=rate.get)

    def cell(key):
        text = f"{rate[key]:.2f}"
        return f"**{text}**" if key == best else text

    rows = [[label, device, "fp32 (its own)" if kind in ("onnx", "pt2") else str(dtypes[(kind, precision)] or "fp32"),
             tiles[(kind, precision)], f"{seconds[(kind, precision)]:.1f}", cell((kind, precision)),
             " – ".join(f"{r:.2f}" for r in (min(rates[(kind, precision)]), max(rates[(kind, precision)]))),
             f"{rate[(kind, precision)] / rate[('torch', 'fp32')]:.2f}", f"{100 * agree[(kind, precision)]:.2f} %"]
            for label, kind, precision in runs]
    table = markdown_table(["source", "device", "precision", "tiles", "seconds", "tiles/s (median image)",
                            "range over images", "÷ torch fp32", "labels = torch fp32"], rows)
    print(table)
    fp32 = max((k for k in rate if k[1] == "fp32"), key=rate.get)
    summary = (f"Fastest: {dict(runs_by_key(runs))[best]} at {rate[best]:.2f} tiles/s; in fp32, "
               f"{dict(runs_by_key(runs))[fp32]}.")
    print(summary)
    if not args.no_results:
        body = (f"`python -m benchmarks.model_sources{' --quick' if args.quick else ''}`: {args.model} width "
                f"{args.width}, {args.classes} classes, seeded; the block worker without Ray on a generated "
                f"{args.size}² Zarr scene (1024² zstd chunks), {args.images} timed image(s) per source taking "
                f"turns, tile 512, overlap 128, batch {args.batch}, {args.threads} threads (torch's, or ONNX "
                f"Runtime's intra-op); labels and confidence written. tiles/s of the median image (the machine is "
                f"shared: single images vary, see the range). Labels compared on the first timed image.\n\n"
                f"{table}\n\n{summary}\n")
        append_results(f"Model sources, {args.size}²", body, m)


def runs_by_key(runs):
    return [((kind, precision), f"{label}, {'fp32' if precision == 'fp32' else 'auto'}")
            for label, kind, precision in runs]


if __name__ == "__main__":
    main()
