"""``gigaseg import-checkpoint``: reference files in, gigaseg checkpoints out (exit 0), or one line naming what
was not recognised (exit 2)."""

from __future__ import annotations

import json

import torch

from jobs.cli import main
from models.card import CARD_KEY
from models.checkpoint import _read_header, load_checkpoint
from models.fctl_checkpoint import read_fctl_info
from models.magnet import load_refiner
from models.reference.imports import SOURCE_KEY
from tests.models.reference_layouts import fctl_shapes, magnet_fpn_shapes, magnet_refiner_shapes, materialise


def _save(path, state):
    torch.save(state, path)
    return str(path)


def test_magnet_import_writes_a_folder_a_job_spec_reads(tmp_path, capsys):
    seg = _save(tmp_path / "deepglobe_fpn.pth", materialise(magnet_fpn_shapes(7, 8), seed=1))
    ref = _save(tmp_path / "deepglobe_refinement.pth", materialise(magnet_refiner_shapes(7, 8), seed=2))
    out = tmp_path / "magnet"
    assert main(["import-checkpoint", "--from", "magnet", seg, ref, str(out)]) == 0
    printed = capsys.readouterr().out
    assert "344 tensors converted" in printed and "1 set aside: the training loss's own tensors" in printed
    assert f"refiner: {out / 'refiner.safetensors'}" in printed and "procedure: reference" in printed
    data = (out / "segmenter.safetensors").read_bytes()
    _, info = load_checkpoint(data)
    assert info.class_names[1] == "urban" and info.class_colors[1] == (0, 255, 255)  # 7 classes: DeepGlobe
    metadata = _read_header(data)["__metadata__"]
    assert json.loads(metadata[CARD_KEY])["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert json.loads(metadata[SOURCE_KEY])["files"][0]["name"] == seg
    load_refiner((out / "refiner.safetensors").read_bytes(), 7)


def test_fctl_import_with_named_classes_and_contexts(tmp_path, capsys):
    paths = []
    for name, mode, seed in (("all", 3, 3), ("B10", 2, 4), ("B15", 2, 5)):
        shapes, aliases = fctl_shapes(mode, 3, 8)
        paths.append(_save(tmp_path / f"{name}.epoch.pth", materialise(shapes, seed, aliases)))
    out = tmp_path / "fctl.safetensors"
    args = ["import-checkpoint", "--from", "fctl", "--contexts", "2,4", "--class", "sky:0,0,255", "--class",
            "roof:255,0,0", "--class", "tree:0,255,0", *paths, str(out)]
    assert main(args) == 0
    info, config = read_fctl_info(out.read_bytes())
    assert info.class_names == ("sky", "roof", "tree") and config.contexts == (2.0, 4.0)
    assert info.normalization.std == (1.0, 1.0, 1.0)
    assert "framework: fctl" in capsys.readouterr().out


def test_unrecognised_file_exits_2_with_one_line(tmp_path, capsys):
    state = materialise(magnet_refiner_shapes(7, 8))
    state["extra.weight"] = torch.zeros(1)
    ref = _save(tmp_path / "refinement.pth", state)
    assert main(["import-checkpoint", "--from", "magnet", ref, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 unexpected key(s): extra.weight" in err[0]
    assert not (tmp_path / "out").exists()
    assert main(["import-checkpoint", "--from", "magnet", str(tmp_path / "nope.pth"), str(tmp_path / "o")]) == 2
    seg = _save(tmp_path / "fpn.pth", materialise(magnet_fpn_shapes(5, 8)))
    assert main(["import-checkpoint", "--from", "magnet", seg, str(tmp_path / "o")]) == 2
    assert "predict 5 classes: name them with --class" in capsys.readouterr().err
