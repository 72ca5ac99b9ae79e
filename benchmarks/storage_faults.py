"""Storage faults: what a job does when S3 (or the local disk) fails, fault kind × rate → outcome.

A moto S3 server on 127.0.0.1 with the fault proxy of ``tests/faults_s3.py`` in front; inputs and outputs on it
(2 images: a 768² Zarr read in place and a 512² tiled TIFF read by byte ranges), one local Ray cluster for all
runs. Each transient fault is injected on every kind of request (GET, PUT, HEAD, LIST; inputs and outputs) at
each rate; each run is compared with a clean run (masks and confidence, bit for bit). Persistent faults are
timed from the moment they start to the moment the job reports them (the image's failure, or the job's stop).

``python -m benchmarks.storage_faults [--quick] [--no-results]``
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks._inputs import ray_temp_dir
from benchmarks._results import append_results, machine, machine_line, markdown_table

ARRAYS = ("labels/segmentation/0", "labels/segmentation/1", "labels/segmentation/2", "confidence")
TRANSIENT = ("slowdown", "error", "reset", "delay")


def _archive(root: Path) -> Path:
    import tifffile
    import zarr

    from pipeline.synth.land_cover import land_cover

    root.mkdir(parents=True)
    arr = zarr.create_array(store=str(root / "a.zarr"), shape=(768, 768, 3), chunks=(256, 256, 3), dtype="uint8")
    arr[:] = land_cover(0, 0, 768, 768, seed=61)
    tifffile.imwrite(root / "b.tif", land_cover(0, 0, 512, 512, seed=62), bigtiff=True, tile=(128, 128))
    return root


def _spec(inputs: str, output: str, endpoint: str | None, **overrides):
    from jobs.spec import parse_spec
    from tests.archive import spec_dict

    so = {"endpoint_url": endpoint} if endpoint else {}
    return parse_spec(spec_dict(inputs, output, inputs__storage_options=so, output__storage_options=so,
                                output__extras=["confidence"], tiling__tiles_per_call=16, **overrides))


def _arrays(url: str, endpoint: str | None, name: str) -> dict[str, np.ndarray]:
    import zarr

    from pipeline.storage import zarr_store

    so = {"endpoint_url": endpoint} if endpoint else {}
    group = zarr.open_group(store=zarr_store(f"{url}/{name}.zarr", so, read_only=True), mode="r")
    return {p: group[p][:] for p in ARRAYS if p in group}


class _Watch:
    """A progress bar that records when each image ends, and runs ``hook`` after the first one."""

    def __init__(self, hook=None) -> None:
        from jobs.progress import ProgressBar

        self.bar, self.hook, self.ended = ProgressBar(enabled=False), hook, []

    def start_image(self, *a) -> None:
        self.bar.start_image(*a)

    def advance(self, *a) -> None:
        self.bar.advance(*a)

    def end_image(self, result) -> None:
        self.ended.append((time.monotonic(), result))
        if self.hook and len(self.ended) == 1:
            self.hook()
            self.hook_at = time.monotonic()


def _run(spec, progress=None):
    """``(results or the exception, wall seconds, report totals)``."""
    from jobs.runner import run_spec

    t0 = time.monotonic()
    try:
        out = run_spec(spec, progress=progress)
    except Exception as err:  # noqa: BLE001 - a persistent fault's outcome
        out = err
    return out, time.monotonic() - t0


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "gigaseg-bench", str(path)], capture_output=True,
                          check=False)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 % only, no 20 % rows")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import ray
    import s3fs
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    from pipeline.errors import OutputUnwritableError
    from tests.faults_s3 import FaultProxy, FaultRule

    for name in ("werkzeug", "ray", "botocore", "s3fs", "aiobotocore", "jobs", "pipeline", "gigaseg"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    m = machine()
    print(machine_line(m))
    rates = (0.05,) if args.quick else (0.05, 0.20)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto = f"http://{host}:{port}"
    bucket = "bench-storage-faults"
    s3fs.S3FileSystem(endpoint_url=moto).mkdir(bucket)
    rows, persistent = [], []
    with ray_temp_dir() as tmp:
        s3fs.S3FileSystem(endpoint_url=moto).put(str(_archive(tmp / "in")) + "/", f"{bucket}/archive/",
                                                 recursive=True)
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 2**20, _temp_dir=str(tmp / "ray"), configure_logging=False)
        inputs = f"s3://{bucket}/archive"
        try:
            results, clean_s = _run(_spec(inputs, f"s3://{bucket}/clean", moto))
            assert all(r.status == "ok" for r in results), [r.error for r in results]
            clean = {r.name: _arrays(f"s3://{bucket}/clean", moto, r.name) for r in results}
            rows.append(["none", "—", "ok", 0, 0, f"{clean_s:.1f}", "—", "—"])
            cases = [(f, r, (FaultRule(f, r, delay_s=0.2),)) for r in rates for f in TRANSIENT]
            cases.append(("all four", 0.05, (FaultRule("slowdown", 0.015), FaultRule("error", 0.015),
                                             FaultRule("reset", 0.02), FaultRule("delay", 0.02, delay_s=0.2))))
            for i, (fault, rate, rules) in enumerate(cases):
                with FaultProxy(moto, seed=args.seed, rules=rules) as proxy:
                    out = f"s3://{bucket}/t{i}"
                    got, seconds = _run(_spec(inputs, out, proxy.url))
                    injected = sum(proxy.injected.values())
                if isinstance(got, Exception):
                    rows.append([fault, f"{rate:.0%}", f"stopped: {type(got).__name__}", "—", injected,
                                 f"{seconds:.1f}", "—", "—"])
                    continue
                same = all(r.status == "ok" and all(np.array_equal(a, clean[r.name][k]) for k, a in
                                                    _arrays(out, moto, r.name).items()) for r in got)
                retries = status_retries(out, moto)
                rows.append([fault, f"{rate:.0%}", ", ".join(sorted({r.status for r in got})), retries, injected,
                             f"{seconds:.1f}", f"{seconds - clean_s:+.1f}", "yes" if same else "**no**"])
                print(rows[-1], flush=True)

            # persistent faults: each timed from its start to the job's report of it
            deny = FaultRule("forbidden", 1.0, frozenset({"PUT", "POST", "DELETE"}), prefix=f"{bucket}/p-denied/")
            with FaultProxy(moto, rules=(deny,)) as proxy:
                got, seconds = _run(_spec(inputs, f"s3://{bucket}/p-denied", proxy.url))
            persistent.append(_stopped("403 AccessDenied on every write to the output", got, seconds,
                                       f"s3://{bucket}/p-denied", OutputUnwritableError))
            slow = FaultRule("slowdown", 1.0, frozenset({"PUT"}), prefix=f"{bucket}/p-throttled/")
            with FaultProxy(moto, rules=(slow,)) as proxy:
                got, seconds = _run(_spec(inputs, f"s3://{bucket}/p-throttled", proxy.url))
            persistent.append(_stopped("503 SlowDown on every write to the output, never clearing", got, seconds,
                                       f"s3://{bucket}/p-throttled", OutputUnwritableError))
            with FaultProxy(moto) as proxy:
                gone = FaultRule("no_bucket", 1.0, prefix=f"{bucket}/")
                watch = _Watch(lambda: proxy.set_rules(gone))
                got, seconds = _run(_spec(inputs, f"s3://{bucket}/p-gone", proxy.url, failure__mode="fail_fast"),
                                    watch)
            persistent.append(_failed("the bucket disappears after the first image", watch, f"s3://{bucket}/"))
            for kind, options in (("read-only", "ro,size=1m"), ("full", "size=3m")):
                path = tmp / f"disk-{kind}"
                if not _mount(path, options):
                    persistent.append([f"local disk {kind}", "not run (cannot mount a tmpfs here)", "—", "—",
                                       "—"])
                    continue
                try:
                    watch = _Watch()
                    t0 = time.monotonic()
                    got, seconds = _run(_spec(str(tmp / "in"), str(path), None, failure__mode="fail_fast"), watch)
                    if kind == "read-only":
                        persistent.append(_stopped("local disk read-only (tmpfs mounted ro)", got, seconds,
                                                   str(path), OutputUnwritableError))
                    else:
                        watch.hook_at = t0
                        persistent.append(_failed("local disk full (3 MB tmpfs; timed from the job's start)", watch,
                                                  str(path)))
                finally:
                    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
        finally:
            ray.shutdown()
            server.stop()

    transient_ok = all(r[2] == "ok" and r[7] == "yes" for r in rows[1:] if r[1] == "5%")
    persistent_ok = all(r[2] != "—" and r[3] == "yes" and float(r[2].split()[0]) <= 60 for r in persistent
                        if not r[1].startswith("not run")) and bool(persistent)
    body = "\n".join([
        ("Inputs and outputs on a moto S3 server behind the fault proxy (`tests/faults_s3.py`): a 768² Zarr (read in "
        "place) and a 512² tiled TIFF (byte ranges); fpn_resnet18 width 8, tile 128, overlap 32, 256² mask chunks, "
        "confidence; 2 workers on one local Ray cluster. Transient faults on every kind of request (GET, PUT, HEAD, "
        "LIST) of inputs and outputs at the rate shown, seeded; retries: what report.json counts (botocore's and "
        "gigaseg's; aiohttp re-sends an idempotent request on a reused connection closed before any answer by "
        "itself, uncounted); faults: requests the proxy failed or delayed; identical: every mask level and the "
        "confidence, bit for bit, against the clean run."),
        "",
        markdown_table(["fault", "rate", "outcome", "retries counted", "faults injected", "wall s",
                        "extra vs clean", "identical"], rows),
        "",
        "Persistent faults, timed from their start to the job's report:",
        "",
        markdown_table(["fault", "outcome", "reported after", "URL named", "error (first 160 characters)"],
                       persistent),
        "",
        ("**Target: every transient kind at 5 % survived with identical output: "
         f"{'met' if transient_ok else 'NOT met'}; every persistent kind reported within 60 s with the URL named: "
         f"{'met' if persistent_ok else 'NOT met'}.**"),
    ])
    print("\n" + body)
    if not args.no_results:
        append_results("Storage faults", body, m)


def status_retries(output: str, endpoint: str) -> int:
    """The retries report.json counts for the whole job."""
    import json

    import s3fs

    return json.loads(s3fs.S3FileSystem(endpoint_url=endpoint).cat(f"{output.removeprefix('s3://')}/report.json"))[
        "totals"]["retries"]


def _stopped(what: str, got, seconds: float, url: str, expected: type) -> list:
    if not isinstance(got, Exception):
        return [what, f"ran: {sorted({r.status for r in got})}", f"{seconds:.1f} s", "—", "—"]
    text = str(got)
    outcome = "job stopped before any work" if isinstance(got, expected) else f"stopped: {type(got).__name__}"
    return [what, outcome, f"{seconds:.1f} s", "yes" if url in text else "no", text[:160].replace("|", "/")]


def _failed(what: str, watch: _Watch, url: str) -> list:
    failed = [(t, r) for t, r in watch.ended if r.status == "failed"]
    if not failed or not hasattr(watch, "hook_at"):
        return [what, "no image failed", "—", "—", "—"]
    t, r = failed[0]
    kept = [x.name for _, x in watch.ended if x.status == "ok"]
    return [what, f"image {r.name} failed" + (f", {', '.join(kept)} finished before" if kept else ""),
            f"{t - watch.hook_at:.1f} s",
            "yes" if url in (r.error or "") else "no", (r.error or "")[:160].replace("|", "/")]


if __name__ == "__main__":
    main()
