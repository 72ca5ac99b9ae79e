"""gigaseg against MONAI's ``sliding_window_inference`` on the same model, image and blend: throughput and memory.

Both run the same seeded ``fpn_resnet18`` (``--width``, ``--classes``, fp32) on the same generated Zarr scene,
``--size``² for each size asked, 512² windows with 384 px steps (MONAI ``overlap=0.25``; gigaseg overlap 128,
margin 0: the same 21 windows a side at 8192²), a gaussian blend with σ = 0.125 · window, batches of 8, and the
same torch threads (``--threads``):

- MONAI: one process reads the whole image from the Zarr store, normalises it, runs ``sliding_window_inference``
  with the model's softmax as the predictor, takes the argmax and writes the labels to a Zarr array — what a
  user's script does. Its output and weight buffers are the size of the image.
- gigaseg: ``jobs.runner.run_spec`` of the equivalent spec on an embedded Ray cluster with one worker of
  ``--threads`` threads, writing the labels (and the label pyramid) as it always does.

Each run is a process of its own, timed end to end; memory is the peak ΣRSS of its process tree (the Ray
cluster's processes included for gigaseg). MONAI is a benchmark-only dependency: ``pip install --no-deps monai``.

Targets (the issue): gigaseg ≥ 1.0× MONAI's throughput at 8192² and 16384², ≤ 0.5× its memory at 16384².

    python -m benchmarks.vs_monai [--sizes 8192,16384] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._inputs import generate_scene, ray_temp_dir, scene_path
from benchmarks._results import REPO, append_results, machine, machine_line, markdown_table
from benchmarks._sampler import TreeSampler

TILE, STEP, SIGMA, BATCH = 512, 384, 0.125, 8
GIB = 2**30


def model_checkpoint(args) -> bytes:
    from models.checkpoint import seeded_checkpoint

    return seeded_checkpoint("fpn_resnet18", args.classes, [f"class{i}" for i in range(args.classes)], seed=0,
                             width=args.width)


def run_monai(scene: Path, out: Path, args) -> None:
    """The MONAI script (in a process of its own): read, infer, argmax, write."""
    import numpy as np
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from models.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    model, info = load_checkpoint(model_checkpoint(args))
    model = model.eval().to(memory_format=torch.channels_last)
    mean = torch.tensor(info.normalization.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(info.normalization.std).view(1, 3, 1, 1) * 255
    image = zarr.open_array(store=str(scene), mode="r")[:]  # (H, W, 3) uint8, whole
    x = (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float() - mean) / std
    del image

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(batch.contiguous(memory_format=torch.channels_last)).float(), dim=1)

    with torch.inference_mode():
        probs = sliding_window_inference(x, roi_size=(TILE, TILE), sw_batch_size=BATCH, predictor=predictor,
                                         overlap=1 - STEP / TILE, mode="gaussian", sigma_scale=SIGMA,
                                         padding_mode="reflect")
    labels = probs[0].argmax(0).to(torch.uint8).numpy()
    del probs
    h, w = labels.shape
    arr = zarr.create_array(store=str(out), shape=(h, w), chunks=(1024, 1024), dtype="uint8", overwrite=True,
                            compressors=zarr.codecs.ZstdCodec(level=3))
    arr[:] = labels


def run_gigaseg(scene: Path, out: Path, args) -> None:
    """``gigaseg run`` of the equivalent spec (in a process of its own)."""
    import logging

    from jobs.progress import ProgressBar
    from jobs.runner import run_spec
    from jobs.spec import parse_spec

    logging.basicConfig(level=logging.WARNING)
    ckpt = out.parent / "model.safetensors"
    ckpt.write_bytes(model_checkpoint(args))
    spec = parse_spec({
        "inputs": {"url": str(scene.parent)},
        "model": {"checkpoint": str(ckpt), "precision": "fp32"},
        "tiling": {"tile": TILE, "overlap": TILE - STEP, "margin": 0, "batch": BATCH, "blend": "gaussian",
                   "sigma_scale": SIGMA, "chunk": 1024},
        "output": {"url": str(out), "if_exists": "overwrite"},
        "resources": {"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": args.threads,
                      "torch_threads": args.threads},
        "cluster": {"local_gpus": 1},
        "failure": {"mode": "fail_fast", "tile_retries": 0},
    }, "vs-monai spec")
    with ray_temp_dir():
        [result] = run_spec(spec, progress=ProgressBar(enabled=False))
    if result.status != "ok":
        raise SystemExit(f"gigaseg failed: {result.error}")


def measured(which: str, size: int, args) -> dict:
    """Run ``which`` on the ``size``² scene in a child process; its wall seconds and peak ΣRSS."""
    out = args.workdir / f"vs-monai-{which}-{size}"
    cmd = [sys.executable, "-m", "benchmarks.vs_monai", "--child", which, "--child-size", str(size),
           "--threads", str(args.threads), "--width", str(args.width), "--classes", str(args.classes),
           "--workdir", str(args.workdir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": str(args.threads)}
    with TreeSampler(interval=0.25) as sampler:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{which} at {size}² failed:\n{proc.stderr[-3000:]}")
    return {"wall": wall, "peak_rss": sampler.peak_rss, "out": out, "other_load": sampler.other_load}


def agreement(size: int, args) -> float:
    import zarr

    a = zarr.open_array(str(args.workdir / f"vs-monai-monai-{size}"), mode="r")
    b = zarr.open_array(str(args.workdir / f"vs-monai-gigaseg-{size}" / "scene.zarr" / "labels" / "segmentation" / "0"),
                        mode="r")
    same = total = 0
    for y in range(0, a.shape[0], 2048):
        x, y_ = a[y : y + 2048], b[y : y + 2048]
        same += int((x == y_).sum())
        total += x.size
    return same / total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="8192,16384")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=16, help="encoder width of fpn_resnet18")
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gigaseg-bench"))
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--child", choices=["monai", "gigaseg"], help=argparse.SUPPRESS)
    p.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        scene = scene_path(args.workdir, args.child_size)
        out = args.workdir / f"vs-monai-{args.child}-{args.child_size}"
        out.parent.mkdir(parents=True, exist_ok=True)
        (run_monai if args.child == "monai" else run_gigaseg)(scene, out, args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    m = machine()
    print(machine_line(m))
    rows, raw = [], {}
    for size in [int(s) for s in args.sizes.split(",")]:
        scene = scene_path(args.workdir, size)
        gen = generate_scene(scene, size, chunk=1024)
        print(f"scene {scene}: {'generated in %.0f s' % gen if gen else 'cached'}", flush=True)
        mon = measured("monai", size, args)
        print(f"MONAI {size}²: {mon['wall']:.1f} s, peak ΣRSS {mon['peak_rss'] / GIB:.2f} GiB", flush=True)
        gs = measured("gigaseg", size, args)
        print(f"gigaseg {size}²: {gs['wall']:.1f} s, peak ΣRSS {gs['peak_rss'] / GIB:.2f} GiB", flush=True)
        agree = agreement(size, args)
        mp = size * size / 1e6
        rows.append([f"{size}²", f"{mon['wall']:.1f}", f"{gs['wall']:.1f}", f"**{mon['wall'] / gs['wall']:.2f}×**",
                     f"{mon['peak_rss'] / GIB:.2f}", f"{gs['peak_rss'] / GIB:.2f}",
                     f"**{gs['peak_rss'] / mon['peak_rss']:.2f}×**", f"{mp / mon['wall']:.2f}", f"{mp / gs['wall']:.2f}",
                     f"{agree:.2%}", f"{100 * max(mon['other_load'], gs['other_load']):.0f} %"])
        raw[size] = {"monai": {k: v for k, v in mon.items() if k != "out"},
                     "gigaseg": {k: v for k, v in gs.items() if k != "out"}, "agreement": agree}
    body = markdown_table(["image", "MONAI s", "gigaseg s", "throughput gigaseg ÷ MONAI", "MONAI peak GiB",
                           "gigaseg peak GiB", "memory gigaseg ÷ MONAI", "MONAI MP/s", "gigaseg MP/s",
                           "same argmax", "CPU used by others"], rows)
    body += (f"\n\nSame seeded fpn_resnet18 (width {args.width}, {args.classes} classes, fp32), windows {TILE}² "
             f"every {STEP} px, gaussian σ {SIGMA}·{TILE}, batch {BATCH}, {args.threads} torch threads each; MONAI "
             f"reads the whole image and writes its labels, gigaseg runs `gigaseg run` (1 worker × {args.threads} "
             f"threads, Ray included). Targets: ≥ 1.0× throughput at every size, ≤ 0.5× memory at 16384². "
             f"The argmax differs where the two pad the image differently (MONAI pads with reflection where its last "
             f"window moves back; gigaseg's last window reaches past the image, mirrored).\n\n"
             f"<details><summary>raw</summary>\n\n```\n{json.dumps(raw, indent=1)}\n```\n</details>")
    print("\n" + body)
    if not args.no_results:
        append_results("gigaseg vs MONAI sliding_window_inference", body, m)


if __name__ == "__main__":
    main()
