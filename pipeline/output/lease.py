"""The output lease: one driver writes an output at a time.

``<output>/_work/lease.json`` (``JobLayout.lease_url``) names the driver that holds the output::

    {"host", "pid", "pid_started", "started", "heartbeat", "timeout_s", "token"}

- ``acquire`` writes it only if there is none (S3: PutObject with ``If-None-Match: *``; locally under an exclusive
  ``flock``: ``pipeline.storage.write_if``). If there is one, its holder is **live** unless its heartbeat is older
  than its ``timeout_s`` (a driver that died elsewhere), or it is on this host and its process is gone (or its
  pid now belongs to a process started later). A live holder is refused (``LeaseHeldError`` naming host, pid and
  start time); a stale one, or any with ``force``, is replaced only if it is still the version read (S3:
  ``If-Match: <ETag>``), so of two drivers taking over at once exactly one wins.
- While the job runs, a thread rewrites the heartbeat every ``heartbeat_s`` (again conditional on the version it
  wrote last). If the lease changed under it (another driver forced it), the lease is **lost**: the thread says
  who holds it, and ``check`` raises, so the job stops before writing more.
- ``release`` removes the lease if it is still this driver's.

Times are UTC epoch seconds from each host's clock: hosts whose clocks differ by more than a small part of
``timeout_s`` should not share outputs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psutil

from pipeline.conditional import delete_if, read_versioned, write_if
from pipeline.errors import LeaseHeldError, LeaseLostError
from pipeline.output.layout import JobLayout

log = logging.getLogger(__name__)

#: A lease whose heartbeat is older than this is a dead driver's (seconds).
LEASE_TIMEOUT_S = 120.0
#: How often a live driver renews its lease: four beats may fail before the lease looks dead.
HEARTBEAT_S = 30.0


@dataclass(frozen=True)
class Holder:
    """Who holds an output: what ``lease.json`` says."""

    host: str
    pid: int
    started: float
    heartbeat: float
    timeout_s: float
    token: str
    pid_started: float | None = None

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            d = json.loads(data)
            return cls(str(d["host"]), int(d["pid"]), float(d["started"]), float(d["heartbeat"]),
                       float(d["timeout_s"]), str(d["token"]), d.get("pid_started"))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as stale (a lease is written whole, so only a foreign file is)

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (f"host {self.host}, pid {self.pid}, started {started}, last heartbeat "
                f"{max(0.0, now - self.heartbeat):.0f} s ago")

    def stale(self, now: float | None = None) -> str | None:
        """Why this holder is dead (a sentence), or None when it may be alive."""
        now = time.time() if now is None else now
        if now - self.heartbeat > self.timeout_s:
            return f"its heartbeat is {now - self.heartbeat:.0f} s old (timeout {self.timeout_s:.0f} s)"
        if self.host == socket.gethostname():
            try:
                proc = psutil.Process(self.pid)
                if self.pid_started is not None and proc.create_time() > self.pid_started + 1.0:
                    return f"pid {self.pid} on this host is another process now"
            except psutil.NoSuchProcess:
                return f"pid {self.pid} is not running on this host"
        return None


def _now_holder(token: str, started: float, timeout_s: float) -> dict[str, Any]:
    try:
        pid_started = psutil.Process(os.getpid()).create_time()
    except psutil.Error:
        pid_started = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": pid_started, "started": started,
            "heartbeat": time.time(), "timeout_s": timeout_s, "token": token}


class Lease:
    """This driver's hold on an output (``acquire`` makes one)."""

    def __init__(self, url: str, storage_options: dict[str, Any], token: str, started: float, version: str,
                 timeout_s: float, heartbeat_s: float) -> None:
        self.url, self.storage_options, self.token = url, storage_options, token
        self.started, self.version = started, version
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.lost: str | None = None  # who took it, once it is lost
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def beat(self) -> bool:
        """Renew the heartbeat (if the lease is still this driver's); whether it is still held."""
        with self._lock:
            if self.lost:
                return False
            data = json.dumps(_now_holder(self.token, self.started, self.timeout_s)).encode()
            try:
                version = write_if(self.url, data, self.version, self.storage_options)
            except OSError as err:  # a store that fails now may answer at the next beat
                log.warning("could not renew the lease %s: %s", self.url, err)
                return True
            if version is not None:
                self.version = version
                return True
            current = read_versioned(self.url, self.storage_options)
            holder = Holder.parse(current[0]) if current else None
            if holder is not None and holder.token == self.token:  # our own write, answered late: keep going
                self.version = current[1]
                return True
            self.lost = holder.describe() if holder else "no one (the lease file was removed)"
            log.error("lost the lease on %s to %s: another driver writes this output now; stopping", self.url,
                      self.lost)
            return False

    def start_heartbeat(self) -> None:
        def run() -> None:
            while not self._stop.wait(self.heartbeat_s):
                if not self.beat():
                    return

        self._thread = threading.Thread(target=run, name="gigaseg-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise ``LeaseLostError`` once another driver has taken the output."""
        if self.lost:
            raise LeaseLostError(f"{self.url}: this driver's lease was taken by {self.lost}; it stopped writing. "
                                 "Run one driver per output (gigaseg run resumes what is done)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.lost:
                return
            try:
                delete_if(self.url, self.version, self.storage_options)
            except OSError as err:  # left behind, it goes stale: the next run takes it over after timeout_s
                log.warning("could not remove the lease %s: %s", self.url, err)

    def __enter__(self) -> Lease:
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(layout: JobLayout, *, force: bool = False, timeout_s: float = LEASE_TIMEOUT_S,
            heartbeat_s: float = HEARTBEAT_S) -> Lease:
    """Hold ``layout``'s output for this driver (module docstring). Raises ``LeaseHeldError`` when a live driver
    holds it (unless ``force``); an output that cannot be written at all raises here, before any work."""
    url, so = layout.lease_url, dict(layout.storage_options)
    token, started = uuid.uuid4().hex, time.time()
    data = json.dumps(_now_holder(token, started, timeout_s)).encode()
    for _ in range(5):  # each pass: create, or judge what is there and replace it; lost races go round again
        version = write_if(url, data, None, so)
        if version is not None:
            return Lease(url, so, token, started, version, timeout_s, heartbeat_s)
        current = read_versioned(url, so)
        if current is None:
            continue  # released between our two calls
        holder = Holder.parse(current[0])
        if holder is not None and holder.token == token:  # our create took effect, its answer was lost
            return Lease(url, so, token, started, current[1], timeout_s, heartbeat_s)
        why = "it is unreadable" if holder is None else holder.stale()
        if why is None and not force:
            expires = max(0.0, holder.heartbeat + holder.timeout_s - time.time())
            raise LeaseHeldError(
                f"{layout.url} is being written by another gigaseg driver ({holder.describe()}); two drivers on one "
                f"output would duplicate the work. Wait for it to finish, stop it, or choose another output.url. If "
                f"that driver is dead, its lease expires {expires:.0f} s from now; `gigaseg run --force` takes the "
                "output over at once")
        version = write_if(url, data, current[1], so)
        if version is not None:
            reason = why or "--force"
            previous = holder.describe() if holder else "an unreadable lease"
            log.warning("took over the output %s from %s (%s)", layout.url, previous, reason)
            return Lease(url, so, token, started, version, timeout_s, heartbeat_s)
    raise LeaseHeldError(f"{layout.url}: could not take the lease {url}: other drivers keep changing it")


__all__ = ["HEARTBEAT_S", "LEASE_TIMEOUT_S", "Holder", "Lease", "acquire"]
