"""MagNet's progressive refinement (Huynh et al., CVPR 2021) as small pure functions and one module.

MagNet segments an image at several scales, coarse to fine. Stage 0 gives probabilities ``Y`` of the whole
image at the coarsest scale. At stage s ≥ 1, ``Y`` is upsampled to scale s; each patch is segmented
(``O``), and a refiner combines ``O`` with the matching crop of ``Y`` into ``R``. Pixels that were
uncertain in ``Y`` and are confident in ``R`` score high on the error score ``E``; after a median filter,
the top-k of ``E`` take ``R``'s value: ``Y[idx] ← R[idx]``.

Shapes: probabilities ``(B, C, H, W)`` (or ``(C, H, W)``), maps ``(B, H, W)`` (or ``(H, W)``). Everything
here is local (per pixel or a fixed window), so it can run on tiles as well as on a whole map; the
pipeline (``pipeline/magnet.py``) turns the image-wide top-k into a threshold every tile can apply.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn

from models.checkpoint import canonical_bytes
from models.errors import CheckpointError


def certainty(p: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``top1 − top2`` of probabilities along ``dim``: ``(B, C, H, W) → (B, H, W)``, in [0, 1]."""
    top2 = torch.topk(p, k=2, dim=dim).values
    return top2.select(dim, 0) - top2.select(dim, 1)


def uncertainty(p: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``1 − (top1 − top2)``: ``(B, C, H, W) → (B, H, W)``; 1 where the two best classes tie."""
    return 1.0 - certainty(p, dim)


def error_score(refined: torch.Tensor, previous: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``E = certainty(R) · uncertainty(Y)``: high where Y was unsure and R is sure. ``(B,C,H,W) → (B,H,W)``."""
    return certainty(refined, dim) * uncertainty(previous, dim)


def median_filter(x: np.ndarray, k: int, padding: str = "edge") -> np.ndarray:
    """Median over a ``k × k`` window (odd k) of a 2-D map, edges replicated (``padding="edge"``) or zeros past
    them (``"zero"``, the reference's ``MedianBlur``: a conv with zero padding, then ``torch.median``):
    ``(H, W) → (H, W)``.

    Computed in row strips so memory is ``O(strip · W · k²)``, not ``O(H · W · k²)``.
    """
    if k <= 1:
        return x.copy()
    if k % 2 == 0:
        raise ValueError(f"median filter size must be odd, got {k}")
    r = k // 2
    padded = np.pad(x, r, mode="edge") if padding == "edge" else np.pad(x, r, mode="constant")
    h, w = x.shape
    out = np.empty_like(x)
    strip = max(1, (1 << 22) // max(1, w * k * k))
    for y0 in range(0, h, strip):
        y1 = min(h, y0 + strip)
        win = np.lib.stride_tricks.sliding_window_view(padded[y0 : y1 + 2 * r], (k, k))
        out[y0:y1] = np.median(win.reshape(y1 - y0, w, k * k), axis=-1)
    return out


def topk_threshold(scores: np.ndarray, k: int) -> float:
    """The largest ``t`` with ``count(scores ≥ t) ≥ k`` (``+inf`` when ``k ≤ 0``).

    Replacing every pixel with ``E ≥ t`` honours ``k`` exactly up to ties at ``t``. The tiled pipeline
    finds the same ``t`` from a histogram of exact values, so both agree.
    """
    if k <= 0:
        return float("inf")
    flat = np.sort(scores.ravel())
    return float(flat[max(0, flat.size - k)])


_LOG_FLOOR = 1e-6  # log O of a softmax is at least log(1e-6) ≈ −13.8: far below any logit that matters


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 4
        self.body = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid, momentum=0.01), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid, momentum=0.01), nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out, momentum=0.01),
        )
        self.skip = (
            nn.Identity() if c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, momentum=0.01))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Refiner(nn.Module):
    """MagNet's refinement module: ``(O, Yp) (B, C, H, W) each → logits (B, C, H, W)``.

    ``cat(O, Yp)`` (the fine prediction first, in training and inference alike) → BN → conv3×3 2C→64 →
    BN-ReLU → conv3×3 64→64 → BN-ReLU → bottlenecks 64→128, 128→128 → conv1×1 → C. BN momentum 0.01 as
    in the reference; ~0.1 M parameters. All layers are local, so tiles equal the whole map inside.

    ``residual=True`` (gigaseg's default for training; the reference has none) adds ``log O`` to the output
    and starts the last conv at zero, so an untrained refiner returns the fine prediction exactly and
    training learns only where the coarse map should overrule it. A briefly trained plain refiner instead
    starts from noise and spreads its bias over every pixel MagNet replaces.
    """

    def __init__(self, num_classes: int, width: int = 64, residual: bool = False):
        super().__init__()
        c = num_classes
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * c, momentum=0.01),
            nn.Conv2d(2 * c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, momentum=0.01), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, momentum=0.01), nn.ReLU(inplace=True),
            _Bottleneck(width, 2 * width),
            _Bottleneck(2 * width, 2 * width),
            nn.Conv2d(2 * width, c, 1),
        )
        self.num_classes = c
        self.residual = residual
        if residual:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fine, coarse], dim=1)
        if coarse.is_contiguous(memory_format=torch.channels_last):  # full-resolution convs: ~2× faster on CPU
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        if self.residual:
            out = out + torch.log(fine.float().clamp_min(_LOG_FLOOR))
        return out


REFINER_FORMAT = "gigaseg-magnet-refiner-1"


def save_refiner(refiner: Refiner, width: int = 64) -> bytes:
    """A refiner as safetensors bytes, its class count and width in the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in refiner.state_dict().items()}
    meta = {"format": REFINER_FORMAT, "num_classes": str(refiner.num_classes), "width": str(width),
            "residual": str(int(refiner.residual))}
    return canonical_bytes(save(state, metadata=meta))


def load_refiner(data: bytes, num_classes: int) -> Refiner:
    """Rebuild a refiner from ``save_refiner`` bytes; its class count must match the segmenter's."""
    try:
        state = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as err:
        raise CheckpointError(f"not a safetensors refiner checkpoint: {err}") from None
    if meta.get("format") != REFINER_FORMAT:
        raise CheckpointError(
            f"not a MagNet refiner checkpoint (format {meta.get('format')!r}, expected {REFINER_FORMAT!r}); "
            "point model.magnet.refiner at a file written by gigaseg's refiner training"
        )
    if int(meta["num_classes"]) != num_classes:
        raise CheckpointError(
            f"the refiner was trained for {meta['num_classes']} classes but the segmenter predicts {num_classes}; "
            "train a refiner for this segmenter or use the matching pair"
        )
    refiner = Refiner(num_classes, width=int(meta["width"]), residual=meta.get("residual", "0") == "1")
    refiner.load_state_dict(state, strict=True)
    return refiner.eval()


def seeded_refiner(num_classes: int, seed: int = 0, width: int = 64) -> bytes:
    """Refiner bytes with seeded random weights (runs without a trained refiner), deterministic."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        refiner = Refiner(num_classes, width)
    return save_refiner(refiner.eval(), width)
