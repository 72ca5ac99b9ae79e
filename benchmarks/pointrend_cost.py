"""PointRend's cost: seconds per megapixel of PointRend inference over the plain segmenter it wraps, CPU.

One seeded ``fpn_resnet18`` (width 64, 4 classes, eval) and the same network wrapped in PointRend (point
head 256 channels, 2 subdivision steps of 8192 points: stride 4 to full resolution), so both share the
very same base weights; 512² tiles in batches of 4, 2 torch threads, ``torch.inference_mode``,
channels_last (as the tile predictor runs them), bf16 autocast and fp32. Every (model, precision) pair
first runs its warm-up batches; then the timed batches go in rounds, one batch of every pair per round
(rotating the order), so all pairs sample the same stretches of a busy, shared machine. Seconds/MP from
each pair's fastest batch (the least disturbed; the median in parentheses); compare the ratios, not
absolute figures across runs. Rounds stop early (after at least 2) once ``--budget`` seconds have passed.

    python -m benchmarks.pointrend_cost [--quick] [--warmup N] [--batches N] [--budget S]

Prints a table and appends it to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from benchmarks._results import append_results, machine, markdown_table
from benchmarks._timing import model_timing_args, time_forward
from models import ModelConfig, build_model

NAME, WIDTH, CLASSES, THREADS = "fpn_resnet18", 64, 4, 2


def main() -> None:
    args = model_timing_args(__doc__.split("\n")[0])
    tile, warmup, batches = args.tile, args.warmup, args.batches

    torch.set_num_threads(THREADS)
    m = machine()
    config = ModelConfig(NAME, num_classes=CLASSES, width=WIDTH, refine="pointrend")
    pointrend = build_model(config, seed=0).eval().to(memory_format=torch.channels_last)
    models = {"plain": pointrend.segmenter, "pointrend": pointrend}  # one set of base weights
    x = torch.randn(args.batch, 3, tile, tile, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    megapixels = args.batch * tile * tile / 1e6
    load0, t0 = os.getloadavg()[0], time.perf_counter()

    precisions = {"bf16": True, "fp32": False}
    pairs = [(name, label) for name in models for label in precisions]
    times: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    for name, label in pairs:
        for _ in range(warmup):
            time_forward(models[name], x, precisions[label])
    rounds = 0
    for rounds in range(1, batches + 1):
        shift = (rounds - 1) % len(pairs)
        for name, label in pairs[shift:] + pairs[:shift]:
            times[name, label].append(time_forward(models[name], x, precisions[label]))
        print(f"round {rounds}/{batches} done at {time.perf_counter() - t0:.0f} s", flush=True)
        if rounds >= 2 and time.perf_counter() - t0 > args.budget:
            break

    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    best = {p: min(t) / megapixels for p, t in times.items()}
    median = {p: statistics.median(t) / megapixels for p, t in times.items()}
    rows = []
    for label in precisions:
        plain, pr = ("plain", label), ("pointrend", label)
        rows.append([
            label, f"{best[plain]:.3f} ({median[plain]:.3f})", f"{best[pr]:.3f} ({median[pr]:.3f})",
            f"{best[pr] - best[plain]:.3f}", f"**{best[pr] / best[plain]:.2f}**",
            f"{median[pr] / median[plain]:.2f}",
        ])
    headers = ["precision", "plain s/MP (median)", "PointRend s/MP (median)", "added s/MP",
               "PointRend ÷ plain", "÷ (medians)"]
    table = markdown_table(headers, rows)
    head_params = sum(p.numel() for p in pointrend.point_head.parameters())
    native = "native: avx512_bf16/AMX" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "emulated"
    body = (
        f"{NAME} width {WIDTH} (semantic FPN, stride 4), {CLASSES} classes, seeded random weights, eval; "
        f"PointRend around the same network: point head {config.point_channels} channels "
        f"({head_params / 1e3:.0f} k params), {pointrend.subdivision_steps} subdivision steps of "
        f"{config.subdivision_points} points; {tile}² tiles, batch {args.batch}, {THREADS} torch "
        f"threads, inference_mode, channels_last; bf16 autocast ({native}) and fp32; {warmup} warm-up "
        f"batch(es) per pair, then {rounds} rounds of one timed batch of each, interleaved; seconds per "
        f"megapixel of the fastest batch (median in parentheses); ratios from the fastest. {wall:.0f} s "
        f"in all; 1-min load average {load0:.1f} at the start, {load1:.1f} at the end "
        f"({os.cpu_count()} cores): the machine is shared, so read the ratios.\n\n{table}\n"
    )
    print()
    print(table)
    append_results(f"PointRend cost, {NAME} width {WIDTH}, {tile}²", body, m)


if __name__ == "__main__":
    main()
