"""Models users bring: ONNX, a torch.export program, their own factory with safetensors weights; the model card
that travels with them; what is refused and why. The models are built here: a per-pixel network (a 1×1
convolution), whose labels are known exactly: ``argmax(W·(v/255 − mean)/std + b)`` at every pixel."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.torch import save

from jobs.cli import main as cli_main
from jobs.runner import run_spec
from jobs.spec import parse_spec
from models.card import CARD_KEY
from pipeline.errors import SpecError
from tests.archive import spec_dict
from tests.jobs.user_nets import PixelNet

pytestmark = pytest.mark.integration

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
CARD = {"classes": [{"name": "water", "color": [0, 0, 255]}, {"name": "field", "color": [0, 255, 0]},
                    {"name": "town", "color": [255, 0, 0]}],
        "bands": ["red", "green", "blue"], "normalization": {"mean": list(MEAN), "std": list(STD)},
        "output": "logits"}


def pixel_net() -> PixelNet:
    torch.manual_seed(0)
    net = PixelNet(3).eval()
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[2.0, -1.0, 0.5], [-1.0, 2.0, -0.5], [0.3, 0.2, 1.5]])[:, :, None, None])
        net.head.bias.copy_(torch.tensor([0.1, -0.2, 0.0]))
    return net


def expected_labels(image_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, clear): the per-pixel argmax, and where its top two logits are apart (no float tie)."""
    net = pixel_net()
    x = (torch.from_numpy(image_hwc).permute(2, 0, 1).float()[None] / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = net(x)[0].numpy()
    top2 = np.sort(logits, axis=0)[-2:]
    return logits.argmax(0), (top2[1] - top2[0]) > 1e-3


def write_image(root: Path, h: int = 300, w: int = 340) -> np.ndarray:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[: h // 2, : w // 2] = (10, 200, 30)  # flat regions too
    arr = zarr.create_array(store=str(root / "scene.zarr"), shape=img.shape, chunks=(128, 128, 3), dtype="uint8")
    arr[:] = img
    return img


def onnx_model(path: Path, *, card: dict | None = CARD, fixed: int | None = None, batch: int | None = None) -> Path:
    """The per-pixel network as an ONNX graph (a Conv node), its card in ``metadata_props``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    net = pixel_net()
    w = numpy_helper.from_array(net.head.weight.detach().numpy(), "W")
    b = numpy_helper.from_array(net.head.bias.detach().numpy(), "B")
    hw = [fixed, fixed] if fixed else ["H", "W"]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch or "N", 3, *hw])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch or "N", 3, *hw])
    graph = helper.make_graph([helper.make_node("Conv", ["image", "W", "B"], ["logits"])], "pixelnet",
                              [image], [logits], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if card is not None:
        helper.set_model_props(model, {CARD_KEY: json.dumps(card)})
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def exported_model(path: Path, card: dict | None = CARD) -> Path:
    from torch.export import Dim, export

    program = export(pixel_net(), (torch.zeros(2, 3, 64, 64),),
                     dynamic_shapes=({0: Dim("b", max=1024), 2: Dim("h", max=8192), 3: Dim("w", max=8192)},))
    extra = {CARD_KEY: json.dumps(card)} if card else None
    torch.export.save(program, str(path), extra_files=extra)
    return path


def user_spec(tmp_path: Path, checkpoint: Path, **overrides) -> dict:
    spec = spec_dict(str(tmp_path / "in"), str(tmp_path / "out"), **overrides)
    spec["model"] = {"checkpoint": str(checkpoint), "precision": "fp32", **overrides.get("model", {})}
    return spec


def labels_of(tmp_path: Path) -> np.ndarray:
    return zarr.open_array(str(tmp_path / "out" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]


@pytest.mark.parametrize("kind", ["onnx", "export", "factory"])
def test_a_users_model_runs_and_gives_its_exact_labels(tmp_path, ray_cluster, kind):
    (tmp_path / "in").mkdir()
    img = write_image(tmp_path / "in")
    model_spec = {}
    if kind == "onnx":
        ckpt = onnx_model(tmp_path / "pixelnet.onnx")
    elif kind == "export":
        ckpt = exported_model(tmp_path / "pixelnet.pt2")
    else:  # the user's package, its weights as safetensors, its card in a sidecar
        ckpt = tmp_path / "pixelnet.safetensors"
        ckpt.write_bytes(save({k: v.contiguous() for k, v in pixel_net().state_dict().items()}))
        Path(f"{ckpt}.model.yaml").write_text(yaml.safe_dump(CARD))
        model_spec = {"factory": "tests.jobs.user_nets:build"}
    spec = parse_spec(user_spec(tmp_path, ckpt, model=model_spec))
    (result,) = run_spec(spec)
    assert result.status == "ok", result.error
    want, clear = expected_labels(img)
    got = labels_of(tmp_path)
    assert (got[clear] == want[clear]).all()
    assert clear.mean() > 0.99
    group = zarr.open_group(str(tmp_path / "out" / "scene.zarr" / "labels" / "segmentation"), mode="r")
    props = group.attrs["ome"]["image-label"]["properties"]
    assert [p["name"] for p in props] == ["water", "field", "town"]  # the card's classes reach the output


def test_magnet_runs_with_an_onnx_segmenter(tmp_path, ray_cluster):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in")
    spec = user_spec(tmp_path, onnx_model(tmp_path / "pixelnet.onnx"),
                     model={"framework": "magnet", "magnet": {"scales": 2, "refiner_width": 8}})
    (result,) = run_spec(parse_spec(spec))
    assert result.status == "ok", result.error
    assert labels_of(tmp_path).shape == (300, 340)


def test_a_fixed_batch_onnx_model_is_honoured(tmp_path, ray_cluster):
    (tmp_path / "in").mkdir()
    img = write_image(tmp_path / "in")
    spec = user_spec(tmp_path, onnx_model(tmp_path / "fixed-batch.onnx", batch=3))  # tiling.batch is 4
    (result,) = run_spec(parse_spec(spec))
    assert result.status == "ok", result.error
    want, clear = expected_labels(img)
    assert (labels_of(tmp_path)[clear] == want[clear]).all()


def _refused(tmp_path: Path, spec: dict) -> str:
    with pytest.raises(SpecError) as err:
        run_spec(parse_spec(spec))
    assert not (tmp_path / "out" / "scene.zarr").exists(), "nothing runs before the model is checked"
    return str(err.value)


def test_what_does_not_fit_is_refused_naming_both_sides(tmp_path):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in")
    fixed = onnx_model(tmp_path / "fixed.onnx", fixed=256)
    text = _refused(tmp_path, user_spec(tmp_path, fixed))
    assert "tiling.tile: 128" in text and "256×256" in text
    five = [{"name": n} for n in "abcde"]
    text = _refused(tmp_path, user_spec(tmp_path, onnx_model(tmp_path / "m.onnx"), model={"classes": five}))
    assert "5 classes" in text and "has 3" in text
    text = _refused(tmp_path, user_spec(tmp_path, onnx_model(tmp_path / "nocard.onnx", card=None)))
    assert "names no classes" in text and "nocard.onnx" in text
    text = _refused(tmp_path, user_spec(tmp_path, onnx_model(tmp_path / "m.onnx"), model={"framework": "fctl"}))
    assert "FCtL" in text and "gigaseg" in text
    four_bands = {**CARD, "bands": ["red", "green", "blue", "nir"],
                  "normalization": {"mean": [0.5] * 4, "std": [0.25] * 4}}
    text = _refused(tmp_path, user_spec(tmp_path, onnx_model(tmp_path / "nir.onnx", card=four_bands)))
    assert "4 input bands" in text


def test_factory_weights_that_do_not_fit_list_what_is_missing_and_unexpected(tmp_path):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in")
    ckpt = tmp_path / "wrong.safetensors"
    ckpt.write_bytes(save({"head.weight": torch.zeros(3, 3, 1, 1), "extra.bias": torch.zeros(3)}))
    Path(f"{ckpt}.model.yaml").write_text(yaml.safe_dump(CARD))
    text = _refused(tmp_path, user_spec(tmp_path, ckpt, model={"factory": "tests.jobs.user_nets:build"}))
    assert "missing 1: head.bias" in text and "unexpected 1: extra.bias" in text
    text = _refused(tmp_path, user_spec(tmp_path, ckpt, model={"factory": "no_such_pkg.nets:build"}))
    assert "cannot import no_such_pkg.nets" in text


def test_an_export_archive_that_would_unpickle_is_refused_before_loading(tmp_path):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in")
    good = exported_model(tmp_path / "good.pt2").read_bytes()
    # the same archive with one weight marked as a pickle: torch.export.load would torch.load(weights_only=False) it
    src = zipfile.ZipFile(io.BytesIO(good))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(buf.getvalue())
    text = _refused(tmp_path, user_spec(tmp_path, bad))
    assert "use_pickle" in text and "never loads" in text


def test_a_torchscript_archive_is_refused_saying_what_to_bring_instead(tmp_path):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in")
    scripted = tmp_path / "net.pt"
    torch.jit.script(pixel_net()).save(str(scripted))
    text = _refused(tmp_path, user_spec(tmp_path, scripted))
    assert "net.pt is a TorchScript archive" in text and "torch.export.save" in text and "ONNX" in text


def test_inspect_prints_the_card_and_checks_it(tmp_path, capsys):
    ok = onnx_model(tmp_path / "pixelnet.onnx")
    assert cli_main(["inspect", str(ok)]) == 0
    out = capsys.readouterr().out
    assert "onnx" in out and "water" in out and "logits" in out
    bad = onnx_model(tmp_path / "nocard.onnx", card=None)
    assert cli_main(["inspect", str(bad)]) == 2
    assert "names no classes" in capsys.readouterr().err


def test_an_exported_program_runs_at_its_own_precision_under_bf16(tmp_path):
    """``model.precision: bf16`` (or auto on a bf16 device) autocasts a user's module, not an exported program:
    its graph checks every tensor's dtype and would fail on bf16."""
    from models.card import merge, parse_card
    from pipeline.workers.predictor import DeviceConfig
    from pipeline.workers.runtimes import ModulePredictor, load_exported

    card = merge(parse_card(CARD, "card"), {}, "card", "spec")
    program = load_exported(exported_model(tmp_path / "m.pt2").read_bytes())
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    got = ModulePredictor(program, card, DeviceConfig("bf16", 1, device="cpu"), exported=True).probabilities(tiles)
    want = ModulePredictor(pixel_net(), card, DeviceConfig("fp32", 1, device="cpu")).probabilities(tiles)
    assert torch.allclose(got, want, atol=1e-5)
