"""Shared fixtures: a real S3-compatible server (moto) on 127.0.0.1 and a real local Ray cluster.

Fake credentials go into the environment before Ray starts, so Ray's worker processes inherit them the
way cluster workers inherit an instance role; specs never carry them. The suite sets, rather than
defaults, everything it depends on in the environment: whatever the machine's environment holds (real
credentials, a profile, an endpoint override, a Ray address) never reaches a test.
"""

from __future__ import annotations

import os

import pytest

for _name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
              "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "RAY_ADDRESS",
              "RAY_API_SERVER_ADDRESS"):
    os.environ.pop(_name, None)
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,  # no ~/.aws profile, region or endpoint of this machine's
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
})


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 at a free port, for the whole session, counting its requests."""
    from tests.s3count import CountingMotoServer

    server = CountingMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    """URL of the session's moto S3 server."""
    host, port = s3_server.get_host_and_port()
    return f"http://{host}:{port}"


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; yields ``(bucket_name, storage_options)``."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-b"
    options = {"endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    if not fs.exists(name):
        fs.mkdir(name)
    fs.invalidate_cache()
    yield name, options


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs and 2 logical GPUs, shared by the integration tests."""
    import shutil

    import ray

    from pipeline.workers.ray_cluster import ray_temp_dir

    temp_dir = ray_temp_dir()
    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
            object_store_memory=512 * 1024 * 1024, _temp_dir=temp_dir,
            log_to_driver=False, configure_logging=False,
        )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
