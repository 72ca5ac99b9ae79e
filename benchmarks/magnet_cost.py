"""MagNet's cost: wall time of a 3-scale MagNet run ÷ the patch-only run, same image and segmenter.

Runs, in one process on one embedded Ray cluster, interleaved: patch-only (one stage at full resolution)
and MagNet with 3 scales (stages at levels 2, 1, 0) with a seeded refiner of the reference width (64) and
a narrow one (16), and MagNet-Fast (the reference's ``--n_patches``: each refinement stage runs only the
most uncertain quarter of its tiles). Same seeded fpn_resnet18 segmenter, tile, overlap, batch and workers
for all. Each run is a fresh job (`if_exists: overwrite`), so ingest, tiles, stage blends and the label
pyramid all count.

    python -m benchmarks.magnet_cost [--size 4096] [--repeats 2] [--quick]
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

from benchmarks._cost import cost_arguments, interleaved_runs
from benchmarks._inputs import generate_scene, job_spec, scene_path
from benchmarks._results import append_results, machine, markdown_table


def _spec(inputs: Path, output: Path, *, args, framework: str, refiner_width: int = 64, patches: float | None = None):
    spec = job_spec(inputs, output, width=args.width, precision="auto", classes=4, tile=512, overlap=128,
                    batch=4, workers=2, threads=1)
    if framework == "segment":
        return spec
    data = spec.model_dump(mode="json")
    data["model"]["framework"] = "magnet"
    data["model"]["magnet"] = {"scales": 3, "replace": 0.75, "median": 5, "refiner_width": refiner_width,
                               "patches": patches}
    from jobs.spec import parse_spec

    return parse_spec(data, "benchmark spec")


def main() -> None:
    args = cost_arguments(__doc__.split("\n")[0])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gsb-magnet-"))
    scene = scene_path(workdir, args.size)
    scene.parent.mkdir(parents=True, exist_ok=True)
    generate_scene(scene, args.size)
    configs = {"patch-only": ("segment", 64, None), "MagNet 3 scales, refiner width 64": ("magnet", 64, None),
               "MagNet 3 scales, refiner width 16": ("magnet", 16, None),
               "MagNet-Fast 3 scales (patches 0.25), refiner width 64": ("magnet", 64, 0.25),
               "MagNet-Fast 3 scales (patches 0.25), refiner width 16": ("magnet", 16, 0.25)}
    runs = interleaved_runs({name: functools.partial(_spec, scene.parent, args=args, framework=fw, refiner_width=rw,
                                                     patches=p) for name, (fw, rw, p) in configs.items()},
                            args.repeats, workdir / "out")
    table = markdown_table(["config", "tiles", "best s", "median s", "ratio to patch-only (best)"], runs.rows())
    print(table)
    body = (
        f"Scene {args.size}² (Zarr v3), seeded fpn_resnet18 width {args.width}, precision auto, 4 classes, tile 512, "
        f"overlap 128, batch 4, 2 workers × 1 thread; MagNet replace 0.75, median 5; {args.repeats} interleaved "
        f"repeat(s); load average during runs {min(runs.loads):.1f}–{max(runs.loads):.1f}. Target: MagNet 3 scales ÷ "
        f"patch-only ≤ 1.5.\n\n{table}\n"
    )
    if not args.no_results:
        append_results(f"MagNet cost, {args.size}²", body, machine())
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
