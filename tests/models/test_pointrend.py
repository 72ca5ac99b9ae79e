"""Unit tests for models/pointrend.py: point functions, subdivision, training, config and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from models.checkpoint import load_checkpoint, save_checkpoint
from models.pointrend import (
    PointHead,
    PointRend,
    PointRendOutput,
    point_ce,
    point_rend_loss,
    point_sample,
    sample_training_points,
    uncertain_grid_points,
    uncertainty,
)

WIDTH = 8


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these nets are tiny, and on a busy 2-core machine a second OpenMP thread
    spinning for a core makes the training test ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(name: str = "fpn_resnet10", num_classes: int = 3, **kw) -> ModelConfig:
    kw = {"refine": "pointrend", "point_channels": 16} | kw
    return ModelConfig(name, num_classes, width=WIDTH, **kw)


def _bilinear_border(f: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """f (C, H, W) at normalised (x, y): pixel centres at (j + 0.5)/W, clamped to the border."""
    _, h, w = f.shape
    px = min(max(x * w - 0.5, 0.0), w - 1.0)
    py = min(max(y * h - 0.5, 0.0), h - 1.0)
    x0, y0 = int(math.floor(px)), int(math.floor(py))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = px - x0, py - y0
    top = f[:, y0, x0] * (1 - ax) + f[:, y0, x1] * ax
    bottom = f[:, y1, x0] * (1 - ax) + f[:, y1, x1] * ax
    return top * (1 - ay) + bottom * ay


def test_point_sample_matches_manual_bilinear() -> None:
    f = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    pts = [(0.5, 0.5), (0.0, 0.0), (1.0, 1.0), (0.9, 0.1), (0.3, 0.77), (0.125, 1 / 6)]
    points = torch.tensor([pts, pts[::-1]])
    out = point_sample(f, points)
    assert out.shape == (2, 2, len(pts)) and out.dtype == torch.float32
    for b in range(2):
        for n, (x, y) in enumerate(points[b].tolist()):
            torch.testing.assert_close(out[b, :, n], _bilinear_border(f[b], x, y))
    # a cell centre reads the cell exactly; nearest reads the cell that contains the point
    torch.testing.assert_close(point_sample(f[:1], torch.tensor([[[0.125, 1 / 6]]]))[0, :, 0], f[0, :, 0, 0])
    ids = torch.arange(12.0).view(1, 1, 3, 4)
    near = point_sample(ids, torch.tensor([[[0.3, 0.1], [0.99, 0.99], [0.01, 0.5]]]), mode="nearest")
    assert near.flatten().tolist() == [1.0, 11.0, 4.0]


def test_uncertainty_is_minus_the_top_two_gap() -> None:
    logits = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-3.0, 5.0]]])  # (1, K=3, N=2)
    assert uncertainty(logits).tolist() == [[-1.0, -5.0]]


def _x_uncertain_logits(b: int = 2, h: int = 16, w: int = 32, at: float = 0.3) -> torch.Tensor:
    """(B, 2, H, W) with uncertainty -|x - at| at every interior point (linear in x: bilinear-exact)."""
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    l0 = (x - at).expand(b, h, w)
    return torch.stack([l0, torch.zeros_like(l0)], dim=1)


@pytest.mark.parametrize(("n", "k", "beta"), [(64, 3.0, 0.75), (40, 2.0, 0.5), (20, 3.0, 0.0)])
def test_training_points_respect_oversample_and_importance(n: int, k: float, beta: float) -> None:
    logits = _x_uncertain_logits()
    points = sample_training_points(logits, n, k, beta, torch.Generator().manual_seed(5))
    assert points.shape == (2, n, 2)
    # replay the generator: k*N candidates first, then the uniform fill
    g = torch.Generator().manual_seed(5)
    candidates = torch.rand(2, int(k * n), 2, generator=g)
    fill = torch.rand(2, n - int(beta * n), 2, generator=g)
    u = int(beta * n)
    assert torch.equal(points[:, u:], fill), "the rest are the uniform fill"
    # the first beta*N are the candidates closest to x = 0.3 (the known uncertainty), most uncertain first
    order = (candidates[..., 0] - 0.3).abs().argsort(dim=1)[:, :u]
    assert torch.equal(points[:, :u], candidates.gather(1, order.unsqueeze(2).expand(-1, -1, 2)))


def test_training_points_reject_impossible_ratios() -> None:
    with pytest.raises(ValueError, match="importance"):
        sample_training_points(_x_uncertain_logits(), 10, oversample=0.5, importance=0.75)


def test_uncertain_grid_points_are_the_most_uncertain_cells() -> None:
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    indices, points = uncertain_grid_points(logits, 7)
    assert indices.shape == (2, 7) and points.shape == (2, 7, 2)
    top = logits.sort(dim=1, descending=True).values
    gap = (top[:, 0] - top[:, 1]).flatten(1)  # (B, 20): smallest gap = most uncertain
    assert torch.equal(indices, gap.argsort(dim=1)[:, :7])
    i, j = indices // 5, indices % 5
    torch.testing.assert_close(points, torch.stack([(j + 0.5) / 5, (i + 0.5) / 4], dim=2))
    # the cell centres read back the cells themselves
    picked = point_sample(logits, points)
    assert torch.equal(picked, logits.flatten(2).gather(2, indices.unsqueeze(1).expand(-1, 3, -1)))
    assert uncertain_grid_points(logits, 100)[0].shape == (2, 20), "capped at the grid size"


def test_point_head_concatenates_coarse_before_every_layer() -> None:
    head = PointHead(in_channels=8, num_classes=3, channels=16)
    assert [c.in_channels for c in head.layers] == [8 + 3, 16 + 3, 16 + 3]
    assert [c.out_channels for c in head.layers] == [16, 16, 16]
    assert (head.predictor.in_channels, head.predictor.out_channels) == (16 + 3, 3)
    assert head(torch.randn(2, 8, 5), torch.randn(2, 3, 5)).shape == (2, 3, 5)


def test_subdivision_reaches_full_resolution_changing_n_cells_per_step() -> None:
    model = build_model(_config(subdivision_points=100), seed=0).eval()
    assert model.subdivision_steps == 2 and model.stride == 4  # default: log2(stride 4)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        coarse, features = model.forward_coarse(x)
        assert coarse.shape == (2, 3, 16, 16)
        logits = coarse
        for size in (32, 64):
            up = F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)
            logits, indices = model.subdivision_step(logits, coarse, features)
            assert logits.shape == (2, 3, size, size) and logits.dtype == torch.float32
            changed = (logits != up).any(dim=1).flatten(1)  # (B, size²)
            for b in range(2):
                refined = set(indices[b].tolist())
                assert len(refined) == 100
                # only refined cells change; a border cell refined twice at the same clamped
                # feature point may get back the value it already had
                assert set(changed[b].nonzero().flatten().tolist()) <= refined
                assert changed[b].sum() >= 95
        assert torch.equal(model(x), logits), "forward = the steps, ending at the input size"


def test_fewer_steps_upsample_the_rest_and_more_are_an_error() -> None:
    model = build_model(_config(subdivision_steps=1), seed=0).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match=r"subdivision_steps=3.*stride 4.*0\.\.2"):
        build_model(_config(subdivision_steps=3))


def test_eval_logits_are_float32_under_bf16_autocast() -> None:
    model = build_model(_config(subdivision_points=64), seed=0).eval()
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 64, 64)
    assert model.input_multiple == model.segmenter.input_multiple == 32


def thin_structures(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, size, size) and 2-class masks (n, size, size): three 2-px lines each, noisy."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(3):
            cx, cy = (torch.rand(2, generator=g) * size).tolist()
            theta = float(torch.rand(1, generator=g)) * math.pi
            dist = (xx - cx) * math.sin(theta) - (yy - cy) * math.cos(theta)
            masks[i][dist.abs() < 1.0] = 1
    images = masks[:, None].float().expand(-1, 3, -1, -1) * 2 - 1
    return images + 0.3 * torch.randn(images.shape, generator=g), masks


def test_point_head_learns_thin_structures() -> None:
    images, masks = thin_structures(8)
    model = build_model(_config(num_classes=2), seed=0).train()
    model.train_points = 256
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(30):
        out = model.forward_train(images, generator=g)
        assert out.point_logits.shape == (8, 2, 256) and out.coarse.shape == (8, 2, 16, 16)
        loss = point_rend_loss(out, masks, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(point_ce(out, masks, 255).item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert first == pytest.approx(math.log(2), abs=0.05), "an untrained point head has no opinion"
    assert last < 0.8 * first, f"point loss did not fall: {history}"


def test_training_forward_and_all_ignored_loss() -> None:
    model = build_model(_config(), seed=0).train()
    model.train_points = 32
    out = model(torch.randn(2, 3, 64, 64))
    assert out.points.shape == (2, 32, 2) and out.point_logits.shape == (2, 3, 32)
    loss = point_rend_loss(out, torch.full((2, 64, 64), 255), ignore_index=255)
    assert loss.item() == 0.0
    loss.backward()  # still tied to the graph
    assert model.point_head.predictor.weight.grad is not None


def test_checkpoint_round_trip_gives_identical_outputs() -> None:
    config = _config(subdivision_points=200)
    model = build_model(config, seed=3).train()
    with torch.no_grad():  # move the BN running stats away from their init
        model(torch.randn(2, 3, 64, 64) * 2 + 1)
    model.eval()
    loaded, info = load_checkpoint(save_checkpoint(None, model, config, ["a", "b", "c"]))
    assert isinstance(loaded, PointRend) and not loaded.training
    assert info.config == config and info.config.refine == "pointrend"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_config_round_trip_and_plain_configs_unchanged() -> None:
    config = _config(subdivision_steps=1, subdivision_points=512)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["refine"] == "pointrend"
    plain = ModelConfig("fpn_resnet10", 3, width=WIDTH)
    assert set(plain.to_dict()) == {"name", "num_classes", "in_channels", "width", "output_stride"}
    assert ModelConfig.from_dict(plain.to_dict()) == plain
    # the wrapped segmenter is initialised exactly as the plain model from the same seed
    a = build_model(config, seed=4).segmenter.state_dict()
    b = build_model(plain, seed=4).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("name", "head"), [("fcn_resnet10", "FCNHead"), ("dupsampling_resnet10", "DUpsamplingHead")]
)
def test_bases_without_fine_features_are_an_error_naming_the_head(name: str, head: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}.*{head}.*emits class logits"):
        _config(name)
    with pytest.raises(ValueError, match=rf"{head} emits class logits"):
        PointRend(build_model(ModelConfig(name, 3, width=WIDTH)))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"refine": "pointrnd"}, "unknown refine 'pointrnd'.*pointrend"),
        ({"refine": None, "point_channels": 16}, "point_channels is a refiner option"),
        ({"point_channels": 4}, "point_channels"),
        ({"subdivision_points": 0}, "subdivision_points"),
        ({"subdivision_steps": -1}, "subdivision_steps"),
        ({"num_classes": 1}, "num_classes=1"),
    ],
)
def test_config_rejects_bad_refine_options(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_point_ce_with_class_weights_is_torch_weighted_ce_at_the_points():
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    target[0, :2] = 255
    points = torch.rand(2, 20, 2, generator=g)
    out = PointRendOutput(torch.zeros(2, 3, 2, 2), torch.randn(2, 3, 20, generator=g), points)
    weight = torch.tensor([1.0, 0.5, 3.0])
    labels = point_sample(target.unsqueeze(1).float(), points, mode="nearest").squeeze(1).long()
    expected = F.cross_entropy(out.point_logits, labels, weight=weight, ignore_index=255)
    torch.testing.assert_close(point_ce(out, target, 255, weight), expected)
    torch.testing.assert_close(point_ce(out, target, 255), F.cross_entropy(out.point_logits, labels, ignore_index=255))
