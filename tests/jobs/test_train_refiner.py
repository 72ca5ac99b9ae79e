"""MagNet refiner training: the spec, the pair builder's train/inference contract, and a real Ray Train run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train import make_plan, train
from jobs.train.common import normalizer
from jobs.train.spec import parse_train_spec
from jobs.train.tasks.magnet_refiner import refiner_inputs
from models import ModelConfig, build_model
from models.checkpoint import load_checkpoint, save_checkpoint
from models.errors import CheckpointError
from models.losses import LossConfig, build_loss
from models.magnet import load_refiner
from pipeline.errors import OutputConflictError, SpecError
from pipeline.reader import read_window, upsample2x_window
from pipeline.training.crops import CropConfig, CropSampler, augment, read_crop
from pipeline.training.crops_refiner import RefinerSampler, coarse_footprint, read_pairs, refiner_validation_draws
from pipeline.training.datasets import TrainingDataset
from tests.jobs.test_train import CLASSES, dataset, fast_ray_train  # noqa: F401 - fixtures

CROP = 64


@contextlib.contextmanager
def one_thread():
    """One torch thread: on a few shared cores, intra-op threads spin against each other (100× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def segmenter(dataset, tmp_path_factory) -> str:  # noqa: F811
    """A width-8 fpn_resnet10 trained for a few seconds (60 steps) on the dataset's crops at every level (1, 2, 4)."""
    ds = TrainingDataset(dataset)
    config = ModelConfig("fpn_resnet10", num_classes=len(CLASSES), width=8)
    model = build_model(config, seed=0).train()
    to_input = normalizer(ds.info.normalization, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sampler = CropSampler(ds, list(ds.info.images), CropConfig(CROP, (1.0, 2.0, 4.0), batch_size=4), seed=1)
    loss_fn = build_loss(LossConfig("ce", ds.info.ignore_index))
    with one_thread():
        for images, masks in sampler.batches(1, 60):
            loss = loss_fn(model(to_input(images)), torch.from_numpy(masks.astype(np.int64)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("seg") / "model.safetensors"
    save_checkpoint(path, model.eval(), config, CLASSES, normalization=ds.info.normalization)
    return str(path)


def refiner_spec(ds_url: str, seg_url: str, out_url: str, **extra) -> dict:
    return {
        "task": "magnet_refiner",
        "refiner": {"segmenter": seg_url, "width": 8, "scales": 3},
        "dataset": {"url": ds_url},
        "crops": {"size": CROP, "batches_per_epoch": 6, "batch_size": 4},
        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "epochs": 3,
        "workers": {"num_workers": 2, "use_gpu": False},
        "output": {"url": out_url},
        **extra,
    }


# ---------------------------------------------------------------- spec and plan (no Ray)


def test_refiner_spec_defaults_and_task_rules():
    spec = parse_train_spec(refiner_spec("ds", "seg", "out"))
    assert (spec.loss.name, spec.loss.threshold) == ("ohem", 0.7)  # MagNet's refiner loss by default
    assert parse_train_spec(refiner_spec("ds", "seg", "out", loss={"name": "ce"})).loss.name == "ce"
    assert parse_train_spec({"dataset": {"url": "d"}, "output": {"url": "o"}}).loss.name == "ce"
    with pytest.raises(SpecError) as err:
        parse_train_spec({**refiner_spec("ds", "seg", "out"), "refiner": None, "model": {"width": 8},
                          "crops": {"size": CROP, "scales": [1, 2]}})
    text = "\n".join(err.value.problems)
    for expected in ("refiner: required when task is magnet_refiner", "model: not read when task is magnet_refiner",
                     "crops: scales: not read"):
        assert expected in text, text
    with pytest.raises(SpecError, match="refiner: only read when task is magnet_refiner"):
        parse_train_spec({"dataset": {"url": "d"}, "output": {"url": "o"}, "refiner": {"segmenter": "s"}})


def test_refiner_plan_checks_the_segmenter(tmp_path, dataset, segmenter):  # noqa: F811
    plan = make_plan(parse_train_spec(refiner_spec(dataset, segmenter, "out")))
    assert plan.model.to_dict()["task"] == "magnet_refiner" and plan.model.to_dict()["num_classes"] == 3 and plan.model.to_dict()["residual"]
    assert len(plan.model.to_dict()["segmenter_sha256"]) == 64
    assert plan.normalization == load_checkpoint(Path(segmenter).read_bytes())[1].normalization.to_dict()
    other = ModelConfig("fpn_resnet10", num_classes=3, width=8)
    save_checkpoint(tmp_path / "other.safetensors", build_model(other), other, ["a", "b", "c"])
    for url, message in [(str(tmp_path / "other.safetensors"), "predicts \\['a', 'b', 'c'\\]"),
                         (str(tmp_path / "none.safetensors"), "does not exist")]:
        with pytest.raises(SpecError, match=f"refiner.segmenter: .*{message}"):
            make_plan(parse_train_spec(refiner_spec(dataset, url, "out")))


# ---------------------------------------------------------------- the pair builder's contract


def _coarse_up_expected(ds, seg, to_input, d) -> np.ndarray:
    """What the pipeline feeds the refiner: ``upsample2x_window`` of the segmenter's softmax on the coarse
    view (placed in a map of the whole coarse level), over the fine window."""
    shapes = ds.shapes(d.name)
    fine_shape, coarse_shape = shapes[d.level], shapes[d.level + 1]
    view = read_window(ds.image_level(d.name, d.level + 1), "cyx", coarse_shape, d.coarse)
    with torch.no_grad():
        probs = torch.softmax(seg(to_input(view[None])), 1)[0].numpy()
    whole = np.zeros((len(CLASSES), *coarse_shape), np.float32)
    inner = d.coarse.clip(*coarse_shape)
    whole[:, inner.y0 : inner.y1, inner.x0 : inner.x1] = probs[:, inner.y0 - d.coarse.y0 : inner.y1 - d.coarse.y0,
                                                               inner.x0 - d.coarse.x0 : inner.x1 - d.coarse.x0]
    fp = coarse_footprint(d.window, fine_shape, coarse_shape)
    assert inner.y0 <= fp.y0 and fp.y1 <= inner.y1 and inner.x0 <= fp.x0 and fp.x1 <= inner.x1
    return upsample2x_window(whole, coarse_shape, fine_shape, d.window)


@one_thread()
def test_pairs_feed_the_refiner_what_the_pipeline_feeds_it(dataset, segmenter):  # noqa: F811
    ds = TrainingDataset(dataset)
    seg, info = load_checkpoint(Path(segmenter).read_bytes())
    to_input = normalizer(info.normalization.to_dict(), "cpu")
    sampler = RefinerSampler(ds, ["s0", "s1", "s2"], CropConfig(CROP, batch_size=1), levels=[0, 1], seed=3)
    rng = np.random.default_rng(0)
    draws = [sampler.draw(rng) for _ in range(6)]
    # s2 at level 1 is 48×56: the fine crop reaches past the image and the coarse view (24×28) is all of level 2
    draws += refiner_validation_draws("s2", ds.shapes("s2"), CROP, [1])
    assert {d.level for d in draws} == {0, 1}
    plain = [dataclasses.replace(d, flip_y=False, flip_x=False, rot90=0) for d in draws]
    turned = [dataclasses.replace(d, flip_y=True, flip_x=i % 2 == 0, rot90=i % 4) for i, d in enumerate(draws)]

    fine, coarse_up, target = refiner_inputs(seg, read_pairs(ds, plain, CROP), to_input)
    b = len(draws)
    assert fine.shape == coarse_up.shape == (b, len(CLASSES), CROP, CROP) and target.shape == (b, CROP, CROP)
    assert torch.allclose(fine.sum(1), torch.ones(b, CROP, CROP)) and target.dtype == torch.int64
    aug_fine, aug_up, aug_target = refiner_inputs(seg, read_pairs(ds, turned, CROP), to_input)
    for i, (d, t) in enumerate(zip(plain, turned)):
        image, mask = read_crop(ds, d.name, d.level, d.window, CROP)
        assert np.array_equal(target[i].numpy(), mask)
        with torch.no_grad():
            assert torch.allclose(fine[i], torch.softmax(seg(to_input(image[None])), 1)[0], atol=1e-5)
        expected = _coarse_up_expected(ds, seg, to_input, d)
        np.testing.assert_allclose(coarse_up[i].numpy(), expected, atol=1e-5)
        # flips and rot90 move the crop, the mask and the upsampled coarse map together
        up_t, mask_t = augment(expected, mask, t.flip_y, t.flip_x, t.rot90)
        np.testing.assert_allclose(aug_up[i].numpy(), up_t, atol=1e-5)
        assert np.array_equal(aug_target[i].numpy(), mask_t)
        with torch.no_grad():
            image_t, _ = augment(image, mask, t.flip_y, t.flip_x, t.rot90)
            assert torch.allclose(aug_fine[i], torch.softmax(seg(to_input(image_t[None])), 1)[0], atol=1e-5)
    assert (target == 255).any()  # the crop past s2's edge is ignored there


# ---------------------------------------------------------------- a real Ray Train run


@pytest.mark.integration
def test_two_worker_refiner_run_lowers_the_ohem_loss(tmp_path, dataset, segmenter, ray_cluster,  # noqa: F811
                                                     fast_ray_train):  # noqa: F811
    out = tmp_path / "out"
    spec = refiner_spec(dataset, segmenter, str(out), epochs=2,
                        dataset={"url": dataset, "validation": {"names": ["s2"]}})
    spec["refiner"] = {**spec["refiner"], "residual": False}  # the reference's refiner, starting from noise
    first = train(parse_train_spec(spec), progress=False)
    assert (first.start_epoch, first.last_epoch) == (1, 2)
    result = train(parse_train_spec({**spec, "epochs": 3}), progress=False)  # resumes from epoch 2
    assert (result.start_epoch, result.last_epoch) == (3, 3) and result.history["epoch"] == [1, 2, 3]
    losses = result.history["train_loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(0.0 <= v <= 1.0 for v in result.history["miou"] + result.history["segmenter_miou"])
    assert result.model_url.endswith("refiner.safetensors")
    data = (out / "refiner.safetensors").read_bytes()
    refiner = load_refiner(data, len(CLASSES))  # what `gigaseg run` does with model.magnet.refiner
    assert refiner.num_classes == 3 and refiner.net[1].out_channels == 8 and not refiner.residual
    # precise BatchNorm (spec default): the input BN's statistics are those of probabilities (variance < 1/4),
    # not the start values (0, 1) that 18 steps at momentum 0.01 would still mostly hold (0.99^18 = 0.83)
    assert float(refiner.net[0].running_var.max()) < 0.25, refiner.net[0].running_var
    assert load_refiner((out / "epoch-003" / "refiner.safetensors").read_bytes(), 3) is not None
    with pytest.raises(CheckpointError, match="trained for 3 classes"):
        load_refiner(data, 4)
    assert json.loads((out / "latest.json").read_text())["model"]["task"] == "magnet_refiner"
    assert not (out / "model.safetensors").exists()


def test_residual_refiner_starts_from_the_segmenter_and_keeps_its_score(tmp_path, dataset, segmenter,  # noqa: F811
                                                                          ray_cluster, fast_ray_train):  # noqa: F811
    """The default refiner adds ``log O``, its last conv starting at zero: its first steps already predict what the
    segmenter does, so its first epoch's loss is below the plain refiner's (trained from noise) and its validation
    mIoU does not fall below the segmenter's."""
    spec = refiner_spec(dataset, segmenter, str(tmp_path / "res"), epochs=2,
                        dataset={"url": dataset, "validation": {"names": ["s2"]}})
    residual = train(parse_train_spec(spec), progress=False).history
    plain = train(parse_train_spec({**spec, "epochs": 1, "output": {"url": str(tmp_path / "plain")},
                                    "refiner": {**spec["refiner"], "residual": False}}), progress=False).history
    assert residual["train_loss"][0] < plain["train_loss"][0], (residual, plain)
    assert min(residual["miou"]) >= residual["segmenter_miou"][0] - 0.02, residual
    assert load_refiner((tmp_path / "res" / "refiner.safetensors").read_bytes(), len(CLASSES)).residual
    with pytest.raises(OutputConflictError, match="another model"):  # resuming it as a plain refiner is refused
        train(parse_train_spec({**spec, "epochs": 3, "refiner": {**spec["refiner"], "residual": False}}),
              progress=False)
