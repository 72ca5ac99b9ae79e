"""DUpsampling: PCA fit of the label reconstruction and training through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.heads.dupsampling as dup
from models import ModelConfig, build_model
from models.heads.dupsampling import compress_labels, fit_dupsampling, label_blocks

K = 3


def synthetic_masks(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, size, size) int64 labels in 0..K-1: a few random half-planes and discs per mask."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        angle, offset = torch.rand(2, generator=g) * torch.tensor([6.28, size])
        half = (x * angle.cos() + y * angle.sin() - offset) > 0
        cy, cx, r = torch.rand(3, generator=g) * torch.tensor([size, size, size / 3])
        disc = (y - cy) ** 2 + (x - cx) ** 2 < r**2
        masks[i] = torch.where(disc, 2, half.long())
    return masks


def _head(output_stride: int):
    config = ModelConfig("dupsampling_resnet10", K, width=8, output_stride=output_stride)
    return build_model(config, seed=0)


def test_label_blocks_use_pixel_shuffle_layout() -> None:
    masks = synthetic_masks(2, 16)
    blocks = label_blocks(masks, K, 8)  # (2 * 2 * 2, 8 * 8 * K)
    maps = blocks.reshape(2, 2, 2, -1).permute(0, 3, 1, 2)
    assert torch.equal(F.pixel_shuffle(maps, 8).argmax(1), masks)
    ignored = label_blocks(torch.full((1, 8, 8), 255), K, 8)
    assert not ignored.any()  # labels outside 0..K-1 (ignore labels) give all-zero blocks
    with pytest.raises(ValueError, match="multiples of the head's ratio 8"):
        label_blocks(torch.zeros(1, 12, 16, dtype=torch.long), K, 8)


@pytest.mark.parametrize(("output_stride", "exact_max"), [(8, 2048), (32, 2048), (8, 16)])
def test_pca_reconstruction_error_is_the_unexplained_variance(
    output_stride: int, exact_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # r = 8: more distinct blocks than dimensions (covariance eigensolver); r = 32: fewer (Gram
    # matrix); exact_max = 16 forces the randomised SVD.
    monkeypatch.setattr(dup, "_EXACT_MAX_DIM", exact_max)
    head = _head(output_stride).decoder
    masks = synthetic_masks(24, 64)
    explained = fit_dupsampling(head, masks, K)
    assert 0.8 < explained <= 1.0
    basis = head.basis.double()
    torch.testing.assert_close(basis.T @ basis, torch.eye(head.code_channels, dtype=torch.float64),
                               atol=1e-5, rtol=0)

    x = label_blocks(masks, K, head.ratio).double()
    mean = x.mean(0)
    codes = compress_labels(head, masks)  # (N, C~, H/r, W/r)
    with torch.no_grad():
        recon = head.reconstruct(codes)  # (N, K, H, W)
    recon_blocks = F.pixel_unshuffle(recon, head.ratio).permute(0, 2, 3, 1).reshape(x.shape)
    error = (recon_blocks.double() - x).square().sum(1).mean()
    total = (x - mean).square().sum(1).mean()
    # PCA: mean squared reconstruction error = (1 - explained variance ratio) x total variance.
    assert abs(error - (1 - explained) * total) <= 1e-4 * total
    assert (recon.argmax(1) == masks).float().mean() > 0.98


def test_pca_of_few_distinct_blocks_is_exact() -> None:
    head = _head(8).decoder
    # Each 8x8 block is one class: only K distinct blocks, rank K - 1 < C~.
    masks = torch.randint(0, K, (4, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert fit_dupsampling(head, masks, K) == pytest.approx(1.0)
    with torch.no_grad():
        recon = head.reconstruct(compress_labels(head, masks))
    torch.testing.assert_close(recon, F.one_hot(masks, K).permute(0, 3, 1, 2).float(),
                               atol=1e-5, rtol=0)


def test_fit_rejects_other_class_count() -> None:
    with pytest.raises(ValueError, match="num_classes=4"):
        fit_dupsampling(_head(32).decoder, synthetic_masks(1, 64), 4)


def test_tiny_model_trains_through_the_reconstruction() -> None:
    torch.manual_seed(0)
    model = _head(32)
    masks = synthetic_masks(4, 64, seed=1)
    fit_dupsampling(model.decoder, synthetic_masks(32, 64, seed=2), K)
    colours = torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 1.5]])
    images = colours[masks].permute(0, 3, 1, 2) + 0.3 * torch.randn(4, 3, 64, 64)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-2)
    temperature = model.decoder.log_temperature.item()
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(images), masks)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    assert model.decoder.log_temperature.item() != temperature  # the temperature learns
