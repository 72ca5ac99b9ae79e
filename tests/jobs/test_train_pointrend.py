"""PointRend through ``gigaseg train`` (task segmenter, ``model.refine: pointrend``): the spec's checks, the loss
terms, starting from a trained plain segmenter, and a real Ray Train run whose checkpoint ``gigaseg run`` loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jobs.train import make_plan, train
from jobs.train.cli import add_train_parser
from jobs.train.spec import parse_train_spec
from jobs.train.tasks.segmenter import pointrend_loss_terms
from jobs.train.tasks.segmenter import trainee as segmenter_trainee
from models import ModelConfig, build_model
from models.checkpoint import load_checkpoint, read_info, save_checkpoint
from models.losses import LossConfig, build_loss
from models.pointrend import PointRend, point_rend_loss
from pipeline.errors import SpecError
from pipeline.workers.predictor import PredictorConfig, TilePredictor
from tests.jobs.test_train import CLASSES, dataset, fast_ray_train, spec_dict  # noqa: F401 - fixtures
from tests.jobs.test_train_refiner import one_thread

CROP = 64
# A narrow point head and few points: the run is about the plumbing, on 2 shared cores.
POINTREND = {"name": "fpn_resnet10", "width": 8, "refine": "pointrend", "point_channels": 16, "train_points": 256}


def pointrend_spec(ds_url: str, out_url: str, **sections) -> dict:
    return spec_dict(ds_url, out_url, **{"model": POINTREND, "crops": {"size": CROP, "scales": [1]}, **sections})


def problems(data: dict, plan: bool = False) -> list[str]:
    with pytest.raises(SpecError) as err:
        spec = parse_train_spec(data)
        if plan:
            make_plan(spec)
    return err.value.problems


# ---------------------------------------------------------------- spec, loss, init (no Ray)


def test_spec_errors_name_the_field(dataset):  # noqa: F811
    plan = make_plan(parse_train_spec(pointrend_spec(dataset, "out")))
    assert plan.model.to_dict()["refine"] == "pointrend" and plan.model.to_dict()["point_channels"] == 16
    assert "train_points" not in plan.model.to_dict()  # training only: not part of the checkpoint's config

    def model(**fields):
        return pointrend_spec(dataset, "out", model={**POINTREND, **fields})

    (p,) = problems(model(name="fcn_resnet18"))
    assert p.startswith("model.refine: ") and "'fcn', which emits class logits" in p and "fpn_resnet18" in p
    (p,) = problems(model(oversample_ratio=0.5))
    assert p.startswith("model.oversample_ratio: ") and "greater than or equal to 1" in p
    (p,) = problems(model(importance_ratio=1.5))
    assert p.startswith("model.importance_ratio: ")
    plain = {k: v for k, v in POINTREND.items() if k != "refine"}
    found = problems(pointrend_spec(dataset, "out", model=plain))
    assert sorted(p.split(":")[0] for p in found) == ["model.point_channels", "model.train_points"], found
    assert all("only read with model.refine: pointrend" in p for p in found)
    (p,) = problems(model(subdivision_steps=3), plan=True)  # FPN's stride 4: two ×2 steps reach the input
    assert p.startswith("model.subdivision_steps: ") and "Use 0..2" in p


@one_thread()
def test_loss_terms_are_point_rend_loss_with_the_chosen_coarse_loss():
    torch.manual_seed(0)
    config = ModelConfig("fpn_resnet10", 3, width=8, refine="pointrend", point_channels=16)
    model = build_model(config, seed=0).train()
    target = torch.randint(0, 3, (2, CROP, CROP))
    target[0, :8] = 255
    out = model(torch.randn(2, 3, CROP, CROP))
    terms = pointrend_loss_terms(build_loss(LossConfig("ce", 255)), 255)(out, target)
    assert sorted(terms) == ["coarse_loss", "point_loss"]
    assert sum(terms.values()).item() == pytest.approx(point_rend_loss(out, target, 255).item(), rel=1e-5)
    focal = pointrend_loss_terms(build_loss(LossConfig("focal", 255, gamma=3.0)), 255)(out, target)
    assert focal["point_loss"].item() == terms["point_loss"].item()  # points: always CE
    assert focal["coarse_loss"].item() < terms["coarse_loss"].item()  # (1 − p)^3 down-weights every pixel
    ignored = pointrend_loss_terms(build_loss(LossConfig("ce", 255)), 255)(out, torch.full_like(target, 255))
    loss = sum(ignored.values())
    assert loss.item() == 0.0
    loss.backward()  # still tied to the graph (DDP needs every gradient)


@one_thread()
def test_init_from_a_plain_segmenter_seeds_the_segmenter_part(tmp_path, dataset):  # noqa: F811
    plain = ModelConfig("fpn_resnet10", 3, width=8)
    trained = build_model(plain, seed=7)
    ckpt = tmp_path / "segmenter.safetensors"
    save_checkpoint(ckpt, trained.eval(), plain, CLASSES)
    spec = parse_train_spec(pointrend_spec(dataset, "out", model={**POINTREND, "init": str(ckpt),
                                                                  "oversample_ratio": 2, "importance_ratio": 0.5}))
    trainee = segmenter_trainee(spec, make_plan(spec), 0, "cpu", None)
    model = trainee.model
    assert isinstance(model, PointRend)
    assert (model.train_points, model.oversample, model.importance) == (256, 2.0, 0.5)
    seg = trained.state_dict()
    assert all(torch.equal(v, seg[k]) for k, v in model.segmenter.state_dict().items())
    fresh = build_model(make_plan(spec).model.config, seed=spec.seed)
    assert all(torch.equal(v, fresh.point_head.state_dict()[k]) for k, v in model.point_head.state_dict().items())

    # a spec whose architecture is not the checkpoint's is refused before training, naming model.init
    (p,) = problems(pointrend_spec(dataset, "out", model={**POINTREND, "width": 16, "init": str(ckpt)}), plan=True)
    assert p.startswith("model.init: ") and "width 16" in p


# ---------------------------------------------------------------- a real Ray Train run


@pytest.mark.integration
def test_gigaseg_train_pointrend_runs_resumes_and_loads_in_the_predictor(tmp_path, dataset, ray_cluster,  # noqa: F811
                                                                         fast_ray_train, capsys):  # noqa: F811
    """`gigaseg train` for 2 epochs on 2 workers, resumed for a third; its model.safetensors predicts in
    ``TilePredictor`` as a `gigaseg run` worker loads it."""
    out = tmp_path / "out"
    spec = pointrend_spec(dataset, str(out), epochs=2, dataset={"url": dataset, "validation": {"names": ["s2"]}})
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(spec))
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", str(tmp_path / "train.yaml")])
    assert args.func(args) == 0, capsys.readouterr().err
    assert "trained epochs 1..2" in capsys.readouterr().out
    result = train(parse_train_spec({**spec, "epochs": 3}), progress=False)  # resumes from epoch 2
    assert (result.start_epoch, result.last_epoch) == (3, 3) and result.history["epoch"] == [1, 2, 3]
    h = result.history
    assert h["train_point_loss"][-1] < h["train_point_loss"][0], h["train_point_loss"]
    assert h["train_loss"][-1] < h["train_loss"][0], h["train_loss"]
    assert h["train_loss"] == pytest.approx([a + b for a, b in zip(h["train_coarse_loss"], h["train_point_loss"])])
    assert all(0.0 <= v <= 1.0 for v in h["miou"])  # the subdivision inference, scored on s2
    assert json.loads((out / "latest.json").read_text())["model"]["refine"] == "pointrend"

    data = (out / "model.safetensors").read_bytes()
    info = read_info(data)
    assert info.config.refine == "pointrend" and info.config.point_channels == 16
    assert info.class_names == tuple(CLASSES)
    model, _ = load_checkpoint(data)
    fresh = build_model(info.config, seed=0)
    assert not torch.equal(model.point_head.predictor.weight, fresh.point_head.predictor.weight)  # it trained
    predictor = TilePredictor(data, PredictorConfig(precision="fp32"), device="cpu")
    tiles = np.random.default_rng(0).integers(0, 256, (2, 3, CROP, CROP), dtype=np.uint8)
    probs = predictor(tiles)
    assert probs.shape == (2, len(CLASSES), CROP, CROP)
    assert np.allclose(probs.astype(np.float32).sum(1), 1.0, atol=1e-2)
    assert Path(out / "curves.png").read_bytes()[:4] == b"\x89PNG"
