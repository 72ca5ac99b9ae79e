"""Ray startup: an embedded local cluster by default, or a connection to an existing one."""

from __future__ import annotations

import logging
import os
import tempfile

import ray

log = logging.getLogger(__name__)


def start_ray(address: str | None, *, num_cpus: float, num_gpus: float, object_store_mb: int = 1024) -> bool:
    """Start (or join) Ray; returns True when this call started it, so the caller shuts it down.

    A running Ray in this process (a test's cluster, a notebook) is used as it is. The embedded cluster
    has ``num_gpus`` logical GPUs whether or not CUDA exists, so actors are placed as on a GPU cluster;
    its dashboard is off and it gets its own temp dir, so a crashed earlier run cannot get in the way.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=max(1, int(round(num_cpus))),
        num_gpus=num_gpus,
        object_store_memory=object_store_mb * 1024 * 1024,
        _temp_dir=tempfile.mkdtemp(prefix="gigaseg-ray-"),
        log_to_driver=False,
        configure_logging=False,
    )
    log.info("started local Ray: %s CPUs, %s logical GPUs", num_cpus, num_gpus)
    return True
