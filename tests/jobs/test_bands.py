"""Images of any number of bands, end to end: ``inputs.bands`` picks and orders a 6-sample TIFF's channels, each
mapped to uint8 by its own ``inputs.value_range``; a 6-band model (an ONNX graph built here, or a seeded gigaseg
network of 6 input channels) runs on them through ``gigaseg run``; a band count that does not fit the model is a
spec error (exit 2) before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr

from jobs.cli import main as cli_main
from models.card import CARD_KEY
from pipeline.sources.convert import to_uint8
from tests.archive import spec_dict

pytestmark = pytest.mark.integration

BANDS = [5, 3, 1, 0, 2, 4]  # the model's order of the TIFF's samples
RANGES = [[0, 4095], [0, 65535], [100, 3000], [0, 1000], [0, 2048], [500, 9000]]
MEAN, STD = [0.5, 0.4, 0.3, 0.45, 0.5, 0.35], [0.25, 0.2, 0.3, 0.2, 0.25, 0.3]
WEIGHTS = np.array([[2.0, -1.0, 0.5, 0.3, -0.2, 0.1],
                    [-1.0, 2.0, -0.5, 0.1, 0.4, -0.3],
                    [0.3, 0.2, 1.5, -0.4, 0.2, 0.6]], np.float32)
BIAS = np.array([0.1, -0.2, 0.0], np.float32)
CARD = {"classes": [{"name": "water", "color": [0, 0, 255]}, {"name": "field", "color": [0, 255, 0]},
                    {"name": "town", "color": [255, 0, 0]}],
        "bands": ["swir", "nir", "green", "coastal", "red", "blue"],
        "normalization": {"mean": MEAN, "std": STD}, "output": "logits"}


def write_six_band_tiff(root: Path, h: int = 300, w: int = 340) -> np.ndarray:
    """A 6-sample uint16 tiled TIFF (``(y, x, s)``, one IFD); returns its ``(6, H, W)`` pixels."""
    rng = np.random.default_rng(3)
    data = rng.integers(0, 9000, (h, w, 6), dtype=np.uint16)
    data[: h // 2, : w // 2] = [300, 4000, 800, 200, 1000, 5000]  # a flat region too
    root.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "scene.tif", data, photometric="minisblack", planarconfig="contig", tile=(128, 128))
    return np.moveaxis(data, -1, 0)


def onnx_six_band(path: Path) -> Path:
    """A per-pixel network of 6 input bands (one Conv node), its card in ``metadata_props``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(WEIGHTS[:, :, None, None], "W")
    b = numpy_helper.from_array(BIAS, "B")
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 6, "H", "W"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, "H", "W"])
    graph = helper.make_graph([helper.make_node("Conv", ["image", "W", "B"], ["logits"])], "sixband", [image], [logits],
                              [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {CARD_KEY: json.dumps(CARD)})
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def expected_labels(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, clear): the per-pixel argmax of the network on the selected, scaled bands, and where its top two
    logits are apart (no float tie)."""
    x = to_uint8(pixels, tuple(map(tuple, RANGES)), tuple(BANDS)).astype(np.float64) / 255
    x = (x - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    logits = np.einsum("kc,chw->khw", WEIGHTS.astype(np.float64), x) + BIAS[:, None, None]
    top2 = np.sort(logits, axis=0)[-2:]
    return logits.argmax(0), (top2[1] - top2[0]) > 1e-3


def write_spec(tmp_path: Path, model: dict, bands=BANDS, ranges=RANGES) -> str:
    spec = spec_dict(str(tmp_path / "in"), str(tmp_path / "out"))
    spec["inputs"].update({"bands": bands, "value_range": ranges})
    spec["model"] = {"precision": "fp32", **model}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def labels_of(tmp_path: Path) -> np.ndarray:
    return zarr.open_array(str(tmp_path / "out" / "scene.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]


def test_a_six_band_tiff_runs_through_a_six_band_onnx_model(tmp_path, ray_cluster, capsys):
    pixels = write_six_band_tiff(tmp_path / "in")
    spec = write_spec(tmp_path, {"checkpoint": str(onnx_six_band(tmp_path / "six.onnx"))})
    assert cli_main(["run", spec]) == 0, capsys.readouterr().err
    want, clear = expected_labels(pixels)
    got = labels_of(tmp_path)
    assert clear.mean() > 0.99
    assert (got[clear] == want[clear]).all()


def test_a_band_count_the_model_does_not_take_is_exit_2_before_any_worker(tmp_path, ray_cluster, capsys):
    write_six_band_tiff(tmp_path / "in")
    model = tmp_path / "six.onnx"
    spec = write_spec(tmp_path, {"checkpoint": str(onnx_six_band(model))}, bands=[0, 1, 2], ranges=RANGES[:3])
    assert cli_main(["run", spec]) == 2
    err = capsys.readouterr().err
    assert "inputs.bands" in err and str(model) in err and "6 input bands" in err and "feeds 3 band(s)" in err
    assert not (tmp_path / "out" / "scene.zarr").exists()
    # a gigaseg network of 6 input bands on an RGB job: the same, naming the checkpoint
    from models.checkpoint import seeded_checkpoint

    ckpt = tmp_path / "six.safetensors"
    ckpt.write_bytes(seeded_checkpoint("fpn_resnet10", 3, ["a", "b", "c"], width=8, in_channels=6))
    spec = spec_dict(str(tmp_path / "in"), str(tmp_path / "out"))
    spec["model"] = {"checkpoint": str(ckpt)}
    path = tmp_path / "rgb.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "inputs.bands" in err and str(ckpt) in err and "6 input band(s)" in err


@pytest.mark.parametrize("framework", ["magnet", "fctl"])
def test_magnet_and_fctl_read_every_selected_band_at_every_level(tmp_path, ray_cluster, framework):
    """MagNet (coarser levels built from the selected bands) with the 6-band ONNX model, FCtL (context windows of
    6 bands) with a seeded gigaseg network of 6 input channels."""
    pixels = write_six_band_tiff(tmp_path / "in")
    if framework == "magnet":
        model = {"checkpoint": str(onnx_six_band(tmp_path / "six.onnx")), "framework": "magnet",
                 "magnet": {"scales": 2, "refiner_width": 8}}
    else:
        model = {"name": "fpn_resnet10", "width": 8, "classes": [{"name": n} for n in "abc"], "framework": "fctl",
                 "fctl": {"contexts": [2], "gamma": 0.5}}
    assert cli_main(["run", write_spec(tmp_path, model)]) == 0
    assert labels_of(tmp_path).shape == pixels.shape[1:]
    level1 = zarr.open_array(str(tmp_path / "out" / "scene.zarr" / "1"), mode="r")  # built, of the selected bands
    assert level1.shape == (6, 150, 170)
