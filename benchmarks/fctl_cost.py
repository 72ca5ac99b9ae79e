"""FCtL's cost: wall time of an FCtL run ÷ the patch-only run on the same image, and bytes read per output MP.

Wall time: in one process on one embedded Ray cluster, interleaved, fresh jobs (``if_exists: overwrite``,
so the pyramid, the blocks and the label pyramid all count): patch-only (seeded fpn_resnet18) and FCtL with
contexts ×2 and ×4 around the same local segmenter (a seeded FCtL with γ = 0.5, so the correlation runs
for real; its cost does not depend on the weights).

Bytes read: every block of the job run in one process by the pipeline's own ``BlockWorker`` with the null model
(``benchmarks._null``; level 0 read in place, and for FCtL its context windows from the pyramid levels 1 and 2
built beside the output), every store a worker reads wrapped in a counter of the bytes each chunk GET returns;
÷ the image's megapixels. These are the compressed bytes a worker pulls from the store (what an object store
bills and a network carries).

    python -m benchmarks.fctl_cost [--size 4096] [--repeats 2] [--quick]
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

from benchmarks._cost import cost_arguments, interleaved_runs
from benchmarks._inputs import generate_scene, job_spec, scene_path
from benchmarks._results import append_results, machine, markdown_table

CONTEXTS = [2, 4]


def _spec(inputs: Path, output: Path, *, args, framework: str):
    spec = job_spec(inputs, output, width=args.width, precision="auto", classes=4, tile=512, overlap=128,
                    batch=4, workers=2, threads=1)
    if framework == "segment":
        return spec
    data = spec.model_dump(mode="json")
    data["model"]["framework"] = "fctl"
    data["model"]["fctl"] = {"contexts": CONTEXTS, "gamma": 0.5}
    from jobs.spec import parse_spec

    return parse_spec(data, "benchmark spec")


class _Discard:
    """A sink that computes the labels of each band and stores nothing: only the reads are counted."""

    def start(self, block) -> _Discard:
        return self

    def write(self, band) -> list:
        band.labels("uint8")
        return []

    def finish(self) -> list:
        return []


def bytes_read(spec, workdir: Path) -> tuple[int, int, float]:
    """(bytes of image chunks read, tiles, image megapixels) when the pipeline's own ``BlockWorker`` runs every
    block of ``spec``'s single image, in this process, with the null model (the reads do not depend on it)."""
    import zarr

    import pipeline.workers.worker as worker_module
    from benchmarks._null import NullFramework
    from jobs.plan import job_plan, resolve_model
    from pipeline.blocks import block_tiles, owned_counts, plan_blocks
    from pipeline.pyramid import level_shapes, prepare_pyramid
    from pipeline.sources.discover import discover
    from pipeline.sources.formats import open_source
    from pipeline.workers.predictor import DeviceConfig
    from pipeline.workers.worker import BlockTask, BlockWorker

    class Counting(zarr.storage.WrapperStore):
        total = 0

        async def get(self, key, prototype, byte_range=None):
            buf = await super().get(key, prototype, byte_range)
            if buf is not None and "/c/" in f"/{key}":
                Counting.total += len(buf)
            return buf

    job = job_plan(spec, resolve_model(spec))
    framework = NullFramework(job.framework, job.num_classes)
    (ref,) = discover(job.inputs.url, job.inputs.patterns, job.inputs.storage_options)
    source = open_source(ref, job.inputs.storage_options, job.inputs.value_range)
    out = job.output.layout.image(ref.name)
    pyramid = prepare_pyramid(source, out.group_url, framework.levels(len(level_shapes(source.shape_yx))),
                              chunk=job.tiling.image_chunk)
    stages = framework.stages(pyramid, out, job.tiling, job.num_classes)
    original = worker_module.zarr_store

    def counted(url, storage_options=None, *, read_only=False):
        store = original(url, storage_options, read_only=read_only)
        return Counting(store) if read_only else store  # what a worker reads: level 0 in place, the levels built

    worker_module.zarr_store = counted
    try:
        worker = BlockWorker(framework, {}, DeviceConfig("fp32", 1))
        Counting.total = 0
        tiles = 0
        for stage in stages:
            tiling, grid = job.tiling, stage.grid
            side = tiling.block_side(job.num_classes)
            owned = owned_counts(grid, side, tiling.chunk)
            for block in plan_blocks(grid.height, grid.width, tiling.chunk, side):
                worker.run(BlockTask(stage, block, tuple(block_tiles(grid, block)), _Discard(),
                                     owned.get(block.index, 0), tiling.batch, tiling.blend, tiling.sigma_scale,
                                     tiling.chunk))
            tiles += len(grid)
    finally:
        worker_module.zarr_store = original
    h, w = pyramid.shapes[0]
    return Counting.total, tiles, h * w / 1e6


def main() -> None:
    args = cost_arguments(__doc__.split("\n")[0])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gsb-fctl-"))
    scene = scene_path(workdir, args.size)
    scene.parent.mkdir(parents=True, exist_ok=True)
    generate_scene(scene, args.size)
    configs = {"patch-only": "segment", f"FCtL, contexts ×{CONTEXTS[0]} ×{CONTEXTS[1]}": "fctl"}
    out = workdir / "out"
    runs = interleaved_runs({name: functools.partial(_spec, scene.parent, args=args, framework=fw)
                             for name, fw in configs.items()}, args.repeats, out)
    read = {name: bytes_read(_spec(scene.parent, workdir / f"bytes-{fw}", args=args, framework=fw), workdir)
            for name, fw in configs.items()}
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for row in runs.rows():
        nbytes, n, mp = read[row[0]]
        rows.append([*row, f"{nbytes / mp / 1e6:.2f}", f"{nbytes / read['patch-only'][0]:.2f}"])
    table = markdown_table(["config", "tiles", "best s", "median s", "ratio to patch-only (best)",
                            "MB read per output MP", "bytes ratio"], rows)
    print(table)
    body = (
        f"Scene {args.size}² (Zarr v3, 1024² chunks; level 0 read in place, coarser levels built with 512² chunks), seeded fpn_resnet18 width "
        f"{args.width}, precision auto, 4 classes, tile 512, overlap 128, batch 4, 2 workers × 1 thread; FCtL "
        f"contexts {CONTEXTS} (levels 1 and 2 of the built pyramid), seeded γ = 0.5; {args.repeats} interleaved "
        f"repeat(s); load average during runs {min(runs.loads):.1f}–{max(runs.loads):.1f}. Bytes: compressed image-chunk "
        f"bytes all tiles' reads pull from the pyramid (tile windows, plus context windows for FCtL), per "
        f"megapixel of the image.\n\n{table}\n"
    )
    if not args.no_results:
        append_results(f"FCtL cost, {args.size}²", body, machine())
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
