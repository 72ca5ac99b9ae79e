"""Memory and CPU of a run's whole process tree: the driver and every descendant (Ray's system processes,
its workers), sampled from a thread."""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

_RAY_SYSTEM_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def role(proc, root_pid: int) -> str | None:
    """``driver``, ``ray workers`` (actors, idle workers) or ``ray system`` (gcs, raylet, agents, monitors); None
    for a process that ended before its command line could be read."""
    if proc.pid == root_pid:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001  (a process that just ended)
        return None
    if cmd.startswith("ray::") and not cmd.startswith(_RAY_SYSTEM_TITLES) or "default_worker.py" in cmd:
        return "ray workers"
    return "ray system"


def _busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine spent busy since boot (``/proc/stat``, everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class TreeSampler:
    """Samples this process and all its descendants in a thread: ΣRSS every ``interval`` s, ΣPSS every
    ``pss_interval`` s (None: never), each process's CPU time, peaks with a per-role breakdown, and the
    CPU the rest of the machine used meanwhile (``/proc/stat`` busy time minus this tree's).

    Processes whose command line holds ``marker`` (the run's Ray temp dir) but that are not descendants are
    included too and counted in ``strays``; ``phase()`` labels each sample (peaks are kept per phase too).
    """

    def __init__(self, interval: float = 0.2, pss_interval: float | None = None, marker: str | None = None,
                 phase: Callable[[], str] = lambda: "run"):
        import threading

        import psutil

        self._psutil, self.root = psutil, psutil.Process()
        self.interval, self.pss_interval, self.marker, self.phase = interval, pss_interval, marker, phase
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._procs: dict[int, Any] = {}
        self._cpu: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._cpu0 = sum(self.root.cpu_times()[:2])
        self.strays: set[int] = set()
        self.samples = 0
        self.peak_rss = self.peak_pss = 0
        self.peak_rss_roles: dict[str, int] = {}
        self.peak_pss_roles: dict[str, int] = {}
        self.peak_rss_phase: dict[str, int] = defaultdict(int)
        self.peak_rss_at = self.peak_pss_at = ""
        self.max_procs = 0

    def __enter__(self) -> TreeSampler:
        self._busy0, self._t0 = _busy_cpu_seconds(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self._t0
        self.own_cpu = sum(self._cpu.values()) - self._cpu0
        self.machine_cpu = _busy_cpu_seconds() - self._busy0
        self.other_cpu = max(0.0, self.machine_cpu - self.own_cpu)
        self.other_load = self.other_cpu / (self.wall * (os.cpu_count() or 1))

    def _tree(self, scan: bool) -> list:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self._psutil.Error:
            procs = [self.root]
        pids = {p.pid for p in procs}
        if scan and self.marker:
            for p in self._psutil.process_iter(["cmdline"]):
                if p.pid not in pids and self.marker in " ".join(p.info["cmdline"] or []):
                    self.strays.add(p.pid)
        procs += [self._procs.setdefault(pid, self._psutil.Process(pid)) for pid in self.strays if pid not in pids
                  and self._psutil.pid_exists(pid)]
        return procs

    def cpu_by_role(self) -> dict[str, float]:
        """CPU-seconds by role (``role``) since the sampler was made (the driver's counted from its start)."""
        out: dict[str, float] = defaultdict(float)
        for pid, cpu in self._cpu.items():
            out[self._roles.get(pid, "ray system")] += cpu
        out["driver"] -= self._cpu0
        return dict(out)

    def tree_cpu(self) -> float:
        """CPU-seconds the tree has used since this sampler was made (ended processes: as last seen)."""
        for p in self._tree(scan=False):
            with contextlib.suppress(self._psutil.Error):
                self._cpu[p.pid] = sum(p.cpu_times()[:2])
        return sum(self._cpu.values()) - self._cpu0

    def _loop(self) -> None:
        next_pss = 0.0
        while True:
            now = time.perf_counter()
            pss = self.pss_interval is not None and now >= next_pss
            if pss:
                next_pss = now + self.pss_interval
            self._sample(pss)
            if self._stop.wait(self.interval):
                self._sample(True)
                return

    def _sample(self, pss: bool) -> None:
        rss_roles: dict[str, int] = defaultdict(int)
        pss_roles: dict[str, int] = defaultdict(int)
        procs = self._tree(scan=pss)
        for p in procs:
            try:
                with p.oneshot():
                    self._cpu[p.pid] = sum(p.cpu_times()[:2])
                    # a process ending between two reads keeps the role it was seen with (an actor's CPU stays
                    # the workers' when its command line can no longer be read at the last sample)
                    r = role(p, self.root.pid) or self._roles.get(p.pid, "ray system")
                    self._roles[p.pid] = r
                    if pss and self.pss_interval is not None:
                        info = p.memory_full_info()
                        pss_roles[r] += info.pss
                        rss_roles[r] += info.rss
                    else:
                        rss_roles[r] += p.memory_info().rss
            except self._psutil.Error:
                continue
        phase = self.phase()
        self.samples += 1
        self.max_procs = max(self.max_procs, len(procs))
        total = sum(rss_roles.values())
        self.peak_rss_phase[phase] = max(self.peak_rss_phase[phase], total)
        if total > self.peak_rss:
            self.peak_rss, self.peak_rss_roles, self.peak_rss_at = total, dict(rss_roles), phase
        if pss_roles and sum(pss_roles.values()) > self.peak_pss:
            self.peak_pss, self.peak_pss_roles, self.peak_pss_at = sum(pss_roles.values()), dict(pss_roles), phase
