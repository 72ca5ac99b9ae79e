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

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import (
    append_results, check_ok, generate_scene, job_spec, machine, markdown_table, scene_path,
)

CONTEXTS = [2, 4]


def _spec(inputs: Path, output: Path, args, framework: str):
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

    import pipeline.worker as worker_module
    from jobs.runner import job_config, resolve_model
    from pipeline import stages
    from pipeline.output import create_tile_store, image_output
    from pipeline.pyramid import open_pyramid
    from pipeline.worker import TileBatch, TileWorker

    class Counting(zarr.storage.WrapperStore):
        total = 0

        async def get(self, key, prototype, byte_range=None):
            buf = await super().get(key, prototype, byte_range)
            if buf is not None and "/c/" in f"/{key}":
                Counting.total += len(buf)
            return buf

    model = resolve_model(spec)
    cfg = job_config(spec, model)
    work = Path(tempfile.mkdtemp(prefix="gsb-fctl-bytes-"))
    try:
        out = image_output(str(work), "scene", {})
        pyramid = open_pyramid(pyramid_url, {})
        plan = stages.stage_plans(cfg, out, pyramid)[-1]
        grid = plan.grid
        create_tile_store(plan.tiles_url, {}, (grid.ny, grid.nx, plan.num_classes, grid.tile, grid.tile))
        ckpt = work / "model.safetensors"
        ckpt.write_bytes(model.checkpoint)
        original = worker_module.zarr_store

        def counted(url, storage_options=None, *, read_only=False):
            store = original(url, storage_options, read_only=read_only)
            return Counting(store) if read_only and url.rstrip("/") == pyramid_url.rstrip("/") else store

        worker_module.zarr_store = counted
        try:
            worker = TileWorker(str(ckpt), {}, cfg.pool.predictor)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--width", type=int, default=64, help="segmenter width (64 = the real default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2048², one repeat")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = 2048, 1
    import ray

    from jobs.progress import ProgressBar
    from jobs.runner import run_spec

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gsb-fctl-"))
    scene = scene_path(workdir, args.size)
    scene.parent.mkdir(parents=True, exist_ok=True)
    generate_scene(scene, args.size)
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="gsb-", dir="/tmp"), log_to_driver=False)
    configs = [("patch-only", "segment"), (f"FCtL, contexts ×{CONTEXTS[0]} ×{CONTEXTS[1]}", "fctl")]
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    tiles: dict[str, int] = {}
    loads = []
    out = workdir / "out"
    for _ in range(args.repeats):
        for name, framework in configs:
            t0 = time.perf_counter()
            results = run_spec(_spec(scene.parent, out, args, framework), progress=ProgressBar(enabled=False))
            times[name].append(time.perf_counter() - t0)
            check_ok(results)
            tiles[name] = results[0].tiles
            loads.append(os.getloadavg()[0])
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    ray.shutdown()
    # the last run left the ingested pyramid in the output: count the reads against it
    pyramid_url = str(out / "scene.zarr")
    read = {name: bytes_read(_spec(scene.parent, workdir / "unused", args, fw), pyramid_url) for name, fw in configs}
    shutil.rmtree(out, ignore_errors=True)
    base = min(times["patch-only"])
    rows = []
    for name, ts in times.items():
        nbytes, n, mp = read[name]
        rows.append((name, tiles[name], f"{min(ts):.1f}", f"{statistics.median(ts):.1f}", f"{min(ts) / base:.2f}",
                     f"{nbytes / mp / 1e6:.2f}", f"{nbytes / read['patch-only'][0]:.2f}"))
    table = markdown_table(["config", "tiles", "best s", "median s", "ratio to patch-only (best)",
                            "MB read per output MP", "bytes ratio"], rows)
    print(table)
    body = (
        f"Scene {args.size}² (Zarr v3, ingested as a zstd pyramid with 512² chunks), seeded fpn_resnet18 width "
        f"{args.width}, precision auto, 4 classes, tile 512, overlap 128, batch 4, 2 workers × 1 thread; FCtL "
        f"contexts {CONTEXTS} (levels 1 and 2 read as they are), seeded γ = 0.5; {args.repeats} interleaved "
        f"repeat(s); load average during runs {min(loads):.1f}–{max(loads):.1f}. Bytes: compressed image-chunk "
        f"bytes all tiles' reads pull from the pyramid (tile windows, plus context windows for FCtL), per "
        f"megapixel of the image.\n\n{table}\n"
    )
    if not args.no_results:
        append_results(f"FCtL cost, {args.size}²", body, machine())
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
