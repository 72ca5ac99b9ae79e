"""infra/: the images install what the Makefile installs, the cluster configs agree with the pins and the
CLI, and no file carries a credential. Static checks only (no Docker, no cloud, no Kubernetes here)."""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
YAMLS = ("ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Spelled out here rather than imported: these are what the cluster configs must agree with.
REGISTRY_IMAGE = "123456789012.dkr.ecr.us-west-2.amazonaws.com/gigaseg"


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (INFRA / name).read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in text.splitlines():
        if ln.strip():
            op, _, args = ln.strip().partition(" ")
            out.append((op.upper(), " ".join(args.split())))
    return out


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]


def by_kind(name: str, kind: str) -> dict:
    (doc,) = [d for d in documents(name) if d["kind"] == kind]
    return doc


def walk(node, path=""):
    """Yield (key path, key, value) for every mapping entry, and ("path[i]", None, item) for list items."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield f"{path}[{i}]", None, v
            yield from walk(v, f"{path}[{i}]")


def containers(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def cluster_specs() -> list[tuple[str, dict]]:
    return [("kuberay-raycluster.yaml", by_kind("kuberay-raycluster.yaml", "RayCluster")["spec"]),
            ("kuberay-rayjob.yaml", by_kind("kuberay-rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"])]


# ---- files parse ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_parses_into_mappings(name):
    docs = documents(name)
    assert docs and all(isinstance(d, dict) for d in docs)
    if name.startswith("kuberay"):
        assert all({"apiVersion", "kind", "metadata"} <= d.keys() for d in docs)


# ---- images -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_as_the_makefile_does(name):
    steps = instructions(name)
    runs = [args for op, args in steps if op == "RUN"]
    torch_pin = pins()["torch"]
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip install --quiet torch=={torch_pin}" in makefile  # the Makefile uses the same pin

    torch_runs = [i for i, r in enumerate(runs) if re.search(r"pip install .*\btorch==", r)]
    project_runs = [i for i, r in enumerate(runs) if "pip install -c constraints.txt ." in r]
    assert len(torch_runs) == 1 and len(project_runs) == 1 and torch_runs[0] < project_runs[0]
    assert re.findall(r"\btorch==(\S+)", runs[torch_runs[0]]) == [torch_pin]
    assert re.search(r"pip install -c constraints.txt \.(\s|$)", runs[project_runs[0]])

    python = re.search(r"^PYTHON \?= python(\d+\.\d+)$", makefile, re.M).group(1)
    (base,) = [args for op, args in steps if op == "FROM"]
    assert base.startswith(f"python:{python}-"), base
    assert PYPROJECT["project"]["requires-python"] == f">={python}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_entrypoint_user_and_context(name):
    steps = instructions(name)
    scripts = PYPROJECT["project"]["scripts"]
    (entrypoint,) = [args for op, args in steps if op == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint) == ["gigaseg"] and scripts["gigaseg"] == "jobs.cli:main"

    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    useradd = next(args for op, args in steps if op == "RUN" and "useradd" in args)
    assert f"--uid {users[-1].split(':')[0]}" in useradd
    home = f"/home/{useradd.split()[-1]}"
    assert ("ENV", f"HOME={home}") in steps  # the Ray launcher reads HOME from the image's environment

    copied = set()
    for op, args in steps:
        if op == "COPY":
            *sources, _ = args.split()
            copied |= {s.rstrip("/") for s in sources}
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert copied == packages | {"pyproject.toml", "constraints.txt", PYPROJECT["project"]["readme"]}
    assert all((ROOT / s).exists() for s in copied)

    ignore = [ln.strip() for ln in (INFRA / f"{name}.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: .venv, .git and outputs never reach the builder
    assert {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")} == copied


# ---- the Ray cluster launcher -----------------------------------------------------------------------------


def launcher() -> dict:
    return yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))


def test_launcher_node_configs_are_valid_run_instances_calls():
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    cfg = launcher()
    for name, node_type in cfg["available_node_types"].items():
        report = ParamValidator().validate({**node_type["node_config"], "MinCount": 1, "MaxCount": 1}, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")  # S3 by role
        assert node_type["node_config"]["MetadataOptions"]["HttpTokens"] == "required"


def test_launcher_cluster_shape_and_head_command():
    cfg = launcher()
    head = cfg["head_node_type"]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != head}
    assert len(workers) == 1
    (worker,) = workers.values()
    assert 0 < worker["min_workers"] <= worker["max_workers"] <= cfg["max_workers"]
    assert "--gpus all" in cfg["docker"]["worker_run_options"]
    assert "--gpus all" not in cfg["docker"]["run_options"]
    (start,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    args = shlex.split(start.split(";")[-1])
    assert {"--head", "--autoscaling-config=~/ray_bootstrap_config.yaml", "--dashboard-host=127.0.0.1",
            "--num-cpus=0"} <= set(args)
    (wstart,) = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    assert "--address=$RAY_HEAD_IP:6379" in wstart


def test_launcher_docker_run_resets_the_image_entrypoint():
    """The launcher runs `docker run … IMAGE bash`; with ENTRYPOINT gigaseg that would be `gigaseg bash`."""
    from ray.autoscaler._private.docker import docker_start_cmds

    cfg = launcher()
    cmd = docker_start_cmds("ubuntu", cfg["docker"]["image"], {}, cfg["docker"]["container_name"],
                            cfg["docker"]["run_options"] + cfg["docker"]["worker_run_options"], cfg["cluster_name"],
                            "/home/gigaseg", "docker")
    argv = shlex.split(cmd)  # as the host's shell reads it
    assert "--entrypoint=" in argv and argv[-2:] == [cfg["docker"]["image"], "bash"]


def test_ray_and_image_versions_match_the_pins():
    ray_pin, torch_pin = pins()["ray"], pins()["torch"]
    version = PYPROJECT["project"]["version"]
    cfg = launcher()
    assert cfg["docker"]["image"] == f"{REGISTRY_IMAGE}:{version}-gpu"
    checks = " ".join(cfg["setup_commands"])
    assert f"ray.__version__ == '{ray_pin}'" in checks and f"== '{torch_pin}'" in checks
    assert "gigaseg --help" in checks  # the image's real entrypoint script
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == ray_pin, name
        for group, c in containers(spec):
            assert c["image"] == cfg["docker"]["image"], (name, group)


# ---- KubeRay ----------------------------------------------------------------------------------------------


def test_kuberay_clusters_autoscale_gpu_workers_with_irsa():
    for name, spec in cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        (group,) = spec["workerGroupSpecs"]
        assert 0 < group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        sa = by_kind(name, "ServiceAccount")
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            assert template["spec"]["serviceAccountName"] == sa["metadata"]["name"]
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert by_kind("kuberay-raycluster.yaml", "ServiceAccount") == by_kind("kuberay-rayjob.yaml", "ServiceAccount")
    standalone, in_job = (spec for _, spec in cluster_specs())
    assert standalone["workerGroupSpecs"] == in_job["workerGroupSpecs"]


RAYJOB_FIELDS = {  # RayJobSpec json names (ray-operator/apis/ray/v1/rayjob_types.go)
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML", "jobId",
    "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}


def test_rayjob_runs_the_configmap_spec_with_gigaseg_run():
    from jobs.cli import build_parser
    from jobs.spec import parse_spec

    job = by_kind("kuberay-rayjob.yaml", "RayJob")["spec"]
    assert set(job) <= RAYJOB_FIELDS and job["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["entrypoint"])
    assert argv[0] in PYPROJECT["project"]["scripts"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    spec_path = Path(args.spec)

    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]  # the driver runs on the head
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(spec_path.parent)]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    (item,) = [i for i in volume["configMap"]["items"] if i["path"] == spec_path.name]
    config_map = by_kind("kuberay-rayjob.yaml", "ConfigMap")
    assert config_map["metadata"]["name"] == volume["configMap"]["name"]
    spec = parse_spec(yaml.safe_load(config_map["data"][item["key"]]), "ConfigMap job.yaml")
    assert spec.cluster.address == "auto"  # joins the RayJob's cluster instead of starting an embedded one
    workers = job["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = workers["minReplicas"] * int(limits["nvidia.com/gpu"])
    assert spec.resources.workers * spec.resources.gpus_per_worker <= gpus  # the runner's resource check passes


def test_readme_commands_parse():
    """Every `gigaseg submit|logs|job-status` line of infra/README.md parses with the submit sub-commands."""
    from jobs import cli
    from jobs.submit import add_submit_parsers

    fresh = argparse.ArgumentParser(prog="gigaseg")
    add_submit_parsers(fresh.add_subparsers(dest="command", required=True))
    parsers = [fresh]
    if "submit" in cli.build_parser()._subparsers._group_actions[0].choices:  # once jobs/cli.py wires them
        parsers.append(cli.build_parser())
    lines = [ln.split("#")[0].rstrip(" &") for ln in (INFRA / "README.md").read_text().splitlines()]
    commands = [shlex.split(ln)[1:] for ln in lines if re.match(r"^gigaseg (submit|logs|job-status) ", ln)]
    assert {c[0] for c in commands} == {"submit", "logs", "job-status"}
    for parser in parsers:
        for argv in commands:
            assert parser.parse_args(argv).func.__name__ == f"cmd_{argv[0].replace('-', '_')}"


# ---- no credentials ---------------------------------------------------------------------------------------

SECRET_WORDS = re.compile(r"(secret|password|passwd|token|access_?key|private_?key|credential)", re.I)
NOT_SECRETS = {"HttpTokens"}  # EC2 MetadataOptions: "required" turns IMDSv2 on; no token is stored
SECRET_VALUES = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY-----|aws_secret_access_key\s*=")


@pytest.mark.parametrize("name", YAMLS)
def test_configs_hold_no_credentials(name):
    from jobs.spec import SECRET_KEYS

    # "key" is a credential in fsspec storage options but a plain field in Kubernetes (tolerations, items):
    # in these files an access key would show as a value, which SECRET_VALUES catches.
    credential_keys = SECRET_KEYS - {"key"}
    text = (INFRA / name).read_text()
    assert not SECRET_VALUES.search(text)
    for doc in documents(name):
        for path, key, value in walk(doc):
            if key is not None and key not in NOT_SECRETS:
                assert str(key).lower() not in credential_keys and not SECRET_WORDS.search(str(key)), path
            if isinstance(value, dict) and "name" in value and ("value" in value or "valueFrom" in value):
                assert not SECRET_WORDS.search(value["name"]) and not value["name"].startswith("AWS_"), path
    for doc in documents(name):
        if doc.get("kind") == "ConfigMap":
            for key, body in doc["data"].items():
                for path, k, _ in walk(yaml.safe_load(body)):
                    assert k is None or str(k).lower() not in SECRET_KEYS, f"{key}{path}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_hold_no_credentials(name):
    assert not SECRET_VALUES.search((INFRA / name).read_text())
    for op, args in instructions(name):
        if op in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not any(SECRET_WORDS.search(n) or n.startswith("AWS_") for n in names), args
