"""Ray startup: an embedded local cluster by default, or a connection to an existing one."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)


#: Ray puts Unix sockets at ``<temp_dir>/session_<date>_<time>_<µs>_<pid>/sockets/plasma_store``, about 63
#: bytes after the temp dir, and a socket path must stay under 108 bytes.
_MAX_RAY_TEMP_DIR = 44


def ray_temp_dir(prefix: str = "gs-ray-", *, nested: str = "") -> str:
    """A new, empty directory for one Ray start (the caller removes it): under ``$TMPDIR``
    (``tempfile.gettempdir()``) when the resulting path, plus ``nested`` (a sub-path Ray's temp dir will
    sit at, e.g. ``"/ray"``), leaves Ray's socket paths short enough, else under ``/tmp``."""
    base = tempfile.gettempdir()
    if len(os.path.join(base, prefix + "x" * 8)) + len(nested) > _MAX_RAY_TEMP_DIR and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


@dataclass(frozen=True)
class RaySession:
    """What ``start_ray`` did, so ``stop`` undoes exactly that."""

    started: bool
    temp_dir: str | None = None

    def stop(self) -> None:
        if self.started:
            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray(address: str | None, *, num_cpus: float, num_gpus: float, object_store_mb: int = 1024) -> RaySession:
    """Start (or join) Ray; the returned session's ``stop()`` shuts down what this call started.

    A running Ray in this process (a test's cluster, a notebook) is used as it is. The embedded cluster
    has ``num_gpus`` logical GPUs whether or not CUDA exists, so actors are placed as on a GPU cluster;
    its dashboard is off and it gets its own temp dir, so a crashed earlier run cannot get in the way.
    """
    if ray.is_initialized():
        return RaySession(started=False)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
        return RaySession(started=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = ray_temp_dir("gigaseg-ray-")
    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=max(1, int(round(num_cpus))),
        num_gpus=num_gpus,
        object_store_memory=object_store_mb * 1024 * 1024,
        _temp_dir=temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    log.info("started local Ray: %s CPUs, %s logical GPUs", num_cpus, num_gpus)
    return RaySession(started=True, temp_dir=temp_dir)
