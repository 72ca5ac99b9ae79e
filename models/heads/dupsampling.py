"""DUpsampling head (Tian et al. 2019): data-dependent upsampling by linear label reconstruction.

The head predicts, at the encoder's output stride r, a C~-channel code z per position; a fixed
linear map W (plus a mean b) reconstructs from it the r x r x K block of class scores that position
covers: block = W z + b, laid out as F.pixel_shuffle expects ((K, r, r) flattened, K = classes).
Logits are the blocks divided by a learnable temperature T (softmax(block / T): the reconstructed
scores live near the 0/1 of one-hot labels, and T lets the softmax become confident).

W comes from the labels, not from gradient descent: ``fit_dupsampling`` runs PCA on the training
label masks cut into r x r one-hot blocks (vectors of r*r*K zeros and ones), centred on their mean
b, and keeps the C~ leading principal directions; it returns the fraction of the blocks' variance
they explain. W and b are buffers (saved in checkpoints, not trained); fit them before training,
and again after changing the class count (they are then freshly random). Until fitted, W is a
random orthonormal basis.

Features: the encoder's stride-8 map is average-pooled to the last map's grid and concatenated with
it (the paper's fusion of low-level features at the coarse resolution), then conv3x3-BN-ReLU and a
1x1 conv to C~ = 64 codes. Logits come out at stride 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.base import ConvBNReLU, EncoderSpec, Head, init_convs

CODE_CHANNELS = 64
_EXACT_MAX_DIM = 2048  # larger Gram matrices: randomised SVD instead of an exact eigensolver


class DUpsamplingHead(Head):
    """Encoder maps -> logits (B, num_classes, H, W) reconstructed from stride-r codes."""

    emits_logits = True

    def __init__(self, encoder: EncoderSpec, num_classes: int, width: int = 64) -> None:
        super().__init__()
        if len(encoder.channels) < 3:
            raise ValueError(f"DUpsamplingHead needs 3 encoder maps, got strides {encoder.strides}")
        self.ratio = encoder.strides[-1]
        self.pool = encoder.strides[-1] // encoder.strides[-3]
        self.num_classes = num_classes
        block = num_classes * self.ratio**2
        self.code_channels = min(CODE_CHANNELS, block)
        self.fuse = ConvBNReLU(encoder.channels[-3] + encoder.channels[-1], 4 * width)
        self.code = nn.Conv2d(4 * width, self.code_channels, 1)
        self.log_temperature = nn.Parameter(torch.zeros(1))
        # basis: (r*r*K, C~) with orthonormal columns; mean: (r*r*K,)
        self.register_buffer("basis", torch.empty(block, self.code_channels))
        self.register_buffer("mean", torch.zeros(block))
        self.out_channels = num_classes
        self.stride = 1
        init_convs(self)
        nn.init.orthogonal_(self.basis)

    def codes(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features -> (B, C~, H/r, W/r)."""
        low, high = features[-3], features[-1]
        if self.pool > 1:
            low = F.avg_pool2d(low, self.pool)
        return self.code(self.fuse(torch.cat([low, high], dim=1)))

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, C~, h, w) -> scores (B, K, h*r, w*r) = pixel_shuffle(W z + b); no temperature."""
        weight = self.basis[:, :, None, None].to(codes.dtype)
        return F.pixel_shuffle(F.conv2d(codes, weight, self.mean.to(codes.dtype)), self.ratio)

    def forward(self, features: list[torch.Tensor], stem: object = None) -> torch.Tensor:
        """features -> logits (B, K, H, W) = reconstruct(codes) / T."""
        return self.reconstruct(self.codes(features)) / self.log_temperature.exp()


def label_blocks(label_masks: torch.Tensor, num_classes: int, ratio: int) -> torch.Tensor:
    """(N, H, W) integer labels -> (N * H/r * W/r, r*r*K) one-hot blocks, float32.

    Block layout is pixel_unshuffle's: index k*r*r + i*r + j is class k at row i, column j of the
    block. Pixels labelled outside 0..K-1 (e.g. an ignore label) become all-zero vectors.
    """
    if label_masks.ndim != 3:
        raise ValueError(f"label masks must be (N, H, W), got shape {tuple(label_masks.shape)}")
    n, h, w = label_masks.shape
    if h % ratio or w % ratio:
        raise ValueError(
            f"label masks of size {h}x{w} must be multiples of the head's ratio {ratio}; crop them"
        )
    labels = label_masks.long()
    valid = (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes) * valid[..., None]
    onehot = onehot.permute(0, 3, 1, 2).float()  # (N, K, H, W)
    blocks = F.pixel_unshuffle(onehot, ratio)  # (N, K*r*r, H/r, W/r)
    return blocks.permute(0, 2, 3, 1).reshape(-1, num_classes * ratio * ratio)


def compress_labels(head: DUpsamplingHead, label_masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) labels -> the codes that reconstruct them best, (N, C~, H/r, W/r): W^T (x - b)."""
    n, h, w = label_masks.shape
    r = head.ratio
    blocks = label_blocks(label_masks, head.num_classes, r).to(head.basis.device)
    codes = (blocks - head.mean) @ head.basis  # (N*h*w, C~)
    return codes.reshape(n, h // r, w // r, -1).permute(0, 3, 1, 2)


@torch.no_grad()
def fit_dupsampling(head: DUpsamplingHead, label_masks: torch.Tensor, num_classes: int) -> float:
    """Fit ``head``'s W and b by PCA of the r x r one-hot blocks of ``label_masks`` (N, H, W).

    b = mean block; W = the C~ leading eigenvectors of the blocks' covariance (centred PCA).
    Returns the explained variance ratio E = sum of the kept variances / total variance, so the
    fitted blocks' mean squared reconstruction error is (1 - E) * their mean squared deviation from
    b. Identical blocks (most are one class throughout) are merged with counts as weights.
    """
    if num_classes != head.num_classes:
        raise ValueError(
            f"fit_dupsampling got num_classes={num_classes} for a head built for "
            f"{head.num_classes} classes; build the model with num_classes={num_classes}"
        )
    blocks = label_blocks(label_masks, num_classes, head.ratio)
    unique, counts = torch.unique(blocks.to(torch.uint8), dim=0, return_counts=True)
    x = unique.double()
    weights = counts.double() / counts.sum()
    mean = weights @ x
    a = (x - mean) * weights.sqrt()[:, None]  # A^T A = covariance
    total = a.square().sum()
    k = head.code_channels
    if min(a.shape) <= _EXACT_MAX_DIM:
        if a.shape[0] < a.shape[1]:  # eigenvectors of A A^T, mapped through A^T
            values, vectors = torch.linalg.eigh(a @ a.T)
            values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
            keep = values > values.max().clamp_min(1e-30) * 1e-10
            basis = a.T @ vectors[:, keep] / values[keep].sqrt()
        else:
            basis = torch.linalg.eigh(a.T @ a)[1].flip(1)[:, :k]
    else:
        basis = torch.svd_lowrank(a, q=min(k + 16, *a.shape), niter=6)[2][:, :k]
    basis = _complete_orthonormal(basis, k)
    explained = float((a @ basis).square().sum() / total) if total > 0 else 1.0
    head.basis.copy_(basis.to(head.basis))
    head.mean.copy_(mean.to(head.mean))
    return explained


def _complete_orthonormal(basis: torch.Tensor, k: int) -> torch.Tensor:
    """(D, m) orthonormal columns, m <= k -> (D, k); the extra columns carry no variance."""
    if basis.shape[1] == k:
        return basis
    g = torch.Generator().manual_seed(0)
    extra = torch.randn(basis.shape[0], k - basis.shape[1], generator=g, dtype=basis.dtype)
    return torch.linalg.qr(torch.cat([basis, extra], dim=1))[0]  # first m columns: +-basis
