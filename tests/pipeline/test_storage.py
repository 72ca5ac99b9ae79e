"""Whole-file writes: a writer killed at any point leaves nothing a reader takes for the finished file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.storage import read_bytes, read_json, write_bytes, write_json, write_once

ROOT = Path(__file__).resolve().parents[2]

# A writer that SIGKILLs itself after ``at`` bytes of the file (``at == len``: written whole, killed before the
# rename), the way a node that loses power or an OOM kill stops a process: no exception handler runs.
KILLED_WRITER = """
import os, signal, sys
import pipeline.storage as storage

url, at = sys.argv[1], int(sys.argv[2])
data = bytes(range(256)) * 64
real_fdopen = os.fdopen

class Dying:
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, b):
        self.f.write(b[:at])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

storage.os.fdopen = lambda fd, mode: Dying(real_fdopen(fd, mode))
storage.write_bytes(url, data)
"""
DATA = bytes(range(256)) * 64


@pytest.mark.parametrize("at", [0, 1, len(DATA) // 2, len(DATA)])
def test_a_writer_killed_midway_leaves_no_file_under_the_name(tmp_path, at):
    target = tmp_path / "sub" / "weights.safetensors"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), str(at)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not target.exists(), "a killed write must not leave a file under the final name"
    assert write_once(str(target), DATA) and target.read_bytes() == DATA  # the rerun writes it whole


def test_write_once_replaces_a_torn_copy_and_keeps_a_whole_one(tmp_path):
    target = tmp_path / "model-0123.safetensors"
    target.write_bytes(DATA[: len(DATA) // 3])  # what a plain write killed midway leaves (older versions)
    assert write_once(str(target), DATA) and target.read_bytes() == DATA
    mtime = target.stat().st_mtime_ns
    assert not write_once(str(target), DATA) and target.stat().st_mtime_ns == mtime  # whole: left alone


def test_write_and_read_round_trip_and_missing_files(tmp_path):
    url = str(tmp_path / "a" / "b.json")
    assert read_json(url) is None
    write_json(url, {"x": [1, 2]})
    assert read_json(url) == {"x": [1, 2]}
    write_bytes(url, b"\x00\x01")
    assert read_bytes(url) == b"\x00\x01"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]  # no temp file left behind
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "nothing"))


@pytest.mark.integration
def test_object_store_writes_are_whole(s3_bucket):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/w/model.safetensors"
    assert write_once(url, DATA, options) and read_bytes(url, options) == DATA
    assert not write_once(url, DATA, options)
    write_bytes(url, DATA[:10], options)
    assert write_once(url, DATA, options) and read_bytes(url, options) == DATA
