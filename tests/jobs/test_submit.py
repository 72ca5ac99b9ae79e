"""``gigaseg submit`` / ``logs`` / ``job-status``: spec checks before any contact, clear errors for bad
addresses, and real submissions to a real local Ray head (``ray start --head``, dashboard on 127.0.0.1).

The head is this module's own: its own temp dir and free ports, started with ``--block`` in a new session so
teardown ends exactly its processes (never ``ray stop``, which would end every Ray on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs import submit
from pipeline.workers.ray_cluster import ray_temp_dir
from tests.archive import spec_dict


def _cli(argv: list[str]) -> int:
    """Parse with a fresh parser holding only the submit commands, then run, as ``jobs.cli.main`` does."""
    parser = argparse.ArgumentParser(prog="gigaseg")
    submit.add_submit_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _write(tmp_path: Path, spec: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_contact(*args, **kwargs):
    raise AssertionError("the cluster was contacted although the submission should stop before")


# ---- no cluster needed ----------------------------------------------------------------------------------


def test_parsers_accept_the_documented_command_lines():
    parser = argparse.ArgumentParser(prog="gigaseg")
    submit.add_submit_parsers(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["submit", "s.yaml", "--address", "http://h:8265", "--set", "resources.workers=8",
                           "--set", "tiling.blend=cosine", "--no-wait", "--ship-project"])
    assert (a.func, a.spec, a.address, a.set, a.no_wait, a.ship_project) == (
        submit.cmd_submit, "s.yaml", "http://h:8265", ["resources.workers=8", "tiling.blend=cosine"], True, True)
    a = parser.parse_args(["logs", "raysubmit_1", "--address", "h:8265", "--follow"])
    assert (a.func, a.job_id, a.follow) == (submit.cmd_logs, "raysubmit_1", True)
    a = parser.parse_args(["job-status", "raysubmit_1", "--address", "h:8265"])
    assert a.func is submit.cmd_job_status
    with pytest.raises(SystemExit):
        parser.parse_args(["submit", "s.yaml"])  # --address is required: no silent default cluster


def test_bad_spec_exits_2_before_contacting_the_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(submit, "connect", _no_contact)
    bad = _write(tmp_path, spec_dict("/data/in", "/data/out", tiling__overlap=900, resources__wrokers=3))
    assert _cli(["submit", bad, "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err), err
    assert any("resources.wrokers: unknown key" in line for line in err)
    good = _write(tmp_path, spec_dict("/data/in", "/data/out"), "good.yaml")
    assert _cli(["submit", good, "--address", "http://127.0.0.1:9", "--set", "tiling.blend=box"]) == 2
    assert "tiling.blend" in capsys.readouterr().err
    assert _cli(["submit", str(tmp_path / "missing.yaml"), "--address", "http://127.0.0.1:9"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_relative_local_paths_are_refused_absolute_ones_warned(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(submit, "connect", _no_contact)
    rel = _write(tmp_path, spec_dict("data/in", "s3://bucket/masks"))
    assert _cli(["submit", rel, "--address", "http://127.0.0.1:9"]) == 2
    assert "inputs.url: relative path 'data/in'" in capsys.readouterr().err
    prepared = submit.prepare_spec(_write(tmp_path, spec_dict("/data/in", "s3://bucket/masks"), "abs.yaml"))
    assert [w.split(":")[0] for w in prepared.warnings] == ["inputs.url"]


def test_prepared_spec_joins_the_cluster_and_ships_alone(tmp_path):
    spec = spec_dict("s3://bucket/in", "s3://bucket/out", cluster__address="ray://elsewhere:10001")
    prepared = submit.prepare_spec(_write(tmp_path, spec), ["resources.workers=6"])
    assert prepared.spec.cluster.address == "auto" and prepared.spec.resources.workers == 6
    assert any("cluster.address" in w for w in prepared.warnings)
    workdir = tmp_path / "wd"
    workdir.mkdir()
    request = submit.job_request(prepared, str(workdir))
    assert request["entrypoint"] == "gigaseg run job.yaml"
    assert request["runtime_env"] == {"working_dir": str(workdir)}
    assert [p.name for p in workdir.iterdir()] == ["job.yaml"]
    shipped = yaml.safe_load((workdir / "job.yaml").read_text())
    assert shipped["cluster"]["address"] == "auto" and shipped["resources"]["workers"] == 6
    shipped_project = submit.job_request(prepared, str(workdir), ship_project=True)
    assert shipped_project["entrypoint"] == "python -m jobs.cli run job.yaml"
    assert [Path(p).name for p in shipped_project["runtime_env"]["py_modules"]] == ["pipeline", "models", "jobs"]


def test_unreachable_address_exits_2_naming_it(tmp_path, capsys):
    good = _write(tmp_path, spec_dict("s3://bucket/in", "s3://bucket/out"))
    port = _free_port()  # closed again: nothing listens there
    started = time.monotonic()
    assert _cli(["submit", good, "--address", f"127.0.0.1:{port}", "--no-wait"]) == 2
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"http://127.0.0.1:{port}" in err[0] and "cannot reach" in err[0], err
    for argv in (["logs", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"],
                 ["job-status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"]):
        assert _cli(argv) == 2
        assert f"127.0.0.1:{port}" in capsys.readouterr().err
    assert _cli(["submit", good, "--address", "ray://127.0.0.1:10001"]) == 2
    assert "Ray Client address" in capsys.readouterr().err


def test_an_http_server_that_is_not_ray_exits_2(tmp_path, capsys):
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):  # answers 501 to everything, logs nothing
        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        good = _write(tmp_path, spec_dict("s3://bucket/in", "s3://bucket/out"))
        assert _cli(["submit", good, "--address", f"http://127.0.0.1:{server.server_port}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no Ray Jobs API at" in err[0], err
    finally:
        server.shutdown()


# ---- a real local Ray head --------------------------------------------------------------------------------


def _our_processes(root_pid: int, temp_dir: str):
    import psutil

    found = {}
    try:
        root = psutil.Process(root_pid)
        found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):  # daemons that left the tree still name our temp dir
        if any(temp_dir in part for part in (p.info["cmdline"] or [])):
            found[p.pid] = p
    return list(found.values())


@pytest.fixture(scope="module")
def ray_head():
    """``http://127.0.0.1:PORT`` of a Ray head with 1 CPU and 1 logical GPU, its Jobs API on 127.0.0.1."""
    import psutil

    temp_dir = ray_temp_dir("gss-")  # short: Ray's socket paths must stay < 108 bytes
    dashboard = _free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PATH=bin_dir + os.pathsep + env["PATH"])
    cmd = [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--port=0", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           "--num-cpus=1", "--num-gpus=1", f"--object-store-memory={200 * 2**20}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    log = open(os.path.join(temp_dir, "ray-start.log"), "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: " + Path(log.name).read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Ray head's dashboard did not answer within 60 s")
            time.sleep(0.5)
        yield url
    finally:
        procs = _our_processes(proc.pid, temp_dir)
        proc.send_signal(signal.SIGTERM)  # ray start --block shuts its node down on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        leftover = [p for p in procs + _our_processes(proc.pid, temp_dir) if p.is_running()]
        for p in leftover:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(leftover, timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_submit_runs_the_job_on_the_cluster(ray_head, tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # --address wins over the environment
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "in" / "tiny.png")
    spec = spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), resources__workers=1,
                     resources__cpus_per_worker=1, tiling__tile=64, tiling__overlap=16, tiling__chunk=64,
                     tiling__image_chunk=64)
    assert _cli(["submit", _write(tmp_path, spec), "--address", ray_head]) == 0
    out, err = capsys.readouterr()
    job_id = out.splitlines()[0]
    assert job_id.startswith("raysubmit_"), out
    assert "masks:" in out and "tiny" in out, out  # the remote `gigaseg run` table, streamed back
    assert f"job {job_id}: SUCCEEDED" in err
    assert (tmp_path / "out" / "tiny.zarr" / "labels" / "segmentation" / "0").exists()

    assert _cli(["job-status", job_id, "--address", ray_head]) == 0
    assert f"{job_id}  SUCCEEDED  gigaseg run job.yaml" in capsys.readouterr().out
    assert _cli(["logs", job_id, "--address", ray_head]) == 0
    assert "masks:" in capsys.readouterr().out
    assert _cli(["job-status", "raysubmit_nosuchjob", "--address", ray_head]) == 2
    assert "no job 'raysubmit_nosuchjob'" in capsys.readouterr().err


@pytest.mark.integration
def test_a_failing_job_with_the_project_shipped_exits_1(ray_head, tmp_path, capsys):
    missing = _write(tmp_path, spec_dict(str(tmp_path / "nothing-here"), str(tmp_path / "out")))
    assert _cli(["submit", missing, "--address", ray_head, "--no-wait", "--ship-project"]) == 0
    out, err = capsys.readouterr()
    job_id = out.strip()
    assert job_id.startswith("raysubmit_") and f"gigaseg logs {job_id} --address {ray_head} --follow" in err
    assert _cli(["logs", job_id, "--address", ray_head, "--follow"]) == 1  # remote `gigaseg run` exits 2
    out, err = capsys.readouterr()
    assert "nothing-here" in out and f"job {job_id}: FAILED" in err
    assert _cli(["job-status", job_id, "--address", ray_head]) == 1
    assert f"{job_id}  FAILED  python -m jobs.cli run job.yaml" in capsys.readouterr().out
    runtime_env = submit.connect(ray_head).get_job_info(job_id).runtime_env
    assert len(runtime_env["py_modules"]) == 3 and all(u.startswith("gcs://") for u in runtime_env["py_modules"])
