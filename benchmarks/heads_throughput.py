"""Heads throughput: every segmentation head on the same encoder, bare model, CPU.

Each head on resnet18 (width 64, the published width), at its default output stride (16 for DeepLab
v3, 32 for the others), with 4 classes: 512² tiles in batches of 4, 2 torch threads,
``torch.inference_mode``, channels_last, seeded random weights in eval mode, bf16 autocast and fp32.
Every (head, precision) pair first runs its warm-up batches; then the timed batches go in rounds,
one batch of every pair per round (rotating the order), so all pairs sample the same stretches of a
busy, shared machine. MP/s is tile pixels per second of each pair's fastest batch (the least
disturbed by other processes; the median is shown too). Compare the ratios within one run (to FPN,
bf16 to fp32), not absolute figures across runs. Rounds stop early (after at least 2) once
``--budget`` seconds have passed.

    python -m benchmarks.heads_throughput [--quick] [--warmup N] [--batches N] [--budget S]

Prints a table and appends it to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from benchmarks._results import append_results, machine, markdown_table
from benchmarks._timing import model_timing_args, time_forward
from models import DECODERS, ModelConfig, build_model

ENCODER, WIDTH, CLASSES = "resnet18", 64, 4
THREADS = 2


def main() -> None:
    args = model_timing_args(__doc__.split("\n")[0])
    tile, warmup, batches = args.tile, args.warmup, args.batches

    torch.set_num_threads(THREADS)
    m = machine()
    x = torch.randn(args.batch, 3, tile, tile, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    megapixels = args.batch * tile * tile / 1e6
    load0, t0 = os.getloadavg()[0], time.perf_counter()

    precisions = {"bf16": True, "fp32": False}
    rows: list[dict] = []
    models: dict[str, torch.nn.Module] = {}
    for head in sorted(DECODERS):
        config = ModelConfig(f"{head}_{ENCODER}", num_classes=CLASSES, width=WIDTH)
        model = build_model(config, seed=0).eval().to(memory_format=torch.channels_last)
        models[head] = model
        rows.append({
            "head": head, "name": config.name, "os": config.output_stride,
            "stride": model.decoder.stride,
            "params": sum(p.numel() for p in model.parameters()) / 1e6,
        })
    pairs = [(r, label) for r in rows for label in precisions]
    times: dict[tuple[str, str], list[float]] = {(r["head"], p): [] for r, p in pairs}
    for r, label in pairs:
        for _ in range(warmup):
            time_forward(models[r["head"]], x, precisions[label])
    rounds = 0
    for rounds in range(1, batches + 1):
        shift = (rounds - 1) % len(pairs)
        for r, label in pairs[shift:] + pairs[:shift]:
            times[r["head"], label].append(time_forward(models[r["head"]], x, precisions[label]))
        print(f"round {rounds}/{batches} done at {time.perf_counter() - t0:.0f} s", flush=True)
        if rounds >= 2 and time.perf_counter() - t0 > args.budget:
            break
    for r in rows:
        for label in precisions:
            r[label] = megapixels / min(times[r["head"], label])
            r[label + " median"] = megapixels / statistics.median(times[r["head"], label])
        print(f"{r['name']:20s} bf16 {r['bf16']:6.2f} MP/s  fp32 {r['fp32']:6.2f} MP/s (best batch)")

    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    fpn = next(r for r in rows if r["head"] == "fpn")
    headers = ["head", "model", "output stride", "head output stride", "params (M)",
               "bf16 MP/s (median)", "fp32 MP/s (median)", "bf16 ÷ fp32", "bf16 ÷ FPN", "fp32 ÷ FPN"]
    table = markdown_table(headers, [
        [r["head"], r["name"], r["os"], r["stride"], f"{r['params']:.2f}",
         f"{r['bf16']:.2f} ({r['bf16 median']:.2f})", f"{r['fp32']:.2f} ({r['fp32 median']:.2f})",
         f"{r['bf16'] / r['fp32']:.2f}", f"{r['bf16'] / fpn['bf16']:.2f}",
         f"{r['fp32'] / fpn['fp32']:.2f}"]
        for r in rows
    ])
    native = "native: avx512_bf16/AMX" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "emulated"
    body = (
        f"{ENCODER} width {WIDTH}, {CLASSES} classes, seeded random weights, eval; {tile}² tiles, "
        f"batch {args.batch}, {THREADS} torch threads, inference_mode, channels_last; bf16 autocast "
        f"({native}) and fp32; {warmup} warm-up batch(es) per head and precision, then {rounds} "
        f"rounds of one timed batch of each, interleaved; MP/s of the fastest batch (median in "
        f"parentheses); ratios from the fastest. Head output "
        f"stride = stride of the map the head hands to the final upsampling (1: DUpsampling "
        f"reconstructs full resolution). {wall:.0f} s in all; 1-min load average {load0:.1f} at "
        f"the start, {load1:.1f} at the end ({os.cpu_count()} cores): the "
        f"machine is shared, so read the ratios.\n\n{table}\n"
    )
    print()
    print(table)
    append_results(f"Heads throughput, {ENCODER} width {WIDTH}, {tile}²", body, m)


if __name__ == "__main__":
    main()
