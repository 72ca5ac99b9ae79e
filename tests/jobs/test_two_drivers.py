"""Two drivers on one output, from the command line: the second is refused with the first one named (host, pid,
start time), ``gigaseg status`` says who writes the output, and ``gigaseg run --force`` takes it over."""

from __future__ import annotations

import os
import socket

import yaml

from jobs.cli import main
from pipeline.output.layout import JobLayout
from pipeline.output.lease import acquire
from tests.archive import spec_dict


def test_a_second_driver_is_refused_and_force_takes_over(tmp_path, capsys):
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(str(tmp_path / "no-such-input"), str(out))))
    first = acquire(JobLayout(str(out)), heartbeat_s=3600)  # a live driver: this process

    assert main(["run", str(spec)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {out} is being written by another gigaseg driver (host {socket.gethostname()}, "
                           f"pid {os.getpid()}, started "), line
    assert first.beat(), "the refused driver left the lease alone"

    assert main(["status", str(out)]) == 0
    assert f"being written by host {socket.gethostname()}, pid {os.getpid()}" in capsys.readouterr().out

    assert main(["run", "--force", str(spec)]) == 2  # takes the output, then finds no input (before any work)
    assert not first.beat() and "removed" in first.lost, "the forced driver held the output, then released it"
