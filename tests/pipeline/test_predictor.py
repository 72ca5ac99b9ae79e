"""The tile predictor's precision choice, on both kinds of CPU whatever this machine's CPU is.

``precision: auto`` asks one probe (``cpu_has_bf16``); faking it runs the bf16 path on a CPU without
avx512_bf16 (emulated: slower, same numbers) and the fp32 path on one with it, so CI on either kind of
machine exercises both.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import seeded_checkpoint
from pipeline.workers import predictor as pred
from pipeline.workers.predictor import PredictorConfig, TilePredictor, resolve_precision

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_follows_the_cpu_probe(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(pred, "cpu_has_bf16", lambda: has_bf16)
    assert resolve_precision("auto", CPU) is expected
    # an explicit precision never asks the probe
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("fp16", CPU) is torch.float16


def test_the_probe_answers_a_bool():
    assert isinstance(pred.cpu_has_bf16(), bool)


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_runs_either_path_and_both_agree_with_fp32(monkeypatch, has_bf16):
    """Both ``auto`` outcomes run end to end on this CPU; bf16 agrees with fp32 on most argmax pixels
    (an untrained model is the worst case: near-uniform probabilities), fp32 exactly."""
    monkeypatch.setattr(pred, "cpu_has_bf16", lambda: has_bf16)
    ckpt = seeded_checkpoint("fpn_resnet10", 3, ["a", "b", "c"], seed=1, width=8)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    auto = TilePredictor(ckpt, PredictorConfig(precision="auto"), device="cpu")
    assert auto.autocast_dtype is (torch.bfloat16 if has_bf16 else None)
    reference = TilePredictor(ckpt, PredictorConfig(precision="fp32"), device="cpu")(tiles)
    got = auto(tiles)
    assert got.shape == (2, 3, 64, 64) and got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32).sum(1), 1.0, atol=2e-2)
    agree = (got.argmax(1) == reference.argmax(1)).mean()
    if has_bf16:
        assert agree >= 0.9, f"bf16 and fp32 agree on {agree:.2%} of pixels"
        assert np.abs(got.astype(np.float32) - reference.astype(np.float32)).max() < 0.1
    else:
        np.testing.assert_array_equal(got, reference)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ONEDNN_MAX_CPU_ISA names x86 ISAs")
def test_auto_is_fp32_on_a_cpu_without_bf16_kernels():
    """The real probe, on a CPU capped at AVX2 (oneDNN's ``ONEDNN_MAX_CPU_ISA``), as on a machine without
    avx512_bf16: ``auto`` must run fp32 there, whatever CPU runs the suite."""
    code = ("import torch; from pipeline.workers.predictor import resolve_precision; "
            "print(resolve_precision('auto', torch.device('cpu')))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "None"
