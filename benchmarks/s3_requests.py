"""S3 requests per tile, counted at a moto server on 127.0.0.1 (every process of the job talks to it).

1. A real run (``tests/jobs/test_s3_requests.py``'s job: a 1024² Zarr scene, 36 tiles of 256², embedded
   local Ray, input and output on the server): requests per tile by part of the job and kind.
2. The input reads alone, side by side on the same server: the job's tiles read one window at a time
   (``read_window``) against batches of ``--batch`` tiles read as runs of side-by-side windows
   (``read_windows``, what the workers do): GETs per tile and seconds.

    python -m benchmarks.s3_requests [--batch 4] [--no-results]
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import tempfile
import time
from pathlib import Path

from benchmarks._inputs import ray_temp_dir
from benchmarks._results import append_results, machine, machine_line, markdown_table

for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
               ("AWS_DEFAULT_REGION", "us-east-1"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_k, _v)


def input_reads(bucket: str, options: dict, counter, batch: int) -> list[list]:
    """GETs per tile and seconds of reading every tile of the run's grid, alone and batched."""
    import zarr

    from pipeline.reader import read_window, read_windows
    from pipeline.storage import zarr_store
    from pipeline.tiling import TileGrid
    from tests.jobs.test_s3_requests import SIZE

    arr = zarr.open_array(store=zarr_store(f"s3://{bucket}/archive/scene.zarr", options, read_only=True), mode="r")
    grid = TileGrid(SIZE, SIZE, 256, 64, margin=32)
    windows = [grid.window(iy, ix) for iy, ix in grid.indices()]
    rows = []
    for name, read in (
        ("one window at a time (read_window)", lambda ws: [read_window(arr, "yxc", (SIZE, SIZE), w) for w in ws]),
        (f"batches of {batch}, side-by-side runs (read_windows)", lambda ws: read_windows(arr, "yxc", (SIZE, SIZE), ws)),
    ):
        before = sum(n for kind, _, n in counter.for_bucket(bucket) if kind == "GET")
        t0 = time.perf_counter()
        for i in range(0, len(windows), batch):
            read(windows[i : i + batch])
        seconds = time.perf_counter() - t0
        gets = sum(n for kind, _, n in counter.for_bucket(bucket) if kind == "GET") - before
        rows.append([name, len(windows), gets, f"{gets / len(windows):.2f}", f"{seconds:.2f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="tiles per read batch in part 2 (the run's tiling.batch)")
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    import s3fs

    from tests.jobs.test_s3_requests import BUDGET_PER_TILE, OTHER_PER_TILE, count_run
    from tests.s3count import CountingMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's line per request
    m = machine()
    print(machine_line(m))
    server = CountingMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}"}
        bucket = "bench-s3-requests"
        s3fs.S3FileSystem(**options).mkdir(bucket)
        with ray_temp_dir():
            by_area, tiles = count_run(Path(tempfile.mkdtemp(prefix="gsb-s3-")), bucket, options, server.counter)
        reads = input_reads(bucket, options, server.counter, args.batch)
    finally:
        server.stop()

    kinds = sorted({k for _, k in by_area})
    areas = sorted({a for a, _ in by_area})
    rows = [[a, *(f"{by_area.get((a, k), 0) / tiles:.2f}" for k in kinds),
             f"{sum(by_area.get((a, k), 0) for k in kinds) / tiles:.2f}"] for a in areas]
    total = collections.Counter()
    for (_, k), n in by_area.items():
        total[k] += n
    rows.append(["**all**", *(f"{total[k] / tiles:.2f}" for k in kinds), f"**{sum(total.values()) / tiles:.2f}**"])
    over = {k: round(n / tiles, 2) for k, n in by_area.items() if n / tiles > BUDGET_PER_TILE.get(k, OTHER_PER_TILE)}
    body = "\n".join([
        "`python -m benchmarks.s3_requests`  ",
        f"Requests per tile counted at a moto server on 127.0.0.1: a 1024² RGB Zarr scene (256² chunks), "
        f"{tiles} tiles of 256² (overlap 64, margin 32, batch 4), 512² mask chunks, embedded local Ray, "
        "2 workers; input and output on the server.",
        "",
        markdown_table(["part of the job", *kinds, "all"], rows),
        "",
        f"Budget of `tests/jobs/test_s3_requests.py`: {'every pair within it' if not over else f'OVER: {over}'}.",
        "",
        "The input reads alone, every tile of the same grid read from the same server, side by side:",
        "",
        markdown_table(["reads", "tiles", "GETs", "GETs / tile", "seconds"], reads),
    ])
    print("\n" + body)
    if not args.no_results:
        append_results("S3 requests per tile", body, m)


if __name__ == "__main__":
    main()
