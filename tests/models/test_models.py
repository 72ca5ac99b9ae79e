"""Unit tests for models/: architectures, registry, seeding. Small inputs, width 16, CPU only."""

from __future__ import annotations

import pytest
import torch

from models import ARCHITECTURES, ModelConfig, build_model

WIDTH = 16


def _config(name: str = "fpn_resnet18", num_classes: int = 3, **kw: int) -> ModelConfig:
    return ModelConfig(name=name, num_classes=num_classes, width=WIDTH, **kw)


def smooth_image(size: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, size, size) normalised image of smooth gradients and blobs, like a real tile."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    f = torch.rand(3, 2, generator=g) * 8 + 2
    img = torch.stack(
        [
            torch.sin(f[c, 0] * x + c) * torch.cos(f[c, 1] * y) + ((x - 0.3 * c) ** 2 < 0.05)
            for c in range(3)
        ]
    )
    img = (img - img.mean((1, 2), keepdim=True)) / img.std((1, 2), keepdim=True)
    return img[None]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_forward_backward_every_architecture(name: str) -> None:
    model = build_model(_config(name), seed=0)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 3, 64, 64)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The zero-initialised residual gammas must still learn.
    if name != "fcn8s_vgg16":  # VGG has no residual blocks
        last_bn = "bn3" if name.endswith("resnet50") else "bn2"
        assert grads[f"encoder.layer1.0.{last_bn}.weight"].abs().sum() > 0


@pytest.mark.parametrize(
    ("output_stride", "strides"), [(32, (4, 8, 16, 32)), (16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))]
)
def test_encoder_feature_strides_and_channels(output_stride: int, strides: tuple[int, ...]) -> None:
    model = build_model(_config(output_stride=output_stride), seed=0).eval()
    assert model.encoder.strides == strides
    assert model.input_multiple == max(strides)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.encoder(x)
        logits = model(x)
    assert len(features) == len(model.encoder.out_channels) == 4
    for f, c, s in zip(features, model.encoder.out_channels, strides, strict=True):
        assert f.shape == (1, c, 64 // s, 96 // s)
    assert logits.shape == (1, 3, 64, 96)


def test_resnet50_channels_are_expanded() -> None:
    model = build_model(_config("fpn_resnet50"))
    assert model.encoder.out_channels == (4 * WIDTH, 8 * WIDTH, 16 * WIDTH, 32 * WIDTH)


def test_forward_coarse_gives_stride4_logits_and_features() -> None:
    model = build_model(_config(), seed=0).eval()
    logits, features = model.forward_coarse(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 3, 16, 16)
    assert features.shape == (1, model.decoder.out_channels, 16, 16)


def test_input_not_divisible_names_shape_and_multiple() -> None:
    model = build_model(_config())
    with pytest.raises(ValueError, match=r"\(1, 3, 48, 64\).*multiples of 32"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="expected a"):
        model(torch.randn(1, 4, 64, 64))
    os8 = build_model(_config(output_stride=8))
    assert os8(torch.randn(1, 3, 40, 48)).shape == (1, 3, 40, 48)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model name 'unet'") as info:
        ModelConfig(name="unet", num_classes=2)
    for name in ARCHITECTURES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kw",
    [
        {"num_classes": 0},
        {"num_classes": True},
        {"num_classes": 2.0},
        {"width": 4},
        {"width": 20},
        {"width": 512},
        {"output_stride": 4},
        {"in_channels": 0},
    ],
)
def test_config_rejects_bad_values(kw: dict[str, object]) -> None:
    args = {"name": "fpn_resnet18", "num_classes": 2} | kw
    with pytest.raises(ValueError, match=next(iter(kw))):
        ModelConfig(**args)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_registry_round_trip_builds_the_same_model(name: str) -> None:
    config = _config(name)
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config and again.to_dict() == config.to_dict()
    a, b = build_model(config, seed=1).state_dict(), build_model(again, seed=1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_stride_defaults_to_the_heads_and_is_checked() -> None:
    assert _config("fpn_resnet18").output_stride == 32  # the existing default, unchanged
    assert _config("fpn_resnet18").to_dict()["output_stride"] == 32
    assert _config("deeplabv3_resnet18").output_stride == 16  # DeepLab needs an atrous encoder
    assert _config("deeplabv3_resnet18", output_stride=8).output_stride == 8
    with pytest.raises(ValueError, match=r"output_stride=32 .*'deeplabv3'.*\(16, 8\)"):
        _config("deeplabv3_resnet18", output_stride=32)


def test_config_dict_round_trip_and_unknown_keys() -> None:
    config = ModelConfig("fpn_resnet34", num_classes=5, in_channels=4, width=32, output_stride=16)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"\['colour', 'depth'\]"):
        ModelConfig.from_dict(config.to_dict() | {"depth": 3, "colour": 1})
    with pytest.raises(ValueError, match="num_classes"):
        ModelConfig.from_dict({"name": "fpn_resnet18"})


def test_seed_makes_init_deterministic_without_touching_global_rng() -> None:
    before = torch.get_rng_state()
    a = build_model(_config(), seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)  # the global state must not leak into a seeded build
    b = build_model(_config(), seed=7).state_dict()
    c = build_model(_config(), seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv1.weight"], c["encoder.conv1.weight"])
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_seeded_model_is_not_degenerate_in_eval_mode() -> None:
    # Fresh BN stats make eval-mode BN the identity; the pipeline's smoke runs use such a model and
    # need finite logits whose argmax varies over the image.
    model = build_model(ModelConfig("fpn_resnet18", num_classes=4), seed=0).eval()
    noise = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    for x in (smooth_image(128), noise):
        with torch.inference_mode():
            logits = model(x)
        assert torch.isfinite(logits).all()
        share = torch.bincount(logits.argmax(1).flatten(), minlength=4).float() / (128 * 128)
        assert share.max() < 0.95, share
        assert (share > 0.01).sum() >= 2, share


def test_bf16_autocast_channels_last_inference() -> None:
    model = build_model(_config(), seed=0).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, 3, 64, 64)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
