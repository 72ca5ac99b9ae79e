"""MagNet-Fast's tile choice: the most uncertain tiles (gigaseg's default, what the method means) or the least
uncertain ones (what the reference's code does: ``torch.sort`` ascending, the first ``n_patches``), scored.

The shipped MagNet checkpoints (``jobs/checkpoints``, trained on the synthetic archive) run on synthetic
validation scenes they never saw (``pipeline.synth``, seeds ``split_seed(seed, "val", i)``), 4 scales as
``gigaseg demo``, with MagNet-Fast refining a share of each refinement stage's tiles chosen either way, and full
MagNet and stage 0 alone (every refinement stage refining nothing) as bounds. Scores: pooled mIoU over the 7
classes and boundary F1 (3 px) against the generated truth (``jobs.evaluate``).

    python -m benchmarks.magnet_fast_choice [--size 2448] [--images 2] [--patches 0.25] [--no-results]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._results import append_results, machine, markdown_table

CHECKPOINTS = Path(__file__).resolve().parent.parent / "jobs" / "checkpoints"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2448)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--patches", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()

    from jobs.evaluate import score_pair, scores
    from jobs.runner import run_spec
    from jobs.spec import parse_spec
    from pipeline.evaluation.metrics import BoundaryCounts
    from pipeline.synth import CLASSES, SynthConfig
    from pipeline.synth.write import write_split

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gsb-fast-"))
    split = write_split(str(work / "synth"), SynthConfig(height=args.size, width=args.size, seed=args.seed),
                        train=0, val=args.images, dataset=False)
    names = [n for n, _ in CLASSES]
    configs = {"stage 0 only (no refinement)": {"patches": 1e-9}, "MagNet (every tile)": {"patches": None},
               f"MagNet-Fast {args.patches:g}, most uncertain (gigaseg)": {"patches": args.patches},
               f"MagNet-Fast {args.patches:g}, least uncertain (reference code)":
                   {"patches": args.patches, "patch_choice": "least_uncertain"}}
    rows = []
    for label, options in configs.items():
        out = work / "out" / label.split()[0].lower() / str(abs(hash(label)))
        magnet = {"scales": 4, "replace": 0.75, "median": 5, "refiner": str(CHECKPOINTS / "magnet-pointrend-refiner.safetensors"),
                  **options}
        if options.get("patches") == 1e-9:  # one tile run, no pixel replaced: stage 0 upsampled
            magnet.update({"patches": 1.5, "replace": 1e-9})  # a count: one tile
        spec = parse_spec({
            "inputs": {"url": str(work / "synth" / "val" / "images")},
            "model": {"checkpoint": str(CHECKPOINTS / "magnet-pointrend-segmenter.safetensors"), "precision": "fp32",
                      "framework": "magnet", "magnet": magnet},
            "tiling": {"tile": 512, "overlap": 128, "margin": 64, "batch": 4},
            "output": {"url": str(out), "if_exists": "overwrite"},
            "resources": {"workers": 2, "gpus_per_worker": 1, "torch_threads": 1},
        }, "benchmark spec")
        results = run_spec(spec)
        cm, bc = np.zeros((len(names), len(names)), np.int64), BoundaryCounts(0, 0, 0, 0)
        truth = {sample.name: sample.mask_url for sample in split.val}
        for result in results:
            assert result.status == "ok", result.error
            c, b, _ = score_pair(f"{out}/{result.name}.zarr", truth[result.name], num_classes=len(names))
            cm, bc = cm + c, bc + b
        s = scores(cm, bc, [], names)
        rows.append([label, sum(r.tiles for r in results), f"{100 * s['miou']:.1f}", f"{100 * s['boundary_f1']['f1']:.1f}",
                     f"{sum(r.seconds for r in results):.0f}"])
        print(rows[-1])
    table = markdown_table(["config", "tiles", "mIoU %", "boundary F1 %", "seconds"], rows)
    print(table)
    if not args.no_results:
        body = (f"{args.images} synthetic validation scene(s) of {args.size}² (seed {args.seed}), the shipped MagNet "
                f"checkpoints (jobs/checkpoints), 4 scales, replace 0.75, median 5, tile 512, overlap 128, fp32, "
                f"2 workers × 1 thread. Pooled over the 7 classes.\n\n{table}\n")
        append_results("MagNet-Fast: most vs least uncertain tiles", body, machine())


if __name__ == "__main__":
    main()
