"""Unit tests for models/checkpoint.py: round trip, mismatch errors, corrupt input, determinism."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from models import DECODERS, ModelConfig, build_model
from models.checkpoint import (
    IMAGENET_NORMALIZATION,
    Normalization,
    load_checkpoint,
    load_state_into,
    read_info,
    save_checkpoint,
    seeded_checkpoint,
)
from models.errors import CheckpointError
from models.heads import fit_dupsampling

WIDTH = 16
NAMES = ["background", "cell", "nucleus"]
COLORS = [(0, 0, 0), (255, 0, 0), (0, 255, 128)]


def _config(name: str = "fpn_resnet18", num_classes: int = 3) -> ModelConfig:
    return ModelConfig(name=name, num_classes=num_classes, width=WIDTH)


def _checkpoint(name: str = "fpn_resnet18", num_classes: int = 3, seed: int = 0) -> bytes:
    names = [f"class{i}" for i in range(num_classes)]
    return seeded_checkpoint(name, num_classes, names, seed=seed, width=WIDTH)


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path: Path) -> None:
    config = _config()
    model = build_model(config, seed=3)
    model.train()
    with torch.no_grad():  # move the BN running stats away from their init so they are tested too
        model(torch.randn(2, 3, 64, 64) * 2 + 1)
    model.eval()
    norm = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    path = tmp_path / "sub" / "model.safetensors"
    data = save_checkpoint(path, model, config, NAMES, COLORS, norm)
    assert path.read_bytes() == data

    loaded, info = load_checkpoint(data)
    assert not loaded.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info.config == config
    assert info.class_names == tuple(NAMES)
    assert info.class_colors == tuple(COLORS)
    assert info.normalization == Normalization.from_dict(norm)
    assert torch.equal(loaded.encoder.bn1.running_mean, model.encoder.bn1.running_mean)


def test_defaults_and_channels_last_model_save() -> None:
    config = _config()
    model = build_model(config, seed=0).to(memory_format=torch.channels_last)
    _, info = load_checkpoint(save_checkpoint(None, model, config, NAMES))
    assert info.class_colors is None
    assert info.normalization == IMAGENET_NORMALIZATION


def test_save_rejects_model_that_is_not_its_config() -> None:
    model = build_model(_config(num_classes=4))
    with pytest.raises(CheckpointError, match="classifier.weight"):
        save_checkpoint(None, model, _config(num_classes=3), NAMES)


@pytest.mark.parametrize(
    ("names", "colors", "norm", "match"),
    [
        (["a", "b"], None, None, "2 class names"),
        (["a", "a", "b"], None, None, "distinct"),
        (NAMES, [(0, 0, 0)] * 2, None, "2 class colors"),
        (NAMES, [(0, 0, 300)] * 3, None, "0..255"),
        (NAMES, None, {"mean": [123.7, 116.3, 103.5], "std": [58.4, 57.1, 57.4]}, "0..1 units"),
        (NAMES, None, {"mean": [0.5], "std": [0.2]}, "in_channels=3"),
    ],
)
def test_save_rejects_bad_metadata(names, colors, norm, match) -> None:
    config = _config()
    with pytest.raises(ValueError, match=match):
        save_checkpoint(None, build_model(config), config, names, colors, norm)


def test_wrong_class_count_names_the_tensors() -> None:
    model = build_model(_config(num_classes=4))
    with pytest.raises(CheckpointError) as info:
        load_state_into(model, _checkpoint(num_classes=3))
    msg = str(info.value)
    assert "2 shape mismatches" in msg
    assert "classifier.weight checkpoint [3, 16, 1, 1] vs model [4, 16, 1, 1]" in msg
    assert "classifier.bias" in msg
    assert "'fpn_resnet18', 3 classes" in msg  # what the checkpoint was saved for
    assert "class count" in msg  # how to fix


def test_wrong_architecture_lists_missing_keys_with_count() -> None:
    model = build_model(_config("fpn_resnet34"))
    with pytest.raises(CheckpointError) as info:
        load_state_into(model, _checkpoint("fpn_resnet18"))
    msg = str(info.value)
    assert "missing from checkpoint: encoder.layer1.2." in msg
    assert "more)" in msg
    assert "unexpected" not in msg


def test_non_strict_load_copies_only_matching_tensors() -> None:
    model = build_model(_config(num_classes=4), seed=1)
    classifier_before = model.classifier.weight.detach().clone()
    data = _checkpoint(num_classes=3)
    diff = load_state_into(model, data, strict=False)
    assert [n for n, _, _ in diff.mismatched] == ["classifier.bias", "classifier.weight"]
    source, _ = load_checkpoint(data)
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)
    assert torch.equal(model.classifier.weight, classifier_before)


def test_load_checkpoint_whose_metadata_disagrees_with_its_weights() -> None:
    data = _checkpoint(num_classes=3)
    metadata = {k: v for k, v in _header(data)["__metadata__"].items()}
    metadata["config"] = json.dumps(_config("fpn_resnet18", num_classes=4).to_dict())
    metadata["class_names"] = json.dumps(["a", "b", "c", "d"])
    state = build_model(_config(num_classes=3)).state_dict()
    with pytest.raises(CheckpointError, match=r"classifier\.weight checkpoint \[3"):
        load_checkpoint(st_save(state, metadata=metadata))


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        bytes(range(256)) * 8,
        (20).to_bytes(8, "little") + b"[1, 2, 3]" + b" " * 11,
        (10**12).to_bytes(8, "little") + b"{}",
    ],
)
def test_garbage_bytes_raise_checkpoint_error(data: bytes) -> None:
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(data)


def test_truncated_checkpoint_raises_checkpoint_error() -> None:
    data = _checkpoint()
    with pytest.raises(CheckpointError):
        load_checkpoint(data[: len(data) // 2])


def test_safetensors_without_gigaseg_metadata() -> None:
    state = build_model(_config()).state_dict()
    with pytest.raises(CheckpointError, match="no __metadata__"):
        load_checkpoint(st_save(state))
    partial = {"gigaseg_format": "1", "config": "{}", "class_names": "[]"}
    with pytest.raises(CheckpointError, match=r"lacks keys \['class_colors', 'normalization'\]"):
        read_info(st_save(state, metadata=partial))
    bad = partial | {
        "config": '{"name": "fpn_resnet18", "num_classes": 3, "depth": 2}',
        "class_colors": "null",
        "normalization": "{}",
    }
    with pytest.raises(CheckpointError, match="depth"):
        read_info(st_save(state, metadata=bad))


def test_seeded_checkpoint_is_deterministic() -> None:
    a = _checkpoint(seed=0)
    assert a == _checkpoint(seed=0)
    assert a != _checkpoint(seed=1)
    # safetensors writes metadata in per-process hash order; the bytes must not depend on it.
    names = ["class0", "class1", "class2"]
    code = (
        "import hashlib; from models.checkpoint import seeded_checkpoint; "
        f"data = seeded_checkpoint('fpn_resnet18', 3, {names!r}, seed=0, width={WIDTH}); "
        "print(hashlib.sha256(data).hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == hashlib.sha256(a).hexdigest()


# ---------------------------------------------------------------- every head

HEADS = sorted(DECODERS)


def arch(head: str) -> str:
    """``head`` on resnet18; FCN-8s as published exists only on its VGG-16."""
    return "fcn8s_vgg16" if head == "fcn8s" else f"{head}_resnet18"
# Tensors whose shape depends on the class count: what fine-tuning on new classes re-initialises.
CLASS_TENSORS = {
    "deeplabv3": {"classifier.weight", "classifier.bias"},
    "fcn8s": {"decoder.output.6.weight", "decoder.output.6.bias", "decoder.adj_pool3.weight",
              "decoder.adj_pool3.bias", "decoder.adj_pool4.weight", "decoder.adj_pool4.bias",
              "decoder.up_output.weight", "decoder.up_pool4_out.weight", "decoder.up_final.weight"},
    "magnet_fpn": {"decoder.classify.weight", "decoder.classify.bias"},
    "dupsampling": {"decoder.basis", "decoder.mean"},
    "fcn": {f"decoder.score.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    | {"decoder.up.0.weight", "decoder.up.1.weight"},
    "fpn": {"classifier.weight", "classifier.bias"},
    "ocrnet": {"classifier.weight", "classifier.bias",
               "decoder.aux.1.weight", "decoder.aux.1.bias"},
    "segnet": {"classifier.weight", "classifier.bias"},
    "unet": {"classifier.weight", "classifier.bias"},
}


def test_class_tensor_table_covers_every_head() -> None:
    assert set(CLASS_TENSORS) == set(DECODERS)


def _trained_like(name: str, num_classes: int = 3, seed: int = 3):
    """A model whose BN running stats (and DUpsampling basis) differ from their initial values."""
    config = _config(name, num_classes)
    model = build_model(config, seed=seed)
    if name.startswith("dupsampling"):
        g = torch.Generator().manual_seed(0)
        fit_dupsampling(model.decoder, torch.randint(0, num_classes, (4, 64, 64), generator=g),
                        num_classes)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 2 + 1)
    return config, model.eval()


@pytest.mark.parametrize("head", HEADS)
def test_every_head_round_trips_with_identical_outputs(head: str) -> None:
    config, model = _trained_like(arch(head))
    loaded, info = load_checkpoint(save_checkpoint(None, model, config, NAMES))
    assert info.config == config
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    saved, again = model.state_dict(), loaded.state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


@pytest.mark.parametrize("head", HEADS)
def test_every_head_refuses_another_class_count_naming_the_tensors(head: str) -> None:
    model = build_model(_config(arch(head), num_classes=4))
    with pytest.raises(CheckpointError) as info:
        load_state_into(model, _checkpoint(arch(head), num_classes=3))
    msg = str(info.value)
    assert f"{len(CLASS_TENSORS[head])} shape mismatches" in msg
    assert sorted(CLASS_TENSORS[head])[0] in msg
    assert "class count" in msg


@pytest.mark.parametrize("head", HEADS)
def test_every_head_refuses_another_architecture_naming_the_tensors(head: str) -> None:
    other = HEADS[(HEADS.index(head) + 1) % len(HEADS)]
    model = build_model(_config(arch(other)))
    with pytest.raises(CheckpointError, match=r"(missing from|unexpected in) checkpoint: decoder"):
        load_state_into(model, _checkpoint(arch(head)))


@pytest.mark.parametrize("head", HEADS)
def test_fine_tuning_on_new_classes_keeps_only_the_class_tensors_fresh(head: str) -> None:
    name = arch(head)
    model = build_model(_config(name, num_classes=5), seed=1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    data = _checkpoint(name, num_classes=3)
    diff = load_state_into(model, data, strict=False)
    assert {n for n, _, _ in diff.mismatched} == CLASS_TENSORS[head]
    assert not diff.missing and not diff.unexpected
    source = load_checkpoint(data)[0].state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k] if k in CLASS_TENSORS[head] else source[k]), k
    logits = model(torch.randn(2, 3, 64, 64))  # and it trains on the new classes
    assert logits.shape == (2, 5, 64, 64)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 5, (2, 64, 64))).backward()
