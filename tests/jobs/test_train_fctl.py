"""FCtL's staged training (task fctl): the spec's stage rules, the plan's checks of the checkpoints each stage
starts from, what the trainees feed the networks, and the context then fused stages through real Ray Train runs.

The local stage is ``task: segmenter`` (nothing new): the ``segmenter`` fixture of the refiner tests stands in
for its output, a width-8 fpn_resnet10 trained for a few seconds on this dataset.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jobs.train import make_plan, train
from jobs.train.cli import add_train_parser
from jobs.train.common import normalizer
from jobs.train.spec import parse_train_spec
from jobs.train.tasks.fctl import context_trainee, fused_trainee
from models import ModelConfig, build_model
from models.checkpoint import load_checkpoint, read_info, save_checkpoint
from models.fctl_checkpoint import load_fctl, read_fctl_info, seeded_fctl
from pipeline.errors import OutputConflictError, SpecError
from pipeline.training.crops import CropConfig
from pipeline.training.crops_fctl import FctlSampler
from pipeline.training.datasets import TrainingDataset
from tests.jobs.test_train import CLASSES, dataset, fast_ray_train  # noqa: F401 - fixtures
from tests.jobs.test_train_refiner import CROP, one_thread, segmenter  # noqa: F401 - fixtures


def fctl_spec(ds_url: str, out_url: str, /, **fctl) -> dict:
    return {
        "task": "fctl",
        "fctl": fctl,
        "dataset": {"url": ds_url, "validation": {"names": ["s2"]}},
        "crops": {"size": CROP, "batches_per_epoch": 5, "batch_size": 4},
        "optimizer": {"name": "adamw", "lr": 0.005, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "epochs": 1,
        "workers": {"num_workers": 2, "use_gpu": False},
        "output": {"url": out_url},
    }


def problems(data: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse_train_spec(data)
    return "\n".join(err.value.problems)


def seeded_segmenter(path: Path, width: int = 8, classes=CLASSES, seed: int = 1, normalization=None) -> str:
    config = ModelConfig("fpn_resnet10", num_classes=len(classes), width=width)
    return save_checkpoint_at(path, config, classes, seed, normalization)


def save_checkpoint_at(path: Path, config: ModelConfig, classes=CLASSES, seed: int = 1, normalization=None) -> str:
    save_checkpoint(path, build_model(config, seed=seed), config, classes, normalization=normalization)
    return str(path)


# ---------------------------------------------------------------- spec and plan (no Ray)


def test_stage_rules_name_the_field():
    context = parse_train_spec(fctl_spec("ds", "out", stage="context", local="l", factor=2))
    assert (context.loss.name, context.loss.gamma) == ("focal", 3.0)  # the reference's loss, every stage
    assert parse_train_spec({**fctl_spec("ds", "out", stage="context", local="l", factor=2),
                             "loss": {"name": "ce"}}).loss.name == "ce"
    fused = parse_train_spec(fctl_spec("ds", "out", stage="fused", local="l", context_checkpoints=["a", "b"]))
    assert fused.fctl.contexts == [2.0, 4.0] and fused.fctl.key_channels is None

    text = problems(fctl_spec("ds", "out", stage="fused", local="l"))
    assert "fctl.context_checkpoints: required for stage fused" in text, text
    text = problems(fctl_spec("ds", "out", stage="fused", local="l", contexts=[2, 4], context_checkpoints=["a"]))
    assert "fctl.context_checkpoints: 1 checkpoint(s) for 2 context factor(s)" in text, text
    text = problems(fctl_spec("ds", "out", stage="fused", local="l", contexts=[4, 2], factor=2,
                              context_checkpoints=["a", "b"]))
    for expected in ("fctl.contexts: factors must be > 1 and increase", "fctl.factor: only read by stage context"):
        assert expected in text, text
    text = problems(fctl_spec("ds", "out", stage="context", local="l", contexts=[2], context_checkpoints=["a"]))
    for expected in ("fctl.factor: required for stage context", "fctl.contexts: only read by stage fused",
                     "fctl.context_checkpoints: only read by stage fused"):
        assert expected in text, text
    assert "fctl.stage: stage local is a plain segmenter: train it with task: segmenter and crops.scales: [1]" in (
        problems(fctl_spec("ds", "out", stage="local", local="l")))
    text = problems({**fctl_spec("ds", "out", stage="context", local="l", factor=2), "model": {"width": 8},
                     "crops": {"size": CROP, "scales": [1, 2]},
                     "dataset": {"url": "ds", "validation": {"scale": 2}}})
    for expected in ("model: not read when task is fctl", "crops: scales: not read when task is fctl",
                     "dataset: validation.scale: not read when task is fctl"):
        assert expected in text, text
    assert "fctl: required when task is fctl" in problems({**fctl_spec("ds", "out"), "fctl": None})
    assert "fctl: only read when task is fctl" in problems({**fctl_spec("ds", "out", stage="context", local="l",
                                                                        factor=2), "task": "segmenter"})


def test_plan_checks_the_checkpoints_each_stage_starts_from(tmp_path, dataset, segmenter):  # noqa: F811
    local_norm = load_checkpoint(Path(segmenter).read_bytes())[1].normalization.to_dict()
    plan = make_plan(parse_train_spec(fctl_spec(dataset, "out", stage="context", local=segmenter, factor=2)))
    assert plan.model.to_dict()["stage"] == "context" and plan.model.to_dict()["factor"] == 2.0 and plan.normalization == local_norm
    assert plan.model.to_dict()["config"]["width"] == 8 and len(plan.model.to_dict()["local_sha256"]) == 64

    good = [seeded_segmenter(tmp_path / f"c{i}.safetensors", seed=i, normalization=local_norm) for i in (2, 4)]
    plan = make_plan(parse_train_spec(fctl_spec(dataset, "out", stage="fused", local=segmenter,
                                                context_checkpoints=good)))
    assert plan.model.to_dict()["config"]["contexts"] == [2.0, 4.0] and len(plan.model.to_dict()["context_sha256"]) == 2

    wide = seeded_segmenter(tmp_path / "wide.safetensors", width=16, normalization=local_norm)
    other = seeded_segmenter(tmp_path / "other.safetensors", classes=["a", "b", "c"], normalization=local_norm)
    plain = seeded_segmenter(tmp_path / "plain.safetensors")  # ImageNet normalisation
    fctl = tmp_path / "fctl.safetensors"
    fctl.write_bytes(seeded_fctl("fpn_resnet10", 3, CLASSES, width=8))
    (tmp_path / "ctx" / "model.safetensors").parent.mkdir()
    shutil.copy(good[0], tmp_path / "ctx" / "model.safetensors")  # a run that trained ×4 contexts
    (tmp_path / "ctx" / "latest.json").write_text(json.dumps({"epoch": 1, "model": {
        "task": "fctl", "stage": "context", "factor": 4.0}}))
    cases = [
        (str(tmp_path / "none.safetensors"), "does not exist"),
        (wide, "width 16,.* cannot serve as a context encoder"),
        (other, r"predicts \['a', 'b', 'c'\]"),
        (plain, "was trained with normalisation"),
        (str(fctl), "is an FCtL checkpoint"),
        (str(tmp_path / "ctx" / "model.safetensors"), r"trained on ×4 contexts .* fctl.contexts\[0\] is 2"),
    ]
    for url, message in cases:
        with pytest.raises(SpecError) as err:
            make_plan(parse_train_spec(fctl_spec(dataset, "out", stage="fused", local=segmenter,
                                                 context_checkpoints=[url, good[1]])))
        assert len(err.value.problems) == 1, err.value.problems
        assert re.match(r"fctl\.context_checkpoints\[0\]: .*" + message, err.value.problems[0]), err.value.problems
    with pytest.raises(SpecError, match="fctl.local: .* is an FCtL checkpoint"):
        make_plan(parse_train_spec(fctl_spec(dataset, "out", stage="context", local=str(fctl), factor=2)))


@one_thread()
def test_trainees_feed_context_views_and_start_from_the_stage_checkpoints(tmp_path, dataset, segmenter):  # noqa: F811
    local, info = load_checkpoint(Path(segmenter).read_bytes())
    spec = parse_train_spec(fctl_spec(dataset, str(tmp_path / "o"), stage="context", local=segmenter, factor=4))
    plan = make_plan(spec)
    trainee = context_trainee(spec, plan, 0, "cpu", None)
    assert all(torch.equal(a, b) for a, b in zip(trainee.model.state_dict().values(), local.state_dict().values()))
    views, masks = next(trainee.batches(1, 1))
    ds = TrainingDataset(dataset)
    _, contexts, _, context_masks = next(FctlSampler(ds, plan.train_names, CropConfig(CROP, batch_size=4), (4.0,),
                                                     seed=spec.seed, context_targets=True).batches(1, 1))
    assert np.array_equal(views, contexts[:, 0]) and np.array_equal(masks, context_masks[:, 0])
    assert sum(1 for _ in trainee.validation(trainee.model.eval(), 0, 1)) == 1  # s2's 4 tiles, one batch

    ctx = [seeded_segmenter(tmp_path / f"c{i}.safetensors", seed=i, normalization=info.normalization.to_dict())
           for i in (2, 4)]
    spec = parse_train_spec(fctl_spec(dataset, "o", stage="fused", local=segmenter, context_checkpoints=ctx))
    trainee = fused_trainee(spec, make_plan(spec), 0, "cpu", None)
    model = trainee.model.train()
    for i, url in enumerate(ctx):
        enc = load_checkpoint(Path(url).read_bytes())[0].encoder.state_dict()
        assert all(torch.equal(v, model.context_encoders[i].state_dict()[k]) for k, v in enc.items())
    assert not any(p.requires_grad for p in model.context_encoders.parameters())
    assert not model.context_encoders.training and model.local.training
    batch = next(trainee.batches(1, 1))
    assert [a.shape for a in batch] == [(4, 3, CROP, CROP), (4, 2, 3, CROP, CROP), (4, CROP, CROP)]
    model.eval()
    with torch.no_grad():  # every γ starts at 0: the fresh FCtL is exactly its local segmenter
        logits, _ = trainee.forward(model, batch)
        assert torch.equal(logits, local(normalizer(info.normalization.to_dict(), "cpu")(batch[0])))


# ---------------------------------------------------------------- the stages through real Ray Train runs


@pytest.mark.integration
def test_context_then_fused_stages_train_and_resume(tmp_path, dataset, segmenter, ray_cluster,  # noqa: F811
                                                    fast_ray_train, capsys):  # noqa: F811
    """Stage context ×2 as `gigaseg train ctx2.yaml`, then stage fused with contexts [2, 4], run for 2 epochs
    and resumed for a third. The ×4 context checkpoint is a seeded segmenter of the local architecture and
    normalisation (the file a ×4 run writes is the ×2 run's kind): one Ray Train run fewer, ~20 s."""
    spec = fctl_spec(dataset, str(tmp_path / "ctx2"), stage="context", local=segmenter, factor=2)
    (tmp_path / "ctx2.yaml").write_text(yaml.safe_dump({**spec, "workers": {"num_workers": 1, "use_gpu": False}}))
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", str(tmp_path / "ctx2.yaml")])
    assert args.func(args) == 0, capsys.readouterr().err
    assert "trained epochs 1..1" in capsys.readouterr().out
    history = json.loads((tmp_path / "ctx2" / "history.json").read_text())
    assert 0.0 <= history["miou"][0] <= 1.0  # scored on s2's context views
    local_info = read_info(Path(segmenter).read_bytes())
    got = read_info((tmp_path / "ctx2" / "model.safetensors").read_bytes())  # a plain segmenter checkpoint
    assert (got.config, got.class_names, got.normalization) == (
        local_info.config, local_info.class_names, local_info.normalization)
    local = load_checkpoint(Path(segmenter).read_bytes())[0].state_dict()
    trained = load_checkpoint((tmp_path / "ctx2" / "model.safetensors").read_bytes())[0].state_dict()
    assert not all(torch.equal(trained[k], v) for k, v in local.items() if k.startswith("encoder."))
    stage2 = [str(tmp_path / "ctx2" / "model.safetensors"),
              seeded_segmenter(tmp_path / "ctx4.safetensors", seed=4, normalization=got.normalization.to_dict())]

    out = tmp_path / "fused"
    spec = fctl_spec(dataset, str(out), stage="fused", local=segmenter, contexts=[2, 4], context_checkpoints=stage2)
    first = train(parse_train_spec({**spec, "epochs": 2}), progress=False)
    assert (first.start_epoch, first.last_epoch) == (1, 2)
    result = train(parse_train_spec({**spec, "epochs": 3}), progress=False)  # resumes from epoch 2
    assert (result.start_epoch, result.last_epoch) == (3, 3) and result.history["epoch"] == [1, 2, 3]
    losses = result.history["train_loss"]
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(0.0 <= v <= 1.0 for v in result.history["miou"])

    data = (out / "model.safetensors").read_bytes()  # what `gigaseg run` loads with model.framework: fctl
    model, info, config = load_fctl(data)
    assert config.contexts == (2.0, 4.0) and info.class_names == tuple(CLASSES)
    assert info.normalization == local_info.normalization and info.config == local_info.config
    for i, url in enumerate(stage2):  # frozen through three epochs and a resume
        enc = load_checkpoint(Path(url).read_bytes())[0].encoder.state_dict()
        assert all(torch.equal(v, model.context_encoders[i].state_dict()[k]) for k, v in enc.items())
    assert not all(torch.equal(v, local[k]) for k, v in model.local.state_dict().items())  # the local part trained
    assert any(c.gamma.item() != 0.0 for c in model.correlations)
    assert read_fctl_info((out / "epoch-003" / "model.safetensors").read_bytes())[1] == config
    assert json.loads((out / "latest.json").read_text())["model"]["stage"] == "fused"

    retrained = seeded_segmenter(tmp_path / "retrained.safetensors", normalization=info.normalization.to_dict())
    swapped = {**spec, "fctl": {**spec["fctl"], "context_checkpoints": [retrained, stage2[1]]}, "epochs": 4}
    with pytest.raises(OutputConflictError, match="another model"):
        train(parse_train_spec(swapped), progress=False)


def test_fused_stage_with_a_pointrend_local_model(tmp_path, dataset, segmenter):  # noqa: F811
    """A PointRend local model (trained with ``model.refine: pointrend``): the fused FCtL keeps its point head,
    trains on coarse loss + point CE and, with every γ at 0, predicts exactly what the local PointRend does."""
    from models.pointrend import PointRendOutput

    _, info = load_checkpoint(Path(segmenter).read_bytes())
    norm = info.normalization.to_dict()
    local_config = ModelConfig("fpn_resnet10", num_classes=len(CLASSES), width=8, refine="pointrend",
                               point_channels=16, subdivision_points=256)
    local_url = save_checkpoint_at(tmp_path / "pr.safetensors", local_config, seed=3, normalization=norm)
    context = context_trainee(parse_train_spec(fctl_spec(dataset, "o", stage="context", local=local_url, factor=2)),
                              make_plan(parse_train_spec(fctl_spec(dataset, "o", stage="context", local=local_url,
                                                                   factor=2))), 0, "cpu", None)
    assert context.loss_terms is not None and context.model.train_points == 2048  # PointRend's training defaults
    ctx = [seeded_segmenter(tmp_path / f"c{i}.safetensors", seed=i, normalization=norm) for i in (2, 4)]
    spec = parse_train_spec(fctl_spec(dataset, "o", stage="fused", local=local_url, context_checkpoints=ctx))
    plan = make_plan(spec)
    assert plan.model.to_dict()["config"]["local"]["refine"] == "pointrend"
    trainee = fused_trainee(spec, plan, 0, "cpu", None)
    model = trainee.model
    batch = next(trainee.batches(1, 1))
    local, _ = load_checkpoint(Path(local_url).read_bytes())
    model.eval()
    with torch.no_grad():  # γ = 0: exactly the local PointRend, subdivision included
        logits, _ = trainee.forward(model, batch)
        assert torch.equal(logits, local(normalizer(norm, "cpu")(batch[0])))
    model.train()
    out, target = trainee.forward(model, batch)
    assert isinstance(out, PointRendOutput)
    terms = trainee.loss_terms(out, target)
    assert set(terms) == {"coarse_loss", "point_loss"}
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.local.point_head.parameters())
    assert all(p.grad is None for p in model.context_encoders.parameters())
