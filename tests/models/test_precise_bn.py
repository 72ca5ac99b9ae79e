"""Precise BatchNorm statistics: the running statistics become the average over the given batches, layers
kept in eval mode are left alone, and MagNet's refiner then behaves in eval mode as in training."""

from __future__ import annotations

import torch
from torch import nn

from models.magnet import Refiner
from models.precise_bn import recalibrate_batchnorm


def run(m, x):
    return m(x)


def test_running_statistics_are_the_average_over_the_batches():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.01)
    frozen = nn.BatchNorm2d(3)
    net = nn.Sequential(bn, frozen).train()
    frozen.eval()
    frozen.running_mean.fill_(7.0)
    batches = [torch.randn(4, 3, 5, 5) * s + s for s in (1.0, 2.0, 3.0)]
    assert recalibrate_batchnorm(net, batches, run) == 3
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1) for b in batches])  # unbiased, as BN
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.momentum == 0.01 and bn.training  # restored
    assert torch.all(frozen.running_mean == 7.0)  # an eval-mode layer keeps its statistics


def test_no_batch_leaves_the_statistics_as_they_were():
    bn = nn.BatchNorm2d(2).train()
    bn.running_mean.fill_(0.5)
    assert recalibrate_batchnorm(bn, [], run) == 0
    assert torch.all(bn.running_mean == 0.5) and bn.momentum == 0.1


def test_refiner_in_eval_mode_matches_training_mode_after_recalibration():
    """The refiner (BN momentum 0.01, as MagNet's) after a few training-mode batches: its eval-mode output is
    far from what training saw; recalibrated on the same kind of input, the two agree."""
    torch.manual_seed(0)
    k = 4
    refiner = Refiner(k, width=16)

    def batch():
        fine = torch.softmax(3 * torch.randn(8, k, 32, 32), 1)
        coarse = torch.softmax(3 * torch.randn(8, k, 32, 32), 1)
        return fine, coarse

    data = [batch() for _ in range(8)]
    refiner.train()
    with torch.no_grad():
        for fine, coarse in data[:4]:  # 4 steps of running-average updates: the statistics stay near 0 / 1
            refiner(fine, coarse)
    fine, coarse = data[0]
    with torch.no_grad():
        want = refiner(fine, coarse).argmax(1)  # training mode: batch statistics
        stale = refiner.eval()(fine, coarse).argmax(1)
        refiner.train()
        assert recalibrate_batchnorm(refiner, data, lambda m, b: m(*b)) == 8
        precise = refiner.eval()(fine, coarse).argmax(1)
    agree = lambda a: (a == want).float().mean().item()  # noqa: E731
    assert agree(precise) > 0.9 > agree(stale) + 0.2, (agree(precise), agree(stale))
