"""FCtL's cost: wall time of an FCtL run ÷ the patch-only run on the same image, and bytes read per output MP.

Wall time: in one process on one embedded Ray cluster, interleaved, fresh jobs (``if_exists: overwrite``,
so ingest, tiles, blend and label pyramid all count): patch-only (seeded fpn_resnet18) and FCtL with
contexts ×2 and ×4 around the same local segmenter (a seeded FCtL with γ = 0.5, so the correlation runs
for real; its cost does not depend on the weights).

Bytes read: every tile of the job's grid read in one process through the pipeline's own ``TileWorker``
(image window, and for FCtL its context windows from pyramid levels 1 and 2) with the image store wrapped
in a counter of the bytes each chunk GET returns; ÷ the image's megapixels. These are the compressed bytes
a worker pulls from the store (what an object store bills and a network carries).

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


def bytes_read(spec, pyramid_url: str) -> tuple[int, int, float]:
    """(bytes of image chunks read, tiles, image megapixels) for every tile of ``spec``'s grid, in process."""
    import zarr

    import pipeline.workers.worker as worker_module
    from jobs.plan import job_plan, resolve_model
    from pipeline.output.arrays import create_tile_store
    from pipeline.output.layout import image_output
    from pipeline.pyramid import open_pyramid
    from pipeline.workers.predictor import DeviceConfig
    from pipeline.workers.worker import TileBatch, TileWorker

    class Counting(zarr.storage.WrapperStore):
        total = 0

        async def get(self, key, prototype, byte_range=None):
            buf = await super().get(key, prototype, byte_range)
            if buf is not None and "/c/" in f"/{key}":
                Counting.total += len(buf)
            return buf

    job = job_plan(spec, resolve_model(spec))
    work = Path(tempfile.mkdtemp(prefix="gsb-fctl-bytes-"))
    try:
        out = image_output(str(work), "scene", {})
        pyramid = open_pyramid(pyramid_url, {})
        plan = job.framework.stages(pyramid, out, job.tiling, job.num_classes)[-1]
        grid = plan.grid
        create_tile_store(plan.tiles_url, {}, (grid.ny, grid.nx, plan.num_classes, grid.tile, grid.tile))
        original = worker_module.zarr_store

        def counted(url, storage_options=None, *, read_only=False):
            store = original(url, storage_options, read_only=read_only)
            return Counting(store) if read_only and url.rstrip("/") == pyramid_url.rstrip("/") else store

        worker_module.zarr_store = counted
        try:
            worker = TileWorker(job.framework, job.output.storage_options,
                                DeviceConfig(job.pool.precision, job.pool.torch_threads))
            Counting.total = 0
            indices = grid.indices()
            for i in range(0, len(indices), 8):
                worker.run(TileBatch(plan, tuple(indices[i : i + 8])))
        finally:
            worker_module.zarr_store = original
        h, w = pyramid.shapes[0]
        return Counting.total, len(grid), h * w / 1e6
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    args = cost_arguments(__doc__.split("\n")[0])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gsb-fctl-"))
    scene = scene_path(workdir, args.size)
    scene.parent.mkdir(parents=True, exist_ok=True)
    generate_scene(scene, args.size)
    configs = {"patch-only": "segment", f"FCtL, contexts ×{CONTEXTS[0]} ×{CONTEXTS[1]}": "fctl"}
    out = workdir / "out"
    runs = interleaved_runs({name: functools.partial(_spec, scene.parent, args=args, framework=fw)
                             for name, fw in configs.items()}, args.repeats, out, keep_last=True)
    # the last run left the ingested pyramid in the output: count the reads against it
    pyramid_url = str(out / "scene.zarr")
    read = {name: bytes_read(_spec(scene.parent, workdir / "unused", args=args, framework=fw), pyramid_url)
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
        f"Scene {args.size}² (Zarr v3, ingested as a zstd pyramid with 512² chunks), seeded fpn_resnet18 width "
        f"{args.width}, precision auto, 4 classes, tile 512, overlap 128, batch 4, 2 workers × 1 thread; FCtL "
        f"contexts {CONTEXTS} (levels 1 and 2 read as they are), seeded γ = 0.5; {args.repeats} interleaved "
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
