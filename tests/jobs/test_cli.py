"""The gigaseg command line: exit codes 0/1/2, one line per problem, status, --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from jobs.cli import main
from tests.archive import spec_dict, write_archive


def _write(tmp_path, spec) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_validate_ok_and_bad(tmp_path, capsys):
    good = _write(tmp_path, spec_dict("/data/in", "/data/out"))
    assert main(["validate", good]) == 0
    bad = spec_dict("/data/in", "/data/out", tiling__overlap=900, resources__wrokers=3)
    assert main(["validate", _write(tmp_path, bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert any("resources.wrokers: unknown key" in line for line in err)
    assert any("tiling:" in line and "overlap" in line for line in err)
    assert not any("Traceback" in line for line in err)


def test_run_with_bad_spec_or_override_exits_2(tmp_path, capsys):
    good = _write(tmp_path, spec_dict("/data/in", "/data/out"))
    assert main(["run", good, "--set", "tiling.blend=box"]) == 2
    assert "tiling.blend" in capsys.readouterr().err


def test_missing_input_exits_2_with_a_clear_line(tmp_path, capsys):
    spec = _write(tmp_path, spec_dict(str(tmp_path / "nowhere"), str(tmp_path / "out")))
    assert main(["run", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "Traceback" not in err[0]


@pytest.mark.integration
def test_run_exit_1_when_an_image_fails_then_status(tmp_path, capsys, ray_cluster):
    write_archive(tmp_path / "in", corrupt=True)
    spec = _write(tmp_path, spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), inputs__patterns=["*.png"]))
    assert main(["run", spec]) == 1
    out = capsys.readouterr().out
    assert "broken" in out and "failed" in out and "small" in out
    assert main(["status", str(tmp_path / "out"), "--json"]) == 1
    st = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in st["images"]}
    assert rows["small"]["status"] == "done" and rows["small"]["tiles_done"] == rows["small"]["tiles"] == 6
    assert rows["broken"]["status"] == "failed" and "broken.png" in rows["broken"]["error"]
    assert st["counts"] == {"done": 1, "failed": 1, "in progress": 0, "left": 0}


def test_status_of_a_non_output_exits_2(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "no gigaseg output" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["validate"], ["run"], ["status"], ["demo"], ["eval"], ["train"], ["import-pairs"]])
def test_help(command):
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: gigaseg" in proc.stdout


@pytest.mark.integration
def test_more_gpus_than_the_cluster_has_is_a_spec_error(tmp_path, capsys, ray_cluster):
    write_archive(tmp_path / "in")
    spec = _write(tmp_path, spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), resources__workers=3))
    assert main(["run", spec]) == 2
    err = capsys.readouterr().err
    assert "3 workers × gpus_per_worker 1 = 3 GPUs but the Ray cluster has 2" in err
