"""Context comparison: resize-only, patch-only, MagNet, FCtL and the PointRend variants, same segmenter and budget.

On the synthetic archive (``pipeline.synth``: a context pair told apart only by its regions' rims, and 2–6 px
roads that a whole-image downsample loses) and on the DeepGlobe sample (``--dataset deepglobe``: train on 8
pairs, score the other 2, mIoU over classes 1–6):

1. the archive (``write_split``: ``--train`` + ``--val`` images of ``--image``², in ``--workdir``) and a training
   dataset of the training images only;
2. ``gigaseg train`` per model (``benchmarks._comparison_train``: the budget rule is in its docstring);
3. each method on the validation images (``benchmarks._comparison_run``): resize-only in this process (the whole
   image resized to the crop size, one forward pass, probabilities upsampled bilinearly), the others through
   ``gigaseg run`` in a subprocess; seconds and peak ΣRSS of the process tree (``TreeSampler``) per method;
4. ``jobs.evaluate`` against the ground truth: mIoU, per-class IoU, boundary F1 (3 px tolerance), pooled over
   the validation images; a figure per method (``benchmarks/figures/``) of one region: image, truth, mask.

    python -m benchmarks.context_comparison [--dataset synth|deepglobe] [--methods resize,patch,...]
                                            [--steps N] [--stage-steps N] [--workdir DIR] [--no-results]

Prints the table and appends it, with the commands, to ``benchmarks/RESULTS.md``; writes the figures
(``--no-results``: neither). ``--train-only`` stops after training (how ``jobs/checkpoints/`` were made).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._comparison_train import Budget, train_all
from benchmarks._results import REPO

METHODS = ("resize", "patch", "magnet", "fctl", "patch+pointrend", "magnet+pointrend", "fctl+pointrend")
SYNTH_SEED = 0
DEEPGLOBE = REPO.parent / "shared" / "data" / "deepglobe-sample"


def synth_data(work: Path, image: int, n_train: int, n_val: int) -> tuple[str, list[tuple[str, str, str]], list[str]]:
    """The synthetic archive and a dataset of its training images; returns (dataset, [(name, image, mask)], classes)."""
    from pipeline.sources.discover import ImageRef
    from pipeline.synth import CLASSES, SynthConfig
    from pipeline.synth.write import write_split
    from pipeline.training.dataset_import import import_samples
    from pipeline.training.dataset_pairs import Pair

    split = write_split(str(work / "synth"), SynthConfig(height=image, width=image, seed=SYNTH_SEED),
                        train=n_train, val=n_val, dataset=False)
    dataset = work / "dataset"
    names = sorted(s.name for s in split.train)
    info = dataset / "dataset.json"
    if not (info.exists() and sorted(json.loads(info.read_text()).get("images", [])) == names):
        pairs = [Pair(s.name, ImageRef(s.image_url, s.name, "zarr"), ImageRef(s.mask_url, s.name, "zarr"))
                 for s in split.train]
        import_samples(pairs, str(dataset), classes=list(CLASSES), mask_kind="index", chunk=512, overwrite=True)
    val = [(s.name, s.image_url, s.mask_url) for s in split.val]
    return str(dataset), val, [n for n, _ in CLASSES]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.context_comparison", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=["synth", "deepglobe"], default="synth")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=Budget.steps, help="optimiser steps of every segmenter")
    p.add_argument("--stage-steps", type=int, default=Budget.stage_steps,
                   help="steps of each extra stage (MagNet refiner, FCtL contexts and fused)")
    p.add_argument("--width", type=int, default=Budget.width)
    p.add_argument("--class-weights", default=Budget.class_weights, choices=["none", "median_frequency"],
                   help="loss.class_weights of every training run")
    p.add_argument("--fctl-contexts", default=",".join(f"{f:g}" for f in Budget.fctl_contexts),
                   help="FCtL's context factors, comma-separated (each reads pyramid level ⌊log2 f⌋)")
    p.add_argument("--plain-refiner", action="store_true",
                   help="MagNet's refiner as in the reference (no log O skip, trained from noise)")
    p.add_argument("--image", type=int, default=2448, help="synth: image side")
    p.add_argument("--train", type=int, default=4, help="synth: training images")
    p.add_argument("--val", type=int, default=2, help="synth: validation images")
    p.add_argument("--workdir", type=Path, default=None, help="default /tmp/gigaseg-context-<dataset>")
    p.add_argument("--train-only", action="store_true", help="train the models and stop")
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    work = (args.workdir or Path(f"/tmp/gigaseg-context-{args.dataset}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    budget = Budget(steps=args.steps, stage_steps=args.stage_steps, width=args.width,
                    image=args.image if args.dataset == "synth" else 2448,
                    fctl_contexts=tuple(float(f) for f in args.fctl_contexts.split(",")),
                    class_weights=args.class_weights, refiner_residual=not args.plain_refiner)
    commands: list[str] = []
    if args.dataset == "synth":
        dataset, val, classes = synth_data(work, args.image, args.train, args.val)
        exclude: list[str] = []
    else:
        from benchmarks._comparison_run import deepglobe_data

        dataset, val, classes = deepglobe_data(DEEPGLOBE, work, commands)
        exclude = ["unknown"]
    print(f"training in {work} (budget {budget}) ...", flush=True)
    trained = train_all(budget, dataset, work, methods, exclude, commands)
    if args.train_only:
        return
    from benchmarks._comparison_run import report

    report(args, budget, methods, trained, val, classes, exclude, work, commands)


if __name__ == "__main__":
    main()
