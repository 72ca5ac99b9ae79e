"""Where the blend, the mosaic and the label pyramid run: Dask's threads in the driver, or a Dask cluster.

``cluster.dask`` in the job spec picks it:

- absent: Dask's threaded scheduler in the driver process (the local default; nothing to deploy);
- ``"ray"``: gigaseg starts a ``dask.distributed`` scheduler and one Dask worker per alive Ray node, each a
  process owned by a Ray actor pinned to its node, so a user deploys one (Ray) cluster. The actors ask for
  no CPU: the blend of image k−1 shares the nodes with the tile workers of image k, as it does locally;
- an address (``tcp://host:8786``): an existing ``dask.distributed`` scheduler, whose workers must have
  gigaseg installed and reach the job's storage.

Every graph then runs where the scheduler sends it; its tasks read the tile stores and write the masks
straight to Zarr, so no pixels pass through the driver either way. Dask-on-Ray's own scheduler
(``ray.util.dask``) is not used: it broke with dask 2024.11 (github ray-project/ray issue #48689) and is pinned
to narrow Dask releases since.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

ON_RAY = "ray"
ADDRESS_SCHEMES = ("tcp://", "tls://", "ucx://", "inproc://")
START_TIMEOUT_S = 120.0


def check_setting(value: str | None) -> None:
    """Raise ValueError unless ``value`` is None, ``"ray"`` or a scheduler address."""
    if value is None or value == ON_RAY or value.startswith(ADDRESS_SCHEMES):
        return
    raise ValueError(
        f"{value!r} is neither 'ray' (start Dask on the Ray cluster's nodes) nor a dask.distributed scheduler "
        f"address ({', '.join(s + '…' for s in ADDRESS_SCHEMES)}); leave it out to blend in the driver"
    )


@dataclass
class DaskSession:
    """The scheduler to pass to ``dask`` (``"threads"`` or a ``distributed.Client``) and what to stop."""

    scheduler: Any = "threads"
    address: str | None = None
    _actors: list = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """For report.json: the scheduler, its workers and how many tasks it ran."""
        if self.address is None:
            return {"scheduler": "threads (driver)"}
        try:
            workers = self.scheduler.scheduler_info()["workers"]
            transitions = self.scheduler.run_on_scheduler(_transitions)
        except Exception as err:  # informative only
            return {"scheduler": self.address, "error": f"{type(err).__name__}: {err}"}
        return {"scheduler": self.address, "workers": len(workers), "transitions": transitions,
                "started_by_gigaseg": bool(self._actors)}

    def stop(self) -> None:
        if self.address is not None:
            try:
                self.scheduler.close()
            except Exception as err:  # the job's outcome stands; a closing error is only logged
                log.warning("closing the Dask client: %s", err)
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []


def _transitions(dask_scheduler=None) -> int:
    """Task state transitions the scheduler has made since it started (runs on the scheduler): > 0 once any
    graph ran there."""
    return int(dask_scheduler.transition_counter)


def start_dask(setting: str | None) -> DaskSession:
    """Connect to (or, for ``"ray"``, start on the Ray cluster) the Dask scheduler ``setting`` names."""
    check_setting(setting)
    if setting is None:
        return DaskSession()
    from distributed import Client

    actors: list = []
    address = setting
    if setting == ON_RAY:
        address, actors = _start_on_ray()
    try:
        client = Client(address, set_as_default=False, timeout=START_TIMEOUT_S)
        if actors:
            client.wait_for_workers(len(actors) - 1, timeout=START_TIMEOUT_S)
    except Exception:
        DaskSession(_actors=actors).stop()
        raise
    log.info("Dask scheduler %s with %d worker(s)", address, len(client.scheduler_info()["workers"]))
    return DaskSession(client, address, actors)


class DaskProcess:
    """A Dask scheduler or worker process on this actor's node; it ends with the actor (even a killed one)."""

    def __init__(self, argv: list[str], address: str | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.address = address
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def ready(self, timeout: float = START_TIMEOUT_S) -> str | None:
        """Wait until the scheduler accepts connections (schedulers only); its address."""
        if self.address is None:
            return None
        host, port = self.address.removeprefix("tcp://").rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Dask scheduler exited with code {self.proc.returncode}")
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    return self.address
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"the Dask scheduler at {self.address} did not start within {timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the actor process dies, so no Dask process outlives its actor."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the actor's __del__ and ray.kill still end it in the normal case
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _start_on_ray() -> tuple[str, list]:
    """A scheduler on the driver's node and one worker per alive Ray node; ``(address, actors)``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0)(DaskProcess)
    here = ray.get_runtime_context().get_node_id()
    host = ray.util.get_node_ip_address()
    address = f"tcp://{host}:{_free_port()}"
    scheduler = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
        ["distributed.cli.dask_scheduler", "--host", host, "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
        address)
    actors = [scheduler]
    try:
        ray.get(scheduler.ready.remote(), timeout=START_TIMEOUT_S + 10)
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            threads = max(1, int(node.get("Resources", {}).get("CPU", 1)))
            name = f"ray-{node['NodeID'][:12]}"
            argv = ["distributed.cli.dask_worker", address, "--nthreads", str(threads), "--nworkers", "1",
                    "--no-dashboard", "--name", name, "--no-nanny"]
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            actors.append(remote.options(scheduling_strategy=strategy).remote(argv))
        ray.get([a.alive.remote() for a in actors], timeout=START_TIMEOUT_S)
    except Exception:
        for a in actors:
            ray.kill(a)
        raise
    return address, actors
