"""Losses: the ignore index, OHEM's choice of pixels, focal = CE at γ = 0, the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.losses import LOSSES, CrossEntropyLoss, FocalLoss, LossConfig, OhemCrossEntropyLoss, build_loss


def batch(seed=0, b=2, k=4, h=6, w=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g, requires_grad=True)
    target = torch.randint(0, k, (b, h, w), generator=g)
    return logits, target


def test_ce_ignores_pixels_and_matches_torch():
    logits, target = batch()
    target[0, :2] = 255
    loss = CrossEntropyLoss(ignore_index=255)(logits, target)
    valid = target != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[0, :, :2].abs().sum() == 0  # ignored pixels get no gradient
    assert logits.grad[0, :, 2:].abs().sum() > 0


def test_all_ignored_is_zero_and_backpropagates():
    logits, target = batch()
    target[:] = 255
    for name in LOSSES:
        loss = build_loss({"name": name})(logits, target)
        assert loss.item() == 0.0
        loss.backward()  # no error, zero gradient


def test_ohem_keeps_only_hard_pixels():
    # 2 classes, 1 × 1 × 4 pixels, all of class 0: p_true = sigmoid(margin)
    margins = torch.tensor([4.0, 3.0, -1.0, 0.0])  # p_true ≈ 0.98, 0.95, 0.27, 0.5
    logits = torch.stack([margins, torch.zeros(4)]).view(1, 2, 1, 4).requires_grad_()
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    loss = OhemCrossEntropyLoss(threshold=0.7, min_kept=1)(logits, target)
    per_pixel = F.cross_entropy(logits, target, reduction="none").view(-1)
    torch.testing.assert_close(loss, per_pixel[2:].mean())  # only the two unsure pixels
    loss.backward()
    assert logits.grad[..., :2].abs().sum() == 0 and logits.grad[..., 2:].abs().sum() > 0


def test_ohem_min_kept_takes_the_hardest_when_all_are_easy():
    margins = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0])  # all p_true > 0.85
    logits = torch.stack([margins, torch.zeros(5)]).view(1, 2, 1, 5)
    target = torch.zeros(1, 1, 5, dtype=torch.long)
    per_pixel = F.cross_entropy(logits, target, reduction="none").view(-1)
    loss = OhemCrossEntropyLoss(threshold=0.7, min_kept=2)(logits, target)
    torch.testing.assert_close(loss, per_pixel[3:].mean())  # the 2 least sure pixels
    # min_kept past the pixel count: t = the largest p_true, so every pixel but the surest counts
    torch.testing.assert_close(OhemCrossEntropyLoss(min_kept=100)(logits, target), per_pixel[1:].mean())


def test_focal_is_ce_at_gamma_zero_and_smaller_above():
    logits, target = batch(1)
    target[1, 0] = 255
    ce = CrossEntropyLoss()(logits, target)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), ce)
    assert FocalLoss(gamma=3.0)(logits, target) < ce


def test_build_loss_registry_and_errors():
    assert isinstance(build_loss(LossConfig("ohem", ignore_index=7, min_kept=5)), OhemCrossEntropyLoss)
    focal = build_loss({"name": "focal", "gamma": 2.0, "ignore_index": 9})
    assert isinstance(focal, FocalLoss) and focal.gamma == 2.0 and focal.ignore_index == 9
    with pytest.raises(ValueError, match="unknown loss 'dice'; valid names: ce, focal, ohem"):
        build_loss({"name": "dice"})
    with pytest.raises(ValueError, match=r"unknown LossConfig keys \['gama'\]"):
        build_loss({"name": "focal", "gama": 2})
    with pytest.raises(ValueError, match="threshold"):
        build_loss({"name": "ohem", "threshold": 1.5})


def test_class_weighted_ce_matches_torch_weighted_mean():
    logits, target = batch(seed=2)
    target[1, :3] = 255
    weight = [0.5, 2.0, 1.0, 4.0]
    loss = CrossEntropyLoss(ignore_index=255, weight=weight)(logits, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weight), ignore_index=255)
    torch.testing.assert_close(loss, expected)
    # focal at γ = 0 is the same weighted CE; unit weights change nothing
    torch.testing.assert_close(FocalLoss(gamma=0.0, weight=weight)(logits, target), expected)
    torch.testing.assert_close(CrossEntropyLoss(weight=[1.0] * 4)(logits, target), CrossEntropyLoss()(logits, target))


def test_a_zero_weight_class_gets_no_gradient():
    logits, target = batch(seed=3, k=3)
    loss = build_loss(LossConfig("ohem", min_kept=10**6, weight=(1.0, 0.0, 1.0)))(logits, target)
    loss.backward()
    of_class_1 = (target == 1).unsqueeze(1).expand_as(logits)
    assert logits.grad[of_class_1].abs().sum() == 0 and logits.grad[~of_class_1].abs().sum() > 0


def test_ohem_picks_pixels_unweighted_then_averages_weighted():
    # 2 classes; pixels 0, 1 of class 0 (sure, unsure), 2, 3 of class 1 (sure, unsure)
    margins = torch.tensor([4.0, -1.0, -4.0, 1.0])  # p_true ≈ 0.98, 0.27, 0.98, 0.27
    logits = torch.stack([margins, torch.zeros(4)]).view(1, 2, 1, 4)
    target = torch.tensor([0, 0, 1, 1]).view(1, 1, 4)
    per_pixel = F.cross_entropy(logits, target, reduction="none").view(-1)
    loss = OhemCrossEntropyLoss(threshold=0.7, min_kept=1, weight=[1.0, 3.0])(logits, target)
    torch.testing.assert_close(loss, (per_pixel[1] + 3 * per_pixel[3]) / 4)


def test_median_frequency_weights():
    from models.losses import median_frequency_weights

    # shares 0.1, 0.2, 0.3, 0.4 → median 0.25; a class with no pixel gets 1
    assert median_frequency_weights([10, 20, 30, 40, 0]) == pytest.approx([2.5, 1.25, 0.25 / 0.3, 0.625, 1.0])
    with pytest.raises(ValueError, match="pixel counts"):
        median_frequency_weights([0, 0])
    with pytest.raises(ValueError, match="one weight per class"):
        CrossEntropyLoss(weight=[1.0, 1.0])(*batch(k=4))
