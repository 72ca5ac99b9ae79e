"""FCtL's ``procedure: reference``: the reference's architecture for a seeded model (key width C, stage 2's
one-context model, ToTensor inputs), checkpoints' own architecture kept, and test-time flips and rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.spec import FctlSpec
from models.fctl_checkpoint import read_fctl_info, seeded_fctl
from models.tta import VIEWS, transform, untransform
from pipeline.errors import SpecError
from pipeline.frameworks.base import ModelSource
from pipeline.frameworks.fctl import Fctl, FctlModel
from pipeline.workers.predictor import DeviceConfig, TilePredictor

NAMES = ("a", "b", "c")
CPU = DeviceConfig("fp32", 1, device="cpu")


def _resolve(checkpoint=None, **options):
    source = ModelSource(checkpoint, "ckpt" if checkpoint else None, "fpn_resnet10", NAMES, width=8)
    return Fctl.resolve(FctlSpec(**options).model_dump(), source)


def test_reference_procedure_shapes_a_seeded_fctl_as_the_reference() -> None:
    info, config = read_fctl_info(_resolve(procedure="reference").weights["model"])
    assert config.contexts == (2.0, 3.0) and config.key_channels == 64  # C of resnet10 width 8: 8·8
    assert (config.fusion, config.shared_encoder) == ("gated", False)
    assert info.normalization.mean == (0.0, 0.0, 0.0) and info.normalization.std == (1.0, 1.0, 1.0)
    info, config = read_fctl_info(_resolve(procedure="reference", contexts=[3]).weights["model"])
    assert (config.fusion, config.shared_encoder) == ("none", True)  # the reference's stage-2 model
    info, config = read_fctl_info(_resolve().weights["model"])
    assert (config.key_channels, config.fusion, info.normalization.mean[0]) == (None, "gated", 0.485)
    assert _resolve(procedure="reference").details["tta"] and not _resolve().details["tta"]
    assert not _resolve(procedure="reference", tta=False).details["tta"]
    with pytest.raises(SpecError, match="fusion 'none'.*takes one context"):
        _resolve(fusion="none")


def test_a_checkpoint_keeps_its_own_architecture() -> None:
    data = seeded_fctl("fpn_resnet10", 3, NAMES, width=8)
    assert _resolve(data, procedure="reference").weights["model"] == data
    with pytest.raises(SpecError, match="model.fctl.key_channels: 64 but ckpt has None"):
        _resolve(data, key_channels=64)


def test_test_time_augmentation_is_the_mean_of_the_eight_views_and_equivariant() -> None:
    torch.manual_seed(0)
    predictor = TilePredictor(seeded_fctl("fpn_resnet10", 3, NAMES, contexts=(2.0, 4.0), width=8, gamma=0.5), CPU)
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    contexts = rng.integers(0, 256, (2, 2, 3, 64, 64), dtype=np.uint8)
    model = FctlModel(predictor, tta=True)
    out = model(0, torch.from_numpy(tiles), [contexts])
    x = predictor.runner.input(tiles)
    ctx = predictor.runner.input(contexts.reshape(4, 3, 64, 64)).reshape(2, 2, 3, 64, 64)
    with torch.inference_mode():
        mean = sum(untransform(predictor.logits(transform(x, k, f), transform(ctx, k, f)), k, f) for k, f in VIEWS) / 8
    torch.testing.assert_close(out, torch.softmax(mean, 1))
    plain = FctlModel(predictor)(0, torch.from_numpy(tiles), [contexts])
    assert (plain - out).abs().max() > 1e-3  # the views differ: the augmentation does something
    turned = model(0, torch.from_numpy(np.rot90(tiles, 1, (2, 3)).copy()), [np.rot90(contexts, 1, (3, 4)).copy()])
    torch.testing.assert_close(turned, torch.rot90(out, 1, (2, 3)), atol=1e-5, rtol=1e-4)
