"""The output lease (``pipeline.output.lease``): one live driver per output, on local paths and on S3 (moto, with
its conditional PUTs); a dead driver's lease is taken over, a live one only with force, and the driver that
lost its lease knows it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.conditional import read_versioned, write_if
from pipeline.errors import LeaseHeldError, LeaseLostError
from pipeline.output.layout import JobLayout
from pipeline.output.lease import Holder, acquire
from pipeline.storage import write_bytes


def _write_lease(layout: JobLayout, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": 1, "started": time.time() - 600, "heartbeat": time.time(),
              "timeout_s": 120.0, "token": "someone-else", **fields}
    write_bytes(layout.lease_url, json.dumps(holder).encode(), layout.storage_options)


def _holder(layout: JobLayout) -> Holder:
    return Holder.parse(read_versioned(layout.lease_url, layout.storage_options)[0])


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path):
    if request.param == "local":
        return JobLayout(str(tmp_path / "out"))
    bucket, options = request.getfixturevalue("s3_bucket")
    return JobLayout(f"s3://{bucket}/out", options)


def test_a_live_driver_is_refused_with_its_name_and_a_release_frees_the_output(layout):
    lease = acquire(layout)
    holder = _holder(layout)
    assert (holder.host, holder.pid, holder.token) == (socket.gethostname(), lease_pid(), lease.token)
    with pytest.raises(LeaseHeldError) as err:
        acquire(layout)
    message = str(err.value)
    assert f"host {socket.gethostname()}, pid {lease_pid()}, started " in message and "--force" in message
    lease.release()
    assert read_versioned(layout.lease_url, layout.storage_options) is None
    acquire(layout).release()


def lease_pid() -> int:
    import os

    return os.getpid()


def test_a_dead_drivers_lease_is_taken_over(layout):
    _write_lease(layout, host="elsewhere", heartbeat=time.time() - 121.0)  # heartbeat older than its timeout
    with acquire(layout) as lease:
        assert _holder(layout).token == lease.token
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    _write_lease(layout, pid=int(done.stdout))  # same host, fresh heartbeat, but its process has exited
    with acquire(layout) as lease:
        assert _holder(layout).token == lease.token


def test_force_takes_a_live_lease_and_the_loser_stops(layout):
    first = acquire(layout, heartbeat_s=3600)
    second = acquire(layout, force=True)
    assert _holder(layout).token == second.token
    assert not first.beat(), "the heartbeat finds another driver's lease"
    with pytest.raises(LeaseLostError, match=f"pid {lease_pid()}"):
        first.check()
    first.release()  # leaves the new holder's lease alone
    assert _holder(layout).token == second.token
    second.release()


def test_two_takeovers_of_one_stale_version_only_the_first_wins(layout):
    """Both drivers read the same stale lease, then each writes its own conditional on that version."""
    _write_lease(layout, host="elsewhere", heartbeat=time.time() - 500.0)
    _, stale = read_versioned(layout.lease_url, layout.storage_options)
    assert write_if(layout.lease_url, b'{"token": "a"}', stale, layout.storage_options) is not None
    assert write_if(layout.lease_url, b'{"token": "b"}', stale, layout.storage_options) is None
    assert write_if(layout.lease_url, b'{"token": "c"}', None, layout.storage_options) is None  # create-only
    assert read_versioned(layout.lease_url, layout.storage_options)[0] == b'{"token": "a"}'


def test_of_many_drivers_starting_at_once_exactly_one_holds_the_output(tmp_path):
    """Threads of one process contend as processes do: each opens the lock file itself (local: flock is atomic;
    on S3 the same check is the server's, above)."""
    layout = JobLayout(str(tmp_path / "out"))
    _write_lease(layout, host="elsewhere", heartbeat=time.time() - 500.0)  # stale: all of them try to take it over
    won, refused = [], []

    def start() -> None:
        try:
            won.append(acquire(layout))
        except LeaseHeldError as err:
            refused.append(err)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5, (len(won), [str(e) for e in refused])
    assert _holder(layout).token == won[0].token
    won[0].release()


@pytest.mark.integration
def test_a_create_whose_answer_is_lost_still_holds_the_lease(s3_bucket, s3_endpoint):
    """The proxy lets the first lease PUT through to moto, then resets the connection: the retried conditional PUT
    finds a lease (412), which is this driver's own."""
    from tests.faults_s3 import FaultProxy, FaultRule

    bucket, _ = s3_bucket
    with FaultProxy(s3_endpoint, rules=(FaultRule("reset", 1.0, frozenset({"PUT"}), limit=1),)) as proxy:
        layout = JobLayout(f"s3://{bucket}/lost-answer", {"endpoint_url": proxy.url})
        with acquire(layout) as lease:
            assert _holder(layout).token == lease.token
        assert proxy.injected[("reset", "PUT")] == 1
