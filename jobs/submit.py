"""``gigaseg submit`` / ``logs`` / ``job-status``: run a job spec on a remote Ray cluster (Ray Jobs API).

The spec is validated here first, so a bad spec exits 2 before the cluster is contacted. The validated
spec (overrides applied, defaults filled in, ``cluster.address: auto`` so the driver joins the cluster it
runs on instead of starting an embedded one) is written as ``job.yaml`` into a fresh directory that is
uploaded as the job's runtime_env ``working_dir`` — that file and nothing else — and run there as
``gigaseg run job.yaml``. The project itself is baked into the cluster image (infra/Dockerfile); with
``--ship-project`` the local ``pipeline``/``models``/``jobs`` packages go along as ``py_modules`` and the
entrypoint is ``python -m jobs.cli`` (the image then needs only the pinned dependencies).

Exit codes: 0 submitted (``--no-wait``) or succeeded, 1 the job failed or was stopped, 2 bad spec,
bad arguments, unknown job or unreachable address.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from jobs.console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error, print_problems, warning
from jobs.spec import JobSpec, load_spec, parse_spec
from models.errors import GigasegError
from pipeline.errors import SpecError
from pipeline.storage import is_local, local_path

SPEC_NAME = "job.yaml"
PROJECT_PACKAGES = ("pipeline", "models", "jobs")
CONNECT_TIMEOUT_S = 10.0
#: Ray reads these in ``JobSubmissionClient`` and lets them override the address it is given.
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_FAILED = {"FAILED", "STOPPED"}
_TERMINAL = _FAILED | {"SUCCEEDED"}


class ClusterUnreachableError(GigasegError, ConnectionError):
    """The Ray Jobs API at an address cannot be reached, or what answers there is not Ray's."""


class JobNotFoundError(GigasegError, LookupError):
    """The cluster has no job with that id."""


@dataclass(frozen=True)
class PreparedSpec:
    """A validated spec as it will run on the cluster: its YAML text and the notes about it."""

    spec: JobSpec
    text: str
    warnings: tuple[str, ...]


def prepare_spec(path: str, overrides: list[str] | None = None) -> PreparedSpec:
    """Validate ``path`` (with ``--set`` overrides) for a run on a remote cluster; raises ``SpecError``.

    Relative local paths are refused (they would resolve inside the job's temporary working_dir);
    absolute local paths are allowed with a warning (they are read on the cluster's nodes, not here).
    """
    spec = load_spec(path, overrides)
    data = spec.model_dump(mode="json")
    warnings, problems = [], []
    if spec.cluster.address not in (None, "auto"):
        warnings.append(f"cluster.address {spec.cluster.address!r} is replaced by 'auto': a submitted job "
                        "joins the cluster it is submitted to")
    data["cluster"]["address"] = "auto"
    for field, url in (("inputs.url", spec.inputs.url), ("output.url", spec.output.url),
                       ("model.checkpoint", spec.model.checkpoint)):
        if url is None or not is_local(url):
            continue
        if not os.path.isabs(local_path(url)):
            problems.append(f"{field}: relative path {url!r} means nothing on the cluster; use an s3:// URL or "
                            "an absolute path on storage every node mounts")
        else:
            warnings.append(f"{field}: {url} is a local path: the cluster's nodes read it from their own "
                            "filesystems, not from this machine")
    if problems:
        raise SpecError(str(path), problems)
    return PreparedSpec(parse_spec(data, str(path)), yaml.safe_dump(data, sort_keys=False), tuple(warnings))


def project_dirs() -> list[str]:
    """Directories of the packages ``--ship-project`` uploads (wherever they are imported from)."""
    import importlib

    return [str(Path(importlib.import_module(name).__file__).parent) for name in PROJECT_PACKAGES]


def job_request(prepared: PreparedSpec, workdir: str, *, ship_project: bool = False) -> dict:
    """Write ``job.yaml`` into ``workdir`` and return the ``submit_job`` keyword arguments."""
    Path(workdir, SPEC_NAME).write_text(prepared.text)
    runtime_env: dict = {"working_dir": workdir}
    program = "gigaseg"
    if ship_project:
        runtime_env["py_modules"] = project_dirs()
        runtime_env["excludes"] = ["__pycache__/", "*.pyc"]
        program = "python -m jobs.cli"
    return {
        "entrypoint": f"{program} run {SPEC_NAME}",
        "runtime_env": runtime_env,
        "metadata": {"gigaseg_output": prepared.spec.output.url},
    }


def normalize_address(address: str) -> str:
    """``host:port`` → ``http://host:port``; Ray Client (``ray://``) and other schemes are refused."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise ValueError(f"{address} is a Ray Client address; jobs are submitted to the dashboard's HTTP port, "
                         "e.g. http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{address}: expected http://HOST:PORT of the Ray dashboard (Jobs API), e.g. "
                         "http://127.0.0.1:8265")
    return address


@contextlib.contextmanager
def _only_this_address():
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the client resolves its address: --address wins."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S):
    """A ``JobSubmissionClient`` for ``address``; raises ``ClusterUnreachableError`` with one clear line."""
    from ray.job_submission import JobSubmissionClient

    url = normalize_address(address)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    hint = ("is the cluster up, and the dashboard port forwarded (ray dashboard infra/ray-cluster.yaml, or "
            "kubectl port-forward svc/gigaseg-head-svc 8265:8265)?")
    try:  # a bounded TCP check first: the client itself would wait forever on a silent host
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise ClusterUnreachableError(f"cannot reach the Ray Jobs API at {url} ({reason}); {hint}") from None
    try:
        with _only_this_address():
            return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ClusterUnreachableError(f"no Ray Jobs API at {url}: {first}; {hint}") from None


def job_status(client, job_id: str) -> str:
    """The job's status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); ``JobNotFoundError`` if none."""
    try:
        status = client.get_job_status(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise JobNotFoundError(f"no job {job_id!r} on the cluster at {client.get_address()}") from None
        raise
    return str(getattr(status, "value", status))


def follow(client, job_id: str, out=None, poll_s: float = 1.0) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    out = out or sys.stdout
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except Exception:  # no websocket or it broke (proxy, restart): poll instead and print the rest
        pass
    while (status := job_status(client, job_id)) not in _TERMINAL:  # the stream may end a moment early
        time.sleep(poll_s)
    rest = client.get_job_logs(job_id)[written:]
    if rest:
        out.write(rest)
        out.flush()
    return status


def cmd_submit(args) -> int:
    try:
        prepared = prepare_spec(args.spec, args.set)
    except SpecError as err:
        print_problems(err)
        return EXIT_USAGE
    for note in prepared.warnings:
        warning(note)
    try:
        client = connect(args.address)
        with tempfile.TemporaryDirectory(prefix="gigaseg-submit-") as workdir:
            job_id = client.submit_job(**job_request(prepared, workdir, ship_project=args.ship_project))
    except (ClusterUnreachableError, ValueError) as err:
        error(str(err))
        return EXIT_USAGE
    except (RuntimeError, OSError) as err:  # the cluster refused the job (runtime_env upload, HTTP error)
        error(f"the cluster at {normalize_address(args.address)} refused the job: {str(err).splitlines()[0]}")
        return EXIT_USAGE
    print(job_id, flush=True)
    address = normalize_address(args.address)
    if args.no_wait:
        print(f"follow: gigaseg logs {job_id} --address {address} --follow", file=sys.stderr)
        return EXIT_OK
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"stopped following; job {job_id} keeps running: gigaseg logs {job_id} --address {address} "
              "--follow", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}", file=sys.stderr)
    return EXIT_FAILED if status in _FAILED else EXIT_OK


def cmd_logs(args) -> int:
    try:
        client = connect(args.address)
        status = job_status(client, args.job_id)
        if not args.follow:
            sys.stdout.write(client.get_job_logs(args.job_id))
            return EXIT_OK
        status = follow(client, args.job_id)
    except (ClusterUnreachableError, JobNotFoundError, ValueError) as err:
        error(str(err))
        return EXIT_USAGE
    print(f"job {args.job_id}: {status}", file=sys.stderr)
    return EXIT_FAILED if status in _FAILED else EXIT_OK


def cmd_job_status(args) -> int:
    try:
        client = connect(args.address)
        status = job_status(client, args.job_id)
        info = client.get_job_info(args.job_id)
    except (ClusterUnreachableError, JobNotFoundError, ValueError) as err:
        error(str(err))
        return EXIT_USAGE
    message = (getattr(info, "message", None) or "").strip().replace("\n", " ")
    print(f"{args.job_id}  {status}  {getattr(info, 'entrypoint', '')}" + (f"  {message}" if message else ""))
    return EXIT_FAILED if status in _FAILED else EXIT_OK


def add_submit_parsers(subparsers) -> None:
    """Register ``submit``, ``logs`` and ``job-status`` on the ``gigaseg`` sub-command parser."""
    address_help = "Ray Jobs API (dashboard) URL, e.g. http://127.0.0.1:8265"

    s = subparsers.add_parser("submit", help="run a job spec on a Ray cluster (exit 0 ok, 1 job failed, 2 bad "
                                             "spec/address)")
    s.add_argument("spec")
    s.add_argument("--address", required=True, help=address_help)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set resources.workers=8 (repeatable)")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return without following")
    s.add_argument("--ship-project", action="store_true",
                   help="upload the local pipeline/, models/, jobs/ packages with the job instead of using "
                        "the ones baked into the cluster image")
    s.set_defaults(func=cmd_submit)

    lg = subparsers.add_parser("logs", help="print (or --follow) a submitted job's logs")
    lg.add_argument("job_id")
    lg.add_argument("--address", required=True, help=address_help)
    lg.add_argument("--follow", action="store_true",
                    help="stream until the job ends; exit 0 succeeded, 1 failed or stopped")
    lg.set_defaults(func=cmd_logs)

    st = subparsers.add_parser("job-status", help="status of a submitted job (exit 0 ok/running, 1 failed)")
    st.add_argument("job_id")
    st.add_argument("--address", required=True, help=address_help)
    st.set_defaults(func=cmd_job_status)
