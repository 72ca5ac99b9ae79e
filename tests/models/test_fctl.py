"""Tests of models/fctl.py and models/fctl_checkpoint.py: blocks, model, config, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from models.checkpoint import load_checkpoint, seeded_checkpoint
from models.errors import CheckpointError
from models.fctl import Correlation, FCtL, FctlConfig, Fusion, build_fctl
from models.fctl_checkpoint import (
    is_fctl_checkpoint,
    load_fctl,
    save_fctl,
    seeded_fctl,
)
from models.magnet import seeded_refiner

WIDTH = 8
TILE = 64
NAMES = ("a", "b", "c")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these nets are tiny, and on a busy 2-core machine a second OpenMP thread
    spinning for a core slows the training test many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(name: str = "fpn_resnet10", contexts=(2.0, 4.0), num_classes: int = 3) -> FctlConfig:
    return FctlConfig(ModelConfig(name, num_classes, width=WIDTH), tuple(contexts))


def _inputs(n_ctx: int = 2, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, TILE, TILE, generator=g)
    return x, torch.randn(batch, n_ctx, 3, TILE, TILE, generator=g)


def _set_gamma(model: FCtL, value: float) -> None:
    with torch.no_grad():
        for corr in model.correlations:
            corr.gamma.fill_(value)


# --- blocks -------------------------------------------------------------------------------------


def test_correlation_is_softmax_attention_over_context_positions() -> None:
    torch.manual_seed(0)
    corr = Correlation(16, 2)
    with torch.no_grad():
        corr.gamma.fill_(0.7)
        for conv in (corr.query, corr.key):
            conv.weight.normal_()  # sharper than the N(0, 0.01) init: rows far from uniform
    x, ctx = torch.randn(2, 16, 4, 6), torch.randn(2, 16, 3, 5)  # context map of another size
    a = corr.attention(x, ctx)
    assert a.shape == (2, 4 * 6, 3 * 5) and a.dtype == torch.float32
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 24))
    assert a.max() > 0.5  # not uniform: the test would pass for any row-normalised constant

    q, k = corr.query(x).flatten(2), corr.key(ctx).flatten(2)
    expected_a = torch.softmax(torch.einsum("bkn,bkm->bnm", q, k), dim=-1)  # no 1/sqrt(k)
    torch.testing.assert_close(a, expected_a)
    v = corr.value(ctx).flatten(2)
    expected = 0.7 * torch.einsum("bcm,bnm->bcn", v, expected_a).reshape(2, 16, 4, 6)
    torch.testing.assert_close(corr(x, ctx), expected)


def test_correlation_starts_at_zero() -> None:
    corr = Correlation(16, 2)
    assert corr.gamma.item() == 0.0
    assert torch.count_nonzero(corr(torch.randn(1, 16, 3, 3), torch.randn(1, 16, 2, 2))) == 0


@pytest.mark.parametrize("branches", [2, 3])
def test_fusion_weights_sum_to_one(branches: int) -> None:
    torch.manual_seed(0)
    fusion = Fusion(8, branches)
    with torch.no_grad():
        for conv in fusion.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_()
    outs = [torch.randn(2, 8, 3, 4) for _ in range(branches)]
    w = fusion.weights(outs)
    assert w.shape == (branches, 2, 8, 3, 4)
    torch.testing.assert_close(w.sum(0), torch.ones(2, 8, 3, 4), atol=1e-6, rtol=0)
    assert (w > 0).all() and (w < 1).all() and w.std() > 0.01
    torch.testing.assert_close(fusion(outs), sum(wi * o for wi, o in zip(w, outs)))
    with pytest.raises(ValueError, match="branches"):
        fusion.weights(outs[:-1])


# --- the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["fpn_resnet10", "segnet_resnet10", "fcn_resnet10"]  # plain, uses_stem, emits_logits
)
def test_zero_gamma_equals_local_segmenter_exactly(name: str) -> None:
    model = build_fctl(_config(name), seed=0).eval()
    x, ctx = _inputs()
    with torch.no_grad():
        out = model(x, ctx)
        assert out.dtype == torch.float32 and out.shape == (2, 3, TILE, TILE)
        assert torch.equal(out, model.local(x))


def test_zero_gamma_aux_outputs_equal_local() -> None:
    model = build_fctl(_config("ocrnet_resnet10"), seed=0).eval()
    x, ctx = _inputs()
    with torch.no_grad():
        logits, aux = model(x, ctx, aux=True)
        ref_logits, ref_aux = model.local(x, aux=True)
    assert torch.equal(logits, ref_logits) and set(aux) == set(ref_aux) == {"soft_regions"}
    assert torch.equal(aux["soft_regions"], ref_aux["soft_regions"])


@pytest.mark.parametrize("n_ctx", [1, 2])
def test_contexts_matter_once_gamma_is_set(n_ctx: int) -> None:
    model = build_fctl(_config(contexts=(2.0, 4.0)[:n_ctx]), seed=0).eval()
    assert len(model.context_encoders) == n_ctx and len(model.correlations) == n_ctx + 1
    assert model.fusion.branches == n_ctx + 1
    _set_gamma(model, 50.0)
    x, ctx = _inputs(n_ctx)
    with torch.no_grad():
        base = model(x, ctx)
        assert base.shape == (2, 3, TILE, TILE)
        assert not torch.allclose(base, model.local(x))
        for i in range(n_ctx):  # each context (the large one included) changes the output
            other = ctx.clone()
            other[:, i] = torch.randn_like(other[:, i])
            assert not torch.allclose(model(x, other), base)


def test_wrong_contexts_shape_is_a_clear_error() -> None:
    model = build_fctl(_config(), seed=0).eval()
    x, ctx = _inputs(n_ctx=1)
    with pytest.raises(ValueError, match=r"expected \(2, 2, 3, 64, 64\)"):
        model(x, ctx)
    with pytest.raises(ValueError, match="1 or 2 contexts"):
        FCtL(build_model(ModelConfig("fpn_resnet10", 3, width=WIDTH)), num_contexts=3)


def test_channels_last_bf16_autocast() -> None:
    model = build_fctl(_config(), seed=0).eval()
    _set_gamma(model, 5.0)
    x, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, ctx)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.contiguous(memory_format=torch.channels_last), ctx)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_freeze_context_encoders_keeps_them_fixed() -> None:
    model = build_fctl(_config(), seed=0)
    _set_gamma(model, 1.0)
    model.freeze_context_encoders()
    model.train()
    assert not any(m.training for m in model.context_encoders.modules())
    assert model.local.training and model.fusion.training
    before = copy.deepcopy(model.context_encoders.state_dict())
    local_before = copy.deepcopy(model.local.encoder.state_dict())
    x, ctx = _inputs()
    model(x, ctx).square().mean().backward()

    assert all(p.grad is None for p in model.context_encoders.parameters())
    assert all(p.grad is not None for p in model.correlations.parameters())
    after = model.context_encoders.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    changed = model.local.encoder.state_dict()
    assert any(not torch.equal(local_before[k], changed[k]) for k in local_before if "running" in k)


def test_from_local_and_context_encoder_from() -> None:
    local = build_model(ModelConfig("fpn_resnet10", 3, width=WIDTH), seed=1).eval()
    model = FCtL.from_local(local)
    assert model.local is not local
    assert torch.equal(model.local.encoder.conv1.weight, local.encoder.conv1.weight)
    x, ctx = _inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(x, ctx), local(x))

    medium = build_model(ModelConfig("fpn_resnet10", 3, width=WIDTH), seed=2)
    model.context_encoder_from(medium, 0)
    assert torch.equal(model.context_encoders[0].conv1.weight, medium.encoder.conv1.weight)
    assert not torch.equal(model.context_encoders[1].conv1.weight, medium.encoder.conv1.weight)
    wider = build_model(ModelConfig("fpn_resnet10", 3, width=16), seed=2)
    with pytest.raises(ValueError, match="does not fit context encoder 1"):
        model.context_encoder_from(wider, 1)
    with pytest.raises(ValueError, match="out of range"):
        model.context_encoder_from(medium, 2)


def test_tiny_fctl_learns_from_its_contexts() -> None:
    """The tile is noise; its class is the sign of the context images' mean. Only the correlation
    can carry that, so the loss falls when γ learns and stays at chance when γ is held at 0."""

    def train(learn_gamma: bool) -> list[float]:
        torch.manual_seed(0)
        model = build_fctl(_config(num_classes=2), seed=0).train()
        for corr in model.correlations:
            corr.gamma.requires_grad_(learn_gamma)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(30):
            y = torch.randint(0, 2, (8,), generator=g)
            x = torch.randn(8, 3, TILE, TILE, generator=g)
            sign = (2 * y - 1).float().view(8, 1, 1, 1, 1)
            ctx = sign + 0.5 * torch.randn(8, 2, 3, TILE, TILE, generator=g)
            loss = F.cross_entropy(model(x, ctx), y.view(8, 1, 1).expand(8, TILE, TILE))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    losses = train(learn_gamma=True)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.4 * first, losses
    held = train(learn_gamma=False)
    assert sum(held[-5:]) / 5 > 0.5, held  # ln 2 = 0.69: chance


# --- config -------------------------------------------------------------------------------------


def test_config_roundtrip_and_defaults() -> None:
    config = FctlConfig(ModelConfig("fpn_resnet10", 3, width=WIDTH), [2, 3], key_channels=4)
    assert config.contexts == (2.0, 3.0)
    assert FctlConfig.from_dict(config.to_dict()) == config
    assert FctlConfig(ModelConfig("fpn_resnet10", 3)).contexts == (2.0, 4.0)


@pytest.mark.parametrize(
    ("contexts", "match"),
    [
        ((), "1 or 2 factors"),
        ((2.0, 3.0, 4.0), "1 or 2 factors"),
        ((1.0,), "must be a number > 1"),
        ((2.0, float("nan")), "must be a number > 1"),
        ((True,), "must be a number > 1"),
        ((4.0, 2.0), "must increase"),
        ((2.0, 2.0), "must increase"),
        ("24", "list of factors"),
    ],
)
def test_config_rejects_bad_contexts(contexts, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FctlConfig(ModelConfig("fpn_resnet10", 3), contexts)


def test_config_takes_a_pointrend_local_and_rejects_bad_keys_and_key_channels() -> None:
    refined = ModelConfig("fpn_resnet10", 3, refine="pointrend")
    assert FctlConfig.from_dict(FctlConfig(refined).to_dict()).local.refine == "pointrend"
    with pytest.raises(ValueError, match="key_channels"):
        FctlConfig(ModelConfig("fpn_resnet10", 3), key_channels=0)
    with pytest.raises(ValueError, match=r"unknown FctlConfig keys \['factors'\]"):
        FctlConfig.from_dict({"local": {"name": "fpn_resnet10", "num_classes": 3}, "factors": [2]})


# --- checkpoints --------------------------------------------------------------------------------


def test_save_load_roundtrip_gives_identical_outputs(tmp_path) -> None:
    config = _config("segnet_resnet10", contexts=(3.0,))
    model = build_fctl(config, seed=0)
    _set_gamma(model, 2.0)
    x, ctx = _inputs(n_ctx=1)
    model(x, ctx)  # a train-mode step moves the BN running stats away from their init
    model.eval()
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    data = save_fctl(tmp_path / "m.safetensors", model, config, NAMES, colors)
    assert (tmp_path / "m.safetensors").read_bytes() == data
    assert save_fctl(None, model, config, NAMES, colors) == data

    loaded, info, loaded_config = load_fctl(data)
    assert not loaded.training and loaded_config == config
    assert info.config == config.local and info.class_names == NAMES
    assert info.class_colors == tuple(colors)
    with torch.no_grad():
        assert torch.equal(loaded(x, ctx), model(x, ctx))


def test_seeded_fctl_is_deterministic_and_gamma_applies() -> None:
    a = seeded_fctl("fpn_resnet10", 3, NAMES, width=WIDTH, gamma=0.5)
    assert a == seeded_fctl("fpn_resnet10", 3, NAMES, width=WIDTH, gamma=0.5)
    assert a != seeded_fctl("fpn_resnet10", 3, NAMES, width=WIDTH, seed=1, gamma=0.5)
    model, _, config = load_fctl(a)
    assert config.contexts == (2.0, 4.0)
    assert all(c.gamma.item() == 0.5 for c in model.correlations)
    assert is_fctl_checkpoint(a)


def test_wrong_files_are_clear_checkpoint_errors() -> None:
    plain = seeded_checkpoint("fpn_resnet10", 3, NAMES, width=WIDTH)
    assert not is_fctl_checkpoint(plain) and not is_fctl_checkpoint(b"junk")
    with pytest.raises(CheckpointError, match="plain segmenter checkpoint.*load_checkpoint"):
        load_fctl(plain)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_fctl(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="no gigaseg metadata"):
        load_fctl(seeded_refiner(3, width=8))
    fctl = seeded_fctl("fpn_resnet10", 3, NAMES, width=WIDTH)
    with pytest.raises(CheckpointError, match="gigaseg-fctl-1"):
        load_checkpoint(fctl)


def test_save_with_the_wrong_config_is_refused() -> None:
    model = build_fctl(_config(), seed=0)
    with pytest.raises(CheckpointError, match="not the FCtL its config describes"):
        save_fctl(None, model, _config(contexts=(2.0,)), NAMES)


def test_pointrend_local_model_round_trips_and_equals_its_local_at_gamma_zero():
    from models.fctl_checkpoint import load_fctl, seeded_fctl
    from models.pointrend import PointRend, PointRendOutput

    data = seeded_fctl("fpn_resnet10", 3, ["a", "b", "c"], width=8, refine="pointrend")
    model, _, config = load_fctl(data)
    assert isinstance(model.local, PointRend) and config.local.refine == "pointrend"
    x, ctx = torch.randn(2, 3, 64, 64), torch.randn(2, 2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x, ctx), model.local(x))
    model.train()
    out = model(x, ctx)
    assert isinstance(out, PointRendOutput) and out.point_logits.shape[:2] == (2, 3)
