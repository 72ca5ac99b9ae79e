"""Ray startup: an embedded local cluster by default, or a connection to an existing one."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)


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
    temp_dir = tempfile.mkdtemp(prefix="gigaseg-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=max(1, int(round(num_cpus))),
        num_gpus=num_gpus,
        object_store_memory=object_store_mb * 1024 * 1024,
        _temp_dir=temp_dir,  # short: Ray's socket paths must stay under 107 bytes
        log_to_driver=False,
        configure_logging=False,
    )
    log.info("started local Ray: %s CPUs, %s logical GPUs", num_cpus, num_gpus)
    return RaySession(started=True, temp_dir=temp_dir)
