"""Unit tests for models/heads: every head's shapes, strides, gradients and its own mechanism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import ARCHITECTURES, DECODERS, ENCODERS, ModelConfig, build_model
from models.heads.fcn import bilinear_kernel
from models.heads.segnet import unpool_like

WIDTH = 8
K = 3
HEADS = sorted(DECODERS)
HEAD_STRIDES = [(h, s) for h in HEADS for s in DECODERS[h].output_strides]
RESNETS = sorted(e for e in ENCODERS if e.startswith("resnet"))


def arch(head: str, encoder: str = "resnet18") -> str:
    """The architecture of ``head`` on ``encoder``; FCN-8s as published exists only on its VGG-16."""
    return "fcn8s_vgg16" if head == "fcn8s" else f"{head}_{encoder}"


def _model(head: str, output_stride: int | None = None, encoder: str = "resnet18"):
    config = ModelConfig(arch(head, encoder), K, width=WIDTH, output_stride=output_stride)
    return build_model(config, seed=0)


def test_registry_names_every_head_with_every_encoder() -> None:
    expected = {f"{h}_{e}": (e, h) for h in DECODERS if h != "fcn8s" for e in RESNETS}
    assert ARCHITECTURES == {**expected, "fcn8s_vgg16": ("vgg16", "fcn8s")}


@pytest.mark.parametrize(("head", "output_stride"), HEAD_STRIDES)
def test_head_shapes_strides_and_gradients(head: str, output_stride: int) -> None:
    model = _model(head, output_stride)
    any_size = DECODERS[head].any_input_size
    assert model.input_multiple == (1 if any_size else output_stride) and output_stride == max(model.encoder.strides)
    x = torch.randn(2, 3, 64, 96)
    logits, aux = model.forward_aux(x)
    assert logits.shape == (2, K, 64, 96) and logits.dtype == torch.float32
    decoder = model.decoder
    features, stem = model.encoder.forward_with_stem(x)
    out = decoder(features, stem)
    assert out.shape == (2, decoder.out_channels, 64 // decoder.stride, 96 // decoder.stride)
    loss = F.cross_entropy(logits, torch.randint(0, K, (2, 64, 96)))
    loss = loss + sum(F.cross_entropy(a, torch.randint(0, K, (2, 64, 96))) for a in aux.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    odd = torch.randn(1, 3, 64 + output_stride // 2, 64)
    if any_size:  # resamples by size: any input runs
        assert model(odd).shape == (1, K, *odd.shape[-2:])
        return
    with pytest.raises(ValueError, match=f"multiples of {output_stride}"):
        model(odd)


@pytest.mark.parametrize("head", HEADS)
def test_bf16_channels_last_inference_gives_float32_logits(head: str) -> None:
    model = _model(head).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = model(x)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            logits = model(x)
    assert logits.shape == (2, K, 64, 64) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() > 0.8


@pytest.mark.parametrize("head", HEADS)
def test_classifier_exists_only_for_heads_that_emit_features(head: str) -> None:
    model = _model(head)
    has_classifier = any(n.startswith("classifier.") for n, _ in model.named_parameters())
    assert has_classifier == (not model.decoder.emits_logits)
    x = torch.randn(1, 3, 64, 64)
    if model.decoder.emits_logits:
        with pytest.raises(ValueError, match="emits logits"):
            model.forward_coarse(x)
    else:
        logits, features = model.forward_coarse(x)
        s = model.decoder.stride
        assert logits.shape == (1, K, 64 // s, 64 // s)
        assert features.shape == (1, model.decoder.out_channels, 64 // s, 64 // s)


def test_stem_forward_matches_plain_forward_and_records_the_max_pool() -> None:
    encoder = _model("unet").encoder.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, stem = encoder.forward_with_stem(x)
        plain = encoder(x)
    assert all(torch.equal(a, b) for a, b in zip(features, plain, strict=True))
    assert stem.features.shape == (2, encoder.stem_channels, 32, 32)
    assert stem.pool_indices.shape == (2, encoder.stem_channels, 16, 16)
    gathered = stem.features.flatten(2).gather(2, stem.pool_indices.flatten(2))
    assert torch.equal(gathered.view(2, -1, 16, 16), encoder.maxpool(stem.features))


def test_segnet_unpool_puts_values_at_the_argmax_of_the_finer_map() -> None:
    target = torch.tensor([[[[1.0, 5, 0, 0], [2, 3, 0, 9], [7, 0, 1, 1], [0, 0, 4, 1]]]])
    x = torch.tensor([[[[10.0, 20], [30, 40]]]])
    expected = torch.tensor([[[[0.0, 10, 0, 0], [0, 0, 0, 20], [30, 0, 0, 0], [0, 0, 40, 0]]]])
    assert torch.equal(unpool_like(x, target), expected)


def test_fcn_upsampling_starts_as_bilinear_interpolation() -> None:
    model = _model("fcn")
    up = model.decoder.up[0]
    assert torch.equal(up.weight, bilinear_kernel(K, 4))
    x = torch.randn(1, K, 6, 6)
    with torch.no_grad():
        ours = up(x)
    reference = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1])
    # The skip score layers start at zero: the model starts as FCN-32s.
    assert not model.decoder.score[0].weight.any() and not model.decoder.score[1].weight.any()


@pytest.mark.parametrize(("output_stride", "rates"), [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_deeplab_rates_double_at_output_stride_8(output_stride: int, rates) -> None:
    decoder = _model("deeplabv3", output_stride).decoder
    assert decoder.rates == rates
    dilations = [b[0].dilation[0] for b in decoder.branches[1:4]]
    assert tuple(dilations) == rates


def test_ocr_main_output_depends_on_the_soft_regions() -> None:
    # The pixel-region attention must route the main loss into the auxiliary region head.
    model = _model("ocrnet")
    logits = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(logits, torch.randint(0, K, (2, 64, 64))).backward()
    assert model.decoder.aux[1].weight.grad.abs().sum() > 0
    _, aux = model.forward_aux(torch.randn(2, 3, 64, 64))
    assert set(aux) == {"soft_regions"} and aux["soft_regions"].shape == (2, K, 64, 64)


@pytest.mark.parametrize("head", HEADS)
def test_global_context_only_where_documented(head: str) -> None:
    # Local heads: a change in one corner cannot reach the opposite corner beyond the receptive
    # field. On a 256-px input the resnet10 receptive field (~ 200 px) does not span the diagonal.
    model = ModelConfig(arch(head, "resnet10"), K, width=WIDTH)
    net = build_model(model, seed=0).eval()
    side = 512 if head == "fcn8s" else 256  # VGG-16's fc6 (7×7 at stride 32) reaches ~400 px
    x = torch.randn(1, 3, side, side)
    y = x.clone()
    y[..., :16, :16] += 5
    with torch.no_grad():
        a, b = net(x), net(y)
    far = (a - b)[..., -32:, -32:].abs().max().item()
    if head in ("deeplabv3", "ocrnet"):
        assert far > 0  # image pooling / object regions see the whole tile, by design
    else:
        assert far == 0


@pytest.mark.parametrize("head", ["fcn", "unet", "segnet", "deeplabv3", "ocrnet", "dupsampling", "fpn"])
def test_declared_aux_outputs_are_what_forward_aux_returns(head):
    """Training adds a loss per declared auxiliary output (OCRNet's soft regions, weight 0.4)."""
    import torch

    from models import ModelConfig, build_model

    model = build_model(ModelConfig(name=f"{head}_resnet10", num_classes=3, width=8), seed=0).train()
    logits, aux = model(torch.rand(1, 3, 64, 64), aux=True)
    assert set(aux) == set(model.decoder.aux_outputs)
    assert logits.shape == (1, 3, 64, 64) and all(a.shape == (1, 3, 64, 64) for a in aux.values())
