"""models/reference: the reference implementations' files (their key names and shapes, random values) convert to
gigaseg's architectures, every tensor lands where it should, the results load strictly, and anything else is
refused naming the keys. Fidelity against the reference code itself is checked outside the repository."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from models import ENCODERS, build_model
from models.card import CARD_KEY
from models.checkpoint import _read_header, load_checkpoint
from models.errors import CheckpointError
from models.fctl import build_fctl
from models.fctl_checkpoint import load_fctl
from models.magnet import Refiner, load_refiner
from models.reference import fctl as fctl_ref
from models.reference import magnet as magnet_ref
from models.reference.common import read_torch_state
from models.reference.imports import import_fctl, import_magnet, import_torchvision_resnet
from models.reference.torchvision import convert_resnet
from tests.models.reference_layouts import (
    RESNETS,
    fctl_shapes,
    magnet_fpn_shapes,
    magnet_refiner_shapes,
    materialise,
    resnet_shapes,
)

W = 8  # tiny width: the published files are width 64


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def saved(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def names(n):
    return [f"c{i}" for i in range(n)], None


def fctl_state(mode: int, seed: int, width: int = W, device: str = "cpu"):
    shapes, aliases = fctl_shapes(mode, 2, width)
    return materialise(shapes, seed, aliases, device)


# --- the published files' shapes (width 64, on the meta device: no memory) -----------------------------------


def test_published_shapes_fit_the_architectures() -> None:
    _, config, _ = magnet_ref.convert_segmenter(materialise(magnet_fpn_shapes(7, 64), device="meta"), "fpn.pth")
    assert (config.name, config.num_classes, config.width) == ("magnet_fpn_resnet50", 7, 64)
    _, k, width, _ = magnet_ref.convert_refiner(materialise(magnet_refiner_shapes(19, 64), device="meta"), "r.pth")
    assert (k, width) == (19, 64)
    _, local, _ = fctl_ref.convert([fctl_state(1, 0, 64, "meta")], ["Bfcn.pth"], None)
    assert (local.name, local.num_classes, local.width) == ("fcn8s_vgg16", 2, 64)
    _, single, _ = fctl_ref.convert([fctl_state(2, 0, 64, "meta")], ["B10.pth"], [2])
    assert (single.contexts, single.fusion, single.shared_encoder, single.key_channels) == ((2.0,), "none", True, 512)
    states = [fctl_state(3, 0, 64, "meta"), fctl_state(2, 0, 64, "meta"), fctl_state(2, 0, 64, "meta")]
    _, fused, _ = fctl_ref.convert(states, ["all.pth", "B10.pth", "B15.pth"], None)
    assert (fused.contexts, fused.fusion, fused.key_channels) == ((2.0, 3.0), "gated", 512)
    for name, (blocks, bottleneck) in RESNETS.items():
        _, encoder, width, _ = convert_resnet(materialise(resnet_shapes(blocks, bottleneck), device="meta"), "r.pth")
        assert (encoder, width) == (name, 64)


# --- every tensor where it should be ---------------------------------------------------------------------------


def _expected_magnet_name(key: str) -> str:
    """The reference key of a magnet_fpn_resnet50 key, written out independently of the importer."""
    if key.startswith("encoder."):
        return "model.resnet_backbone." + key.removeprefix("encoder.")
    table = {"lateral": ["latlayer3", "latlayer2", "latlayer1", "toplayer"]}
    table.update({f"smooth{j}": [f"smooth{i}_{j}" for i in (4, 3, 2, 1)] for j in (1, 2)})
    _, head, *rest = key.split(".")
    if head == "classify":
        return "model.classify." + rest[0]
    return f"model.{table[head][int(rest[0])]}.{rest[1]}"


def test_magnet_tensors_land_where_they_should() -> None:
    ref = materialise(magnet_fpn_shapes(5, W), seed=1)
    ours, config, keys = magnet_ref.convert_segmenter(ref, "fpn.pth")
    assert set(ours) == set(build_model(config).state_dict())
    for key, tensor in ours.items():
        assert torch.equal(tensor, ref[_expected_magnet_name(key)]), key
    assert keys.ignored == {"loss.criterion.weight": "the training loss's own tensors (class weights), not the model's"}

    ref = materialise(magnet_refiner_shapes(5, W), seed=2)
    ours, _, _, _ = magnet_ref.convert_refiner(ref, "ref.pth")
    layers = {"net.0": "bn0", "net.1": "conv1", "net.2": "bn1", "net.4": "conv2", "net.5": "bn2", "net.9": "seg_conv"}
    body = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
    for key, tensor in ours.items():
        if key == "net.9.bias":
            assert not tensor.any()
            continue
        parts = key.split(".")
        if parts[1] in ("7", "8"):
            block = f"residual.{int(parts[1]) - 7}"
            name = (f"{block}.{body[parts[3]]}" if parts[2] == "body" else f"{block}.downsample.{parts[3]}")
            expected = ".".join([name, *parts[4:]])
        else:
            expected = ".".join([layers[".".join(parts[:2])], *parts[2:]])
        assert torch.equal(tensor, ref[expected]), key


def test_magnet_refiner_computes_the_reference_formula() -> None:
    """RefinementMagNet's forward, written from the reference (bn0 → conv-bn-relu ×2 → two Bottlenecks →
    seg_conv, no bias), on the reference's tensors, against gigaseg's refiner on the converted ones."""
    ref = materialise(magnet_refiner_shapes(4, W), seed=3)
    ours, k, width, _ = magnet_ref.convert_refiner(ref, "ref.pth")
    refiner = Refiner(k, width).eval()
    refiner.load_state_dict(ours)

    def bn(x, p):
        return F.batch_norm(x, ref[f"{p}.running_mean"], ref[f"{p}.running_var"], ref[f"{p}.weight"],
                            ref[f"{p}.bias"], False, 0.0, 1e-5)

    def bottleneck(x, p, down):
        out = F.relu(bn(F.conv2d(x, ref[f"{p}.conv1.weight"]), f"{p}.bn1"))
        out = F.relu(bn(F.conv2d(out, ref[f"{p}.conv2.weight"], padding=1), f"{p}.bn2"))
        out = bn(F.conv2d(out, ref[f"{p}.conv3.weight"]), f"{p}.bn3")
        skip = bn(F.conv2d(x, ref[f"{p}.downsample.0.weight"]), f"{p}.downsample.1") if down else x
        return F.relu(out + skip)

    fine, coarse = torch.softmax(torch.randn(2, 4, 24, 24), 1), torch.softmax(torch.randn(2, 4, 24, 24), 1)
    x = bn(torch.cat([fine, coarse], 1), "bn0")
    x = F.relu(bn(F.conv2d(x, ref["conv1.weight"], padding=1), "bn1"))
    x = F.relu(bn(F.conv2d(x, ref["conv2.weight"], padding=1), "bn2"))
    x = bottleneck(bottleneck(x, "residual.0", True), "residual.1", False)
    expected = F.conv2d(x, ref["seg_conv.weight"])
    with torch.no_grad():
        torch.testing.assert_close(refiner(fine, coarse), expected, rtol=1e-4, atol=1e-5)


def _reference_fctl(ref, x, y, z=None):
    """``_FCtL.forward`` of the reference (liqiokkk/FCtL, models/FCtL.py), from its formula, on its own tensors."""
    a = "module.big_attention"

    def branch(q_src, kv_src, s):
        q = F.conv2d(q_src, ref[f"{a}.conv_query{s}.weight"], ref[f"{a}.conv_query{s}.bias"]).flatten(2)
        k = F.conv2d(kv_src, ref[f"{a}.conv_key{s}.weight"], ref[f"{a}.conv_key{s}.bias"]).flatten(2)
        v = F.conv2d(kv_src, ref[f"{a}.conv_value{s}.weight"]).flatten(2)
        sim = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=2)
        return ref[f"{a}.gamma{s}"] * torch.bmm(sim, v.transpose(1, 2)).transpose(1, 2).reshape(q_src.shape)

    out = branch(x, y, "")
    if z is None:
        return x + out
    out1, out2 = branch(x, z, "_1"), branch(x, x, "_2")
    h = [F.conv2d(o, ref[f"{a}.in_{i}.weight"], ref[f"{a}.in_{i}.bias"]) for i, o in ((1, out), (2, out1), (3, out2))]
    t = F.conv2d(torch.cat(h, 1), ref[f"{a}.trans.weight"], ref[f"{a}.trans.bias"]).split(x.shape[1], dim=1)
    g = torch.stack([torch.sigmoid(F.conv2d(p, ref[f"{a}.out_{i}.weight"], ref[f"{a}.out_{i}.bias"]))
                     for i, p in zip((1, 2, 3), t)])
    w = torch.softmax(g, dim=0)
    return x + w[0] * out + w[1] * out1 + w[2] * out2


def _gamma(ref, value=0.7):
    for k in ref:
        if ".gamma" in k:
            ref[k] = torch.full((1,), value)


def test_fctl_tensors_land_where_they_should() -> None:
    """Local FCN-8s by name; the correlation and the fusion by what they compute (the fusion's joint conv is
    re-ordered), for the one-context (mode 2) and the fused (mode 3) model."""
    local = fctl_state(1, 4)
    ours, config, _ = fctl_ref.convert([local], ["Bfcn.pth"], None)
    for key, tensor in ours.items():
        assert torch.equal(tensor, local["module." + key.split(".", 1)[1]]), key

    single = fctl_state(2, 5)
    _gamma(single)
    ours, config, _ = fctl_ref.convert([single], ["B10.pth"], [2])
    model = build_fctl(config).eval()
    model.load_state_dict(ours)
    x, y = torch.randn(2, 8 * W, 5, 5), torch.randn(2, 8 * W, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model.correlations[0](x, y) + x, _reference_fctl(single, x, y), rtol=1e-4, atol=1e-5)
        assert model.context_encoder(0) is model.segmenter.encoder  # shared, as the reference's big_pool*

    fused, medium, large = fctl_state(3, 6), fctl_state(2, 7), fctl_state(2, 8)
    _gamma(fused)
    ours, config, _ = fctl_ref.convert([fused, medium, large], ["all.pth", "B10.pth", "B15.pth"], None)
    model = build_fctl(config).eval()
    model.load_state_dict(ours)
    for i, ctx in enumerate((medium, large)):
        for key, tensor in model.context_encoders[i].state_dict().items():
            assert torch.equal(tensor, ctx[f"module.big_{key}"]), (i, key)
    ctx = torch.randn(2, 2, 3, 64, 64)
    with torch.no_grad():
        y, z = (model.context_encoders[i](ctx[:, i])[-1] for i in range(2))
        x = torch.randn_like(y)
        torch.testing.assert_close(model.correlate(x, ctx), _reference_fctl(fused, x, y, z), rtol=1e-4, atol=1e-5)


def test_torchvision_resnet_tensors_land_where_they_should() -> None:
    ref = materialise(resnet_shapes(*RESNETS["resnet18"], width=W), seed=9)
    ours, encoder, width, keys = convert_resnet(ref, "r18.pth")
    assert (encoder, width) == ("resnet18", W)
    assert set(ours) == set(ENCODERS["resnet18"](width=W).state_dict())
    assert all(torch.equal(v, ref[k]) for k, v in ours.items())
    assert set(keys.ignored) == {"fc.weight", "fc.bias"}


# --- imports: strict loading, shapes, cards ---------------------------------------------------------------------


def test_imports_load_strictly_and_carry_their_card() -> None:
    seg, ref1, ref2 = (materialise(magnet_fpn_shapes(3, W), 1), materialise(magnet_refiner_shapes(3, W), 2),
                       materialise(magnet_refiner_shapes(3, W), 3))
    imported = import_magnet([("fpn.pth", saved(seg)), ("r1.pth", saved(ref1)), ("r2.pth", saved(ref2))], names)
    assert imported.kinds == {"segmenter.safetensors": "segmenter", "refiner-1.safetensors": "refiner",
                              "refiner-2.safetensors": "refiner"}
    model, info = load_checkpoint(imported.files["segmenter.safetensors"])
    assert model(torch.randn(1, 3, 100, 76)).shape == (1, 3, 100, 76)  # any input size, as the reference
    assert info.normalization.mean == (0.485, 0.456, 0.406)  # MagNet feeds ImageNet-normalised images
    card = __import__("json").loads(_read_header(imported.files["segmenter.safetensors"])["__metadata__"][CARD_KEY])
    assert card["classes"] == [{"name": "c0"}, {"name": "c1"}, {"name": "c2"}] and card["size_multiple"] == 1
    refiner = load_refiner(imported.files["refiner-2.safetensors"], 3)
    assert torch.equal(refiner.net[1].weight, ref2["conv1.weight"])

    states = [fctl_state(3, 10), fctl_state(2, 11), fctl_state(2, 12)]
    imported = import_fctl([(n, saved(s)) for n, s in zip(("all", "B10", "B15"), states)], names, [2, 4])
    model, info, config = load_fctl(imported.files["model.safetensors"])
    assert config.contexts == (2.0, 4.0) and info.normalization.mean == (0.0, 0.0, 0.0)  # ToTensor only
    assert info.normalization.std == (1.0, 1.0, 1.0)
    assert model(torch.randn(1, 3, 64, 64), torch.randn(1, 2, 3, 64, 64)).shape == (1, 2, 64, 64)

    imported = import_torchvision_resnet([("r50.pth", saved(materialise(resnet_shapes(*RESNETS["resnet50"], width=W))))])
    assert imported.kinds == {"encoder.safetensors": "encoder"}


# --- refusals ------------------------------------------------------------------------------------------------


def test_unrecognised_files_are_refused_naming_the_keys() -> None:
    seg = materialise(magnet_fpn_shapes(3, W))
    extra = {**seg, "model.aux_head.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): aux_head.weight"):
        magnet_ref.convert_segmenter(extra, "fpn.pth")
    missing = {k: v for k, v in seg.items() if k != "model.smooth2_2.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): smooth2_2.bias"):
        magnet_ref.convert_segmenter(missing, "fpn.pth")
    wrong = {**seg, "model.classify.bias": torch.zeros(5)}
    with pytest.raises(CheckpointError, match=r"classify.bias \[5\] \(expected \[3\]"):
        magnet_ref.convert_segmenter(wrong, "fpn.pth")
    with pytest.raises(CheckpointError, match="HRNet-W18"):
        import_magnet([("hrnet.pth", saved({"stage4.0.weight": torch.zeros(1), "cls_head.weight": torch.zeros(1)}))],
                      names)
    with pytest.raises(CheckpointError, match="DeepGlobe branch"):
        fctl_ref.convert([{"module.medium.conv_key.weight": torch.zeros(1)}], ["all.pth"], None)
    with pytest.raises(CheckpointError, match="two context encoders"):
        fctl_ref.convert([fctl_state(3, 0)], ["all.pth"], None)
    r101 = materialise(resnet_shapes((3, 4, 23, 3), True, width=W), device="meta")
    with pytest.raises(CheckpointError, match="ResNet-101 has no gigaseg encoder"):
        convert_resnet(r101, "r101.pth")


class Payload:  # anything but tensors and plain containers: torch.load(weights_only=True) refuses it
    pass


def test_files_are_read_with_weights_only() -> None:
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        read_torch_state(saved({"w": torch.zeros(1), "obj": Payload()}), "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_torch_state(pickle.dumps(Payload()), "evil.pkl")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_torch_state(saved([torch.zeros(1)]), "list.pth")
    wrapped = read_torch_state(saved({"state_dict": {"a": torch.ones(1)}, "epoch": 3}), "ckpt.pth")
    assert list(wrapped) == ["a"]
