"""A whole job in one process (the real block worker, called in turn instead of through Ray), optionally killed
with SIGKILL in the middle of one write: ``python -m tests.jobs.torn_run SPEC_JSON [PATTERN N [CONTENT]]``, or
``run_in_child`` (a child of a fork server that has imported gigaseg once, so each run starts in milliseconds).

Every file the job opens for writing goes through ``io.open`` (Zarr's ``LocalStore`` through ``Path.open``,
``pipeline.storage.write_bytes`` through ``os.fdopen``). With a kill point, the ``N``-th write into a file whose
path matches the regular expression ``PATTERN`` (and, if given, whose bytes contain ``CONTENT``) writes half its
bytes, flushes them to the file and kills the process: no handler, no cleanup, as an OOM kill or a lost node.
Without one the job runs to the end and prints its results as JSON.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import signal
import sys
from dataclasses import asdict


def install_kill(pattern: str, n: int, content: str | None = None) -> None:
    rx, real_open, seen = re.compile(pattern), io.open, [0]

    class Dying:
        def __init__(self, f) -> None:
            self._f = f

        def write(self, b) -> int:
            data = bytes(b)
            if content is None or content.encode() in data:
                seen[0] += 1
                if seen[0] == n:
                    self._f.write(data[: len(data) // 2])
                    self._f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return self._f.write(b)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self._f.close()

    def path_of(file) -> str:
        if isinstance(file, int):
            try:
                return os.readlink(f"/proc/self/fd/{file}")
            except OSError:
                return ""
        return os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""

    def patched(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and rx.search(path_of(file)):
            return Dying(f)
        return f

    io.open = builtins.open = patched


class LocalPool:
    """The engine's worker pool, duck-typed: one ``BlockWorker`` in this process runs the calls in turn."""

    def __init__(self, plan) -> None:
        from pipeline.workers.predictor import DeviceConfig
        from pipeline.workers.worker import BlockWorker

        self.config = plan.pool
        self.worker = BlockWorker(plan.framework, dict(plan.output.storage_options),
                                  DeviceConfig(precision=plan.pool.precision, torch_threads=1))

    def run(self, calls, *, retries, on_result, on_failure=None, on_retry=None) -> None:
        while True:
            call = calls.next()
            if call is None:
                if calls.exhausted():
                    return
                calls.wait(0.05)
                continue
            on_result(call, self.worker.run(call.task))


def run(spec_data: dict):
    """The job of ``spec_data``, as ``jobs.runner.run_spec`` runs it (lease, weights copy, report), without Ray."""
    import torch

    from jobs.plan import job_plan, resolve_model
    from jobs.progress import ProgressBar
    from jobs.report import Report
    from jobs.runner import hold_output
    from jobs.spec import parse_spec
    from pipeline.engine import list_images, run_job

    spec = parse_spec(spec_data)
    threads = torch.get_num_threads()  # the worker sets its own: the calling process keeps its setting
    try:
        with hold_output(spec):
            plan = job_plan(spec, resolve_model(spec))
            refs = list_images(plan)
            report = Report(spec.output.url, dict(spec.output.storage_options), [r.name for r in refs],
                            spec.model_dump(mode="json"))
            return run_job(plan, refs, LocalPool(plan), ProgressBar(enabled=False), on_image=report.add)
    finally:
        torch.set_num_threads(threads)


def _child(spec_data: dict, kill: tuple | None, results) -> None:
    if kill:
        install_kill(*kill)
    results.put([asdict(r) for r in run(spec_data)])


_SERVER = None


def run_in_child(spec_data: dict, kill: tuple[str, int, str | None] | None = None) -> tuple[int, list | None]:
    """``(exit code, results)`` of the job in a child process (exit code -9: killed at ``kill``)."""
    import multiprocessing

    global _SERVER
    if _SERVER is None:
        _SERVER = multiprocessing.get_context("forkserver")
        _SERVER.set_forkserver_preload(["tests.jobs.torn_run", "jobs.runner", "jobs.plan", "jobs.report"])
    results = _SERVER.Queue()
    child = _SERVER.Process(target=_child, args=(spec_data, kill, results))
    child.start()
    child.join(300)
    out = results.get(timeout=5) if child.exitcode == 0 else None
    return child.exitcode, out


if __name__ == "__main__":
    spec_data = json.loads(sys.argv[1])
    if len(sys.argv) > 2:
        install_kill(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    print(json.dumps([asdict(r) for r in run(spec_data)]))
