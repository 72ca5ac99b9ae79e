"""Run a job on a multi-node Ray cluster simulated on this machine and remove a worker node mid-job.

Run as ``python -m tests.jobs.node_loss_job SPEC.json RESULT.json TEMP_DIR`` (by tests/jobs/test_node_loss.py):
a process of its own, because ``ray.cluster_utils.Cluster`` needs a driver that no other Ray cluster holds.
``TEMP_DIR`` is a directory the test created and removes afterwards; every file Ray writes goes under it.
``Cluster`` writes its address file to ``$RAY_TMPDIR/ray/ray_current_cluster`` (``/tmp/ray`` without
``RAY_TMPDIR``, which a new machine does not have), so the job points ``RAY_TMPDIR`` there and creates
``ray/`` itself: nothing depends on what an earlier run left on the machine.

The cluster: a head node with no GPU and two worker nodes with one logical GPU each, so each of the two
workers lands on its own node. Once both workers have written chunks and the blocks done hold 10 of the image's
169 tiles, the first worker node is killed without a graceful shutdown, as when a machine disappears, and
only then a spare GPU node joins (so Ray has somewhere to restart the lost actor).

Two conditions make the removal land on work in flight, whatever the machine's speed:
- both workers have written chunks (their write logs, ``audit_dir``): a call queued to an actor that is
  still starting is not lost when its node dies; Ray hands it to the restarted actor, and nothing counts
  as re-run;
- the node is killed before the spare one is added: adding a node takes seconds, in which the job could
  run on until the doomed node had no call left.
The image has 25 blocks of 256 px (``tiling.tiles_per_call`` 16), two in flight per worker, so when the later of
the two workers writes its first chunk, both still hold calls.

Health checks every 0.5 s with 2 misses allowed make Ray declare the node dead in ~1 s instead of the
default ~30 s (the settings a user can put in their cluster's ``_system_config``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from ray.cluster_utils import Cluster

from jobs.runner import run_spec
from jobs.spec import parse_spec
from tests.jobs.test_resume import done_tiles

HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 2,
    "health_check_initial_delay_ms": 0,
}
REMOVE_AFTER_TILES = 10


def main(spec_path: str, result_path: str, temp_dir: str) -> int:
    spec_data = json.loads(open(spec_path).read())
    os.environ["RAY_TMPDIR"] = temp_dir
    ray_dir = os.path.join(temp_dir, "ray")
    os.makedirs(ray_dir, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "_system_config": HEALTH_CHECKS,
        "temp_dir": ray_dir,
    })
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    name = spec_data.pop("_image")
    spec_data["cluster"] = {"address": cluster.address}
    spec = parse_spec(spec_data)
    removed: dict[str, object] = {}
    results: list = []
    errors: list[BaseException] = []

    audit_dir = os.path.join(temp_dir, "audit")
    os.makedirs(audit_dir)

    def job() -> None:  # the job in a thread: Cluster.add_node/remove_node use signals (main thread only)
        try:
            results.extend(run_spec(spec, audit_dir=audit_dir))
        except BaseException as err:
            errors.append(err)

    runner = threading.Thread(target=job, daemon=True)
    try:
        runner.start()
        deadline = time.monotonic() + 300
        while runner.is_alive() and time.monotonic() < deadline:
            done = done_tiles(spec.output.url, name)
            writing = [p for p in os.listdir(audit_dir) if os.path.getsize(os.path.join(audit_dir, p))]
            if done >= REMOVE_AFTER_TILES and len(writing) == 2:
                cluster.remove_node(nodes[0], allow_graceful=False)
                removed.update(node=nodes[0].unique_id, tiles_done=done)
                cluster.add_node(num_cpus=1, num_gpus=1)
                break
            time.sleep(0.02)
        runner.join(timeout=300)
    finally:
        cluster.shutdown()
    if errors:
        raise errors[0]
    [result] = results
    outcome = {"status": result.status, "error": result.error, "tiles": result.tiles,
               "tiles_retried": result.tiles_retried, "removed": removed}
    with open(result_path, "w") as f:
        json.dump(outcome, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
