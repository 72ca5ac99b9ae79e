"""``gigaseg export MODEL.safetensors OUT.onnx``: a gigaseg segmenter as ONNX with its card in ``metadata_props``;
its logits match torch's, ``gigaseg inspect`` reads the card back, and ``gigaseg run`` gives the same masks with it
as with the checkpoint it came from."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
import zarr

from jobs.cli import main as cli_main
from models.card import CARD_KEY
from models.checkpoint import load_checkpoint, seeded_checkpoint
from tests.archive import spec_dict

pytestmark = pytest.mark.integration

#: fp32 logits of ONNX Runtime against torch on the CPU: the same convolutions summed in another order.
LOGIT_TOLERANCE = 1e-4
#: blended probabilities as stored (float16) by the two runs.
PROBABILITY_TOLERANCE = 2e-3


def test_export_round_trip_inspect_and_run(tmp_path, ray_cluster, capsys):
    ckpt = tmp_path / "four.safetensors"
    ckpt.write_bytes(seeded_checkpoint("fpn_resnet10", 3, ["water", "field", "town"], seed=2, width=8, in_channels=4))
    out = tmp_path / "four.onnx"
    assert cli_main(["export", str(ckpt), str(out)]) == 0
    assert "max |ONNX Runtime − torch|" in capsys.readouterr().out

    proto = onnx.load(str(out))
    card = json.loads({p.key: p.value for p in proto.metadata_props}[CARD_KEY])
    assert [c["name"] for c in card["classes"]] == ["water", "field", "town"]
    assert len(card["bands"]) == 4 and len(card["normalization"]["mean"]) == 4
    assert card["size_multiple"] == 32 and card["output"] == "logits"
    model, _ = load_checkpoint(ckpt.read_bytes())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(1, 4, 64, 64), (3, 4, 96, 160)]:  # batch, height and width are free (multiples of 32)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == want.shape and np.abs(got - want).max() < LOGIT_TOLERANCE

    assert cli_main(["inspect", str(out), "--tile", "128"]) == 0
    printed = capsys.readouterr().out
    assert "onnx model" in printed and "water, field, town" in printed and "band_0, band_1, band_2, band_3" in printed

    # the exported model through gigaseg run, against the checkpoint it came from, on a 4-band image
    (tmp_path / "in").mkdir()
    pixels = np.random.default_rng(4).integers(0, 256, (260, 300, 4), dtype=np.uint8)
    zarr.create_array(store=str(tmp_path / "in" / "scene.zarr"), shape=pixels.shape, chunks=(128, 128, 4),
                      dtype="uint8")[:] = pixels
    probs = {}
    for name, checkpoint in (("torch", ckpt), ("onnx", out)):
        spec = spec_dict(str(tmp_path / "in"), str(tmp_path / name))
        spec["inputs"]["bands"] = [0, 1, 2, 3]
        spec["model"] = {"checkpoint": str(checkpoint), "precision": "fp32"}
        spec["output"]["extras"] = ["probabilities"]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        assert cli_main(["run", str(path)]) == 0, capsys.readouterr().err
        probs[name] = zarr.open_array(str(tmp_path / name / "scene.zarr" / "probabilities"), mode="r")[:]
    p, q = (probs[k].astype(np.float32) for k in ("torch", "onnx"))
    assert np.abs(p - q).max() < PROBABILITY_TOLERANCE
    top2 = np.sort(p, axis=0)[-2:]
    clear = top2[1] - top2[0] > 2 * PROBABILITY_TOLERANCE
    assert clear.mean() > 0.95 and (p.argmax(0)[clear] == q.argmax(0)[clear]).all()


def test_what_cannot_be_exported_is_exit_2(tmp_path, capsys):
    from models.fctl_checkpoint import seeded_fctl

    fctl = tmp_path / "fctl.safetensors"
    fctl.write_bytes(seeded_fctl("fpn_resnet10", 2, ["a", "b"], width=8))
    assert cli_main(["export", str(fctl), str(tmp_path / "x.onnx")]) == 2
    assert "context windows" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "missing.safetensors"), str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()
