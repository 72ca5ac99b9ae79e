"""No secret in any output: with AWS credentials in the environment and S3 calls that fail with messages quoting
the request's credentials (the fault proxy echoes its Authorization and session-token headers, as a careless
S3-compatible server might), and a presigned URL as the checkpoint, neither the console, the log, report.json,
``gigaseg status`` nor the spec echo holds the key id, the secret, the session token or a signature."""

from __future__ import annotations

import json
import logging

import pytest
import s3fs
import yaml
from PIL import Image

from jobs.cli import main
from pipeline.synth.land_cover import land_cover
from tests.archive import spec_dict
from tests.faults_s3 import FaultProxy, FaultRule

pytestmark = pytest.mark.integration

KEY = "AKIAGIGASEGFAKEKEY42"
SECRET = "gigaseg/FakeSecretThatMustNeverBePrinted1"
TOKEN = "FwoGZXIvYXdzEGigasegFakeSessionTokenThatMustNeverBePrinted0123456789"
SIGNATURE = "5f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0"


def presigned(base: str) -> str:
    return (f"{base}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={KEY}%2F20261207%2Fus-east-1%2Fs3%2F"
            f"aws4_request&X-Amz-Date=20261207T120000Z&X-Amz-Expires=3600&X-Amz-Security-Token={TOKEN}"
            f"&X-Amz-SignedHeaders=host&X-Amz-Signature={SIGNATURE}")


def test_no_secret_in_console_log_report_status_or_echo(tmp_path, s3_bucket, s3_endpoint, ray_cluster, monkeypatch,
                                                        capsys, caplog):
    bucket, options = s3_bucket
    Image.fromarray(land_cover(0, 0, 96, 128, seed=50)).save(tmp_path / "b.png")
    s3fs.S3FileSystem(**options).put(str(tmp_path / "b.png"), f"{bucket}/archive/b.png")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)  # the driver signs its requests with these
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    outputs: dict[str, str] = {}
    deny = FaultRule("forbidden", 1.0, frozenset({"GET"}), prefix=f"{bucket}/archive/", echo_auth=True)
    with FaultProxy(s3_endpoint, rules=(deny,)) as proxy:
        so = {"endpoint_url": proxy.url}
        spec = spec_dict(f"s3://{bucket}/archive", f"s3://{bucket}/masks", inputs__storage_options=so,
                         output__storage_options=so)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        assert main(["--debug", "run", str(tmp_path / "job.yaml")]) == 1  # the PNG, read by the driver, is denied
        outputs["run"] = "".join(capsys.readouterr())
        outputs["report"] = s3fs.S3FileSystem(**options).cat(f"{bucket}/masks/report.json").decode()
        assert main(["status", f"s3://{bucket}/masks", "--storage-options", json.dumps(so)]) == 1
        assert main(["status", f"s3://{bucket}/masks", "--storage-options", json.dumps(so), "--json"]) == 1
        outputs["status"] = "".join(capsys.readouterr())

        # a presigned URL (to the proxy, denied) as the checkpoint: echoed, then read and refused
        signed = spec_dict(str(tmp_path / "in"), str(tmp_path / "out"),
                           model__checkpoint=presigned(f"{proxy.url}/{bucket}/model.safetensors"))
        (tmp_path / "signed.yaml").write_text(yaml.safe_dump(signed))
        assert main(["validate", str(tmp_path / "signed.yaml"), "--echo"]) == 0
        assert main(["run", str(tmp_path / "signed.yaml")]) == 2
        outputs["echo and checkpoint"] = "".join(capsys.readouterr())
    outputs["log"] = caplog.text

    [image] = json.loads(outputs["report"])["images"]
    assert image["status"] == "failed" and f"s3://{bucket}/archive/b.png" in image["error"]
    assert "Access Denied" in image["error"] and "Signature=***" in image["error"], image["error"]
    assert "X-Amz-Signature=***" in outputs["echo and checkpoint"]
    for where, text in outputs.items():
        for secret in (KEY, SECRET, TOKEN, SIGNATURE):
            assert secret not in text, f"{secret[:8]}… in the {where} output"
