"""Training: the spec, planning against the dataset, fine-tuning init, checkpoints, and real Ray Train runs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from jobs.train import make_plan, train
from jobs.train.cli import add_train_parser
from jobs.train.loop import lr_factor
from jobs.train.spec import load_train_spec, parse_train_spec
from jobs.train.store import CheckpointStore
from jobs.train.tasks.segmenter import init_weights
from models import ModelConfig, build_model
from models.checkpoint import load_checkpoint, read_info, save_checkpoint
from pipeline.errors import SpecError
from pipeline.training.dataset_import import import_pairs
from tests.pipeline.test_datasets import write_pairs

CLASSES = ["background", "road", "building"]
ROOT = Path(__file__).resolve().parents[2]
# Ray Train polls its workers every 2 s and starts a preemption watcher per run: fine for real runs,
# seconds of idle time in a test of tiny epochs.
FAST_RAY_TRAIN = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture
def fast_ray_train(monkeypatch):
    for key, value in FAST_RAY_TRAIN.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """Three tiny index-mask pairs whose colour gives the class away: a narrow model learns it fast."""
    root = tmp_path_factory.mktemp("train-ds")
    write_pairs(root / "src", [(160, 144), (128, 128), (96, 112)], kind="index", k=3)
    import_pairs(str(root / "src"), str(root / "ds"), image_pattern="{id}_sat.png", classes=CLASSES,
                 mask_kind="index", chunk=64, min_size=32)
    return str(root / "ds")


def spec_dict(ds_url: str, out_url: str, /, **sections) -> dict:
    base = {
        "dataset": {"url": ds_url},
        "model": {"name": "fpn_resnet18", "width": 8},
        "crops": {"size": 64, "scales": [1, 2], "batches_per_epoch": 6, "batch_size": 4},
        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "epochs": 3,
        "workers": {"num_workers": 2, "use_gpu": False},
        "output": {"url": out_url},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


# ---------------------------------------------------------------- spec and plan (no Ray)


def test_spec_defaults_and_errors_with_key_paths(tmp_path):
    spec = parse_train_spec({"dataset": {"url": "ds"}, "output": {"url": "out"}})
    assert (spec.loss.name, spec.optimizer.name, spec.schedule.name, spec.workers.use_gpu) == (
        "ce", "sgd", "poly", "auto")
    with pytest.raises(SpecError) as err:
        parse_train_spec({
            "dataset": {"url": "ds", "storage_options": {"secret": "x"}},
            "crops": {"size": 100, "sise": 3}, "loss": {"name": "dice"}, "model": {"name": "unet9"},
            "output": {"url": "out"},
        })
    text = "\n".join(err.value.problems)
    for expected in ("crops.sise: unknown key", "crops.size: must be a multiple",
                     "loss.name: Input should be 'ce', 'ohem' or 'focal'", "model.name: unknown model 'unet9'",
                     "dataset.storage_options: 'secret' is a credential"):
        assert expected in text, text
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(spec_dict("ds", "out")))
    spec = load_train_spec(path, ["loss.name=focal", "loss.gamma=2", "epochs=7"])
    assert (spec.loss.name, spec.loss.gamma, spec.epochs) == ("focal", 2.0, 7)


def test_plan_splits_validation_and_resolves_classes(dataset):
    plan = make_plan(parse_train_spec(spec_dict(dataset, "out", dataset={
        "url": dataset, "validation": {"names": ["s1"], "exclude_classes": ["background"]}})))
    assert plan.train_names == ["s0", "s2"] and plan.val_names == ["s1"] and plan.exclude_classes == [0]
    assert plan.class_names == CLASSES and plan.model.to_dict()["num_classes"] == 3 and plan.ignore_index == 255
    plan = make_plan(parse_train_spec(spec_dict(dataset, "out", dataset={"url": dataset,
                                                                         "validation": {"fraction": 0.3}})))
    assert len(plan.val_names) == 1 and len(plan.train_names) == 2
    with pytest.raises(SpecError) as err:
        make_plan(parse_train_spec(spec_dict(dataset, "out", dataset={
            "url": dataset, "validation": {"names": ["s0", "s1", "s2", "zz"], "exclude_classes": ["sky"]}})))
    assert len(err.value.problems) == 3  # unknown name, nothing left to train, unknown class


def test_plan_resolves_class_weights(dataset):
    from models.losses import median_frequency_weights
    from pipeline.training.datasets import read_dataset

    assert make_plan(parse_train_spec(spec_dict(dataset, "out"))).class_weights is None
    plan = make_plan(parse_train_spec(spec_dict(dataset, "out", loss={"class_weights": "median_frequency"})))
    assert plan.class_weights == median_frequency_weights(read_dataset(dataset).class_pixels)
    spec = parse_train_spec(spec_dict(dataset, "out", loss={"name": "focal", "class_weights": [1, 2, 0.5]}))
    plan = make_plan(spec)
    assert plan.class_weights == [1.0, 2.0, 0.5]
    from jobs.train.common import spec_loss

    assert spec_loss(spec, plan).weight.tolist() == [1.0, 2.0, 0.5]  # what the training workers build
    with pytest.raises(SpecError, match=r"loss.class_weights: 2 weight\(s\) for 3 classes"):
        make_plan(parse_train_spec(spec_dict(dataset, "out", loss={"class_weights": [1, 2]})))
    with pytest.raises(SpecError, match="class_weights"):
        parse_train_spec(spec_dict(dataset, "out", loss={"class_weights": [0, 0, 0]}))


def test_fine_tuning_reinitialises_the_head_when_classes_differ(tmp_path, dataset):
    source = ModelConfig("fpn_resnet18", num_classes=5, width=8)
    ckpt = save_checkpoint(tmp_path / "init.safetensors", build_model(source, seed=3), source,
                           [f"c{i}" for i in range(5)])
    target = ModelConfig("fpn_resnet18", num_classes=3, width=8)
    model = build_model(target, seed=0)
    head_before = model.classifier.weight.detach().clone()
    assert "all but the class head" in init_weights(model, ckpt, target, CLASSES)
    loaded = load_checkpoint(ckpt)[0].state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[k], loaded[k]) for k in state if not k.startswith("classifier."))
    assert torch.equal(model.classifier.weight, head_before)

    renamed = save_checkpoint(None, build_model(target, seed=5), target, ["a", "b", "c"])  # same count
    fresh = build_model(target, seed=0)
    assert "all but the class head" in init_weights(fresh, renamed, target, CLASSES)
    assert torch.equal(fresh.classifier.weight, head_before)

    same = save_checkpoint(None, build_model(target, seed=4), target, CLASSES)
    assert init_weights(model, same, target, CLASSES) == "all weights"
    assert torch.equal(model.classifier.weight, load_checkpoint(same)[0].classifier.weight)

    with pytest.raises(SpecError, match="model.init: .* width 16"):
        make_plan(parse_train_spec(spec_dict(dataset, "out", model={"width": 16, "init": str(tmp_path / "init.safetensors")})))


def test_init_from_torchvision_resnet_weights(tmp_path, dataset):
    """``model.init`` takes ImageNet encoder weights in torchvision's layout: the file itself (torch.save) or the
    encoder checkpoint import-checkpoint makes of it. They seed the encoder only; crops are then normalised as
    the encoder was trained (ImageNet's statistics)."""
    import io

    from models.reference.imports import import_torchvision_resnet
    from tests.models.reference_layouts import RESNETS, materialise, resnet_shapes

    state = materialise(resnet_shapes(*RESNETS["resnet18"], width=8), seed=4)
    buf = io.BytesIO()
    torch.save(state, buf)
    (tmp_path / "resnet18.pth").write_bytes(buf.getvalue())
    encoder_file = import_torchvision_resnet([("resnet18.pth", buf.getvalue())]).files["encoder.safetensors"]
    (tmp_path / "encoder.safetensors").write_bytes(encoder_file)
    target = ModelConfig("fpn_resnet18", num_classes=3, width=8)
    for data in (buf.getvalue(), encoder_file):
        model = build_model(target, seed=0)
        head = model.decoder.lateral[0].weight.detach().clone()
        assert "the encoder (resnet18 of width 8" in init_weights(model, data, target, CLASSES)
        assert all(torch.equal(v, state[k]) for k, v in model.encoder.state_dict().items())
        assert torch.equal(model.decoder.lateral[0].weight, head)
    plan = make_plan(parse_train_spec(spec_dict(dataset, "out", model={"width": 8,
                                                                       "init": str(tmp_path / "resnet18.pth")})))
    assert plan.normalization["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(SpecError, match=r"model.init: .*resnet18 of width 8.*fpn_resnet34"):
        make_plan(parse_train_spec(spec_dict(dataset, "out", model={"name": "fpn_resnet34", "width": 8,
                                                                    "init": str(tmp_path / "encoder.safetensors")})))


def test_lr_schedules():
    assert lr_factor(0, 100, "constant") == 1.0
    assert lr_factor(50, 100, "poly", power=1.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, "poly") == 0.0
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(0, 100, "cosine") == 1.0
    assert [lr_factor(s, 100, "constant", warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_checkpoint_store_round_trip_is_weights_only(tmp_path):
    store = CheckpointStore(str(tmp_path / "out"))
    config = ModelConfig("fpn_resnet18", num_classes=3, width=8)
    model = build_model(config, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    weights = save_checkpoint(None, model, config, CLASSES)
    history = {"epoch": [1, 2], "train_loss": [1.0, float("nan")]}
    for epoch in (1, 2, 3):
        store.save_epoch(epoch, weights, {"epoch": epoch, "optimizer": opt.state_dict(), "history": history},
                         history, {"model": config.to_dict()}, keep=2)
    assert store.latest()["dir"] == "epoch-003" and store.epochs() == [2, 3]  # epoch 1 pruned
    assert json.loads((tmp_path / "out" / "history.json").read_text())["train_loss"] == [1.0, None]
    assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w, state = store.load_epoch(store.latest())
    assert w == weights and state["epoch"] == 3
    assert torch.equal(state["optimizer"]["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])
    store.clear()
    assert store.latest() is None and store.epochs() == []


def test_cmd_train_exit_codes_without_ray(tmp_path, dataset, capsys):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec_dict(dataset, str(tmp_path / "o")), "epochz": 3}))
    args = parser.parse_args(["train", str(bad)])
    assert args.func(args) == 2
    assert "epochz: unknown key" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec_dict(str(tmp_path / "nowhere"), str(tmp_path / "o"))))
    args = parser.parse_args(["train", str(good)])
    assert args.func(args) == 2
    assert "no dataset.json" in capsys.readouterr().err


# ---------------------------------------------------------------- real Ray Train runs


@pytest.mark.integration
def test_two_worker_run_lowers_the_loss(tmp_path, dataset, ray_cluster, fast_ray_train):
    spec = parse_train_spec(spec_dict(dataset, str(tmp_path / "out"), epochs=3, output={"keep_last": 2},
                                      dataset={"url": dataset, "validation": {"names": ["s2"]}}))
    result = train(spec, progress=False)
    losses = result.history["train_loss"]
    assert result.start_epoch == 1 and result.last_epoch == 3 and result.history["epoch"] == [1, 2, 3]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(0.0 <= v <= 1.0 for v in result.history["miou"])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("epoch-*")) == ["epoch-002", "epoch-003"]
    model, info = load_checkpoint((out / "model.safetensors").read_bytes())  # what `gigaseg run` loads
    assert info.class_names == tuple(CLASSES) and info.config.width == 8
    ds_norm = json.loads((Path(dataset) / "dataset.json").read_text())["normalization"]
    assert list(info.normalization.mean) == pytest.approx(ds_norm["mean"])
    assert read_info((out / "epoch-003" / "model.safetensors").read_bytes()) == info
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert train(spec, progress=False).start_epoch == 4  # a rerun of a finished spec trains nothing


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group and every descendant (Ray processes retitle themselves and some
    leave the group, so they are recorded first)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


@pytest.mark.integration
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, dataset, ray_cluster, fast_ray_train):
    out = tmp_path / "out"
    spec = spec_dict(dataset, str(out), epochs=3, crops={"batches_per_epoch": 20})
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(spec))
    script = textwrap.dedent(f"""
        from jobs.train import train
        from jobs.train.spec import load_train_spec
        train(load_train_spec({str(tmp_path / "train.yaml")!r}), progress=False)
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded cluster
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "latest.json").exists():
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch finished in 120 s"
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    done = json.loads((out / "latest.json").read_text())["epoch"]
    assert 1 <= done < 3, "the run finished before it could be killed; make its epochs longer"

    result = train(parse_train_spec(spec), progress=False)
    assert result.start_epoch == done + 1 and result.last_epoch == 3
    assert result.history["epoch"] == [1, 2, 3]  # the killed run's epochs kept, none repeated
    assert (out / "model.safetensors").exists()


@pytest.mark.integration
def test_checkpoint_store_on_s3(s3_bucket):
    bucket, options = s3_bucket
    store = CheckpointStore(f"s3://{bucket}/run", options)
    assert store.latest() is None and store.epochs() == []
    for epoch in (1, 2):
        store.save_epoch(epoch, b"weights%d" % epoch, {"epoch": epoch}, {"train_loss": [1.0] * epoch}, {}, keep=1)
    assert store.latest()["dir"] == "epoch-002" and store.epochs() == [2]
    assert store.load_epoch(store.latest()) == (b"weights2", {"epoch": 2})
    store.clear()
    assert CheckpointStore(f"s3://{bucket}/run", options).latest() is None
