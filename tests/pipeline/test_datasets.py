"""Training datasets: importing generated colour-coded and integer mask pairs, dataset.json, label pyramids."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.blend import mode_2x2
from pipeline.errors import InputNotFoundError, OutputConflictError, UnsupportedImageError
from pipeline.evaluation.palette import DEEPGLOBE_CLASSES
from pipeline.training.dataset_import import import_pairs
from pipeline.training.dataset_pairs import match_pairs
from pipeline.training.datasets import TrainingDataset, read_dataset

COLORS = np.array([c for _, c in DEEPGLOBE_CLASSES], np.uint8)


def class_blocks(rng, h, w, k, block=8):
    """Class ids ``(h, w)``: random classes in ``block``-pixel squares."""
    ids = rng.integers(0, k, (h // block + 1, w // block + 1))
    return np.repeat(np.repeat(ids, block, 0), block, 1)[:h, :w].astype(np.uint8)


def image_of(rng, ids, k):
    """RGB that a small network learns to segment: a colour per class plus noise."""
    ids = ids.astype(np.int16)
    base = np.stack([(ids * 97) % 256, (ids * 53 + 40) % 256, (255 - ids * 71) % 256], -1)
    return np.clip(base.astype(np.int16) + rng.integers(-20, 21, (*ids.shape, 3)), 0, 255).astype(np.uint8)


def write_pairs(folder: Path, sizes, *, kind="palette", k=7, seed=0, image_pattern="{id}_sat.png",
                mask_pattern="{id}_mask.png", prefix="s") -> dict[str, np.ndarray]:
    """Image/mask PNG pairs under ``folder``; returns the class ids per id. Palette masks use the
    DeepGlobe colours, blurred (channels ≠ 0/255) on the first rows, as DeepGlobe's edges are."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (h, w) in enumerate(sizes):
        ids = class_blocks(rng, h, w, k)
        Image.fromarray(image_of(rng, ids, k)).save(folder / image_pattern.format(id=f"{prefix}{i}"))
        if kind == "palette":
            rgb = COLORS[ids].copy()
            rgb[:2] = np.where(rgb[:2] > 127, 200, 60)  # still binarises to the same class
            Image.fromarray(rgb).save(folder / mask_pattern.format(id=f"{prefix}{i}"))
        else:
            Image.fromarray(ids, mode="L").save(folder / mask_pattern.format(id=f"{prefix}{i}"))
        out[f"{prefix}{i}"] = ids
    return out


def test_palette_import_round_trip(tmp_path):
    truth = write_pairs(tmp_path / "src", [(150, 130), (90, 200)])
    red = np.array(Image.open(tmp_path / "src" / "s1_mask.png"))
    red[50:52, 10:14] = (255, 0, 0)  # no DeepGlobe class is red: ignored
    Image.fromarray(red).save(tmp_path / "src" / "s1_mask.png")
    truth["s1"][50:52, 10:14] = 255

    info = import_pairs(str(tmp_path / "src"), str(tmp_path / "ds"), image_pattern="{id}_sat.png", chunk=64,
                        min_size=32)
    assert info.images == ("s0", "s1") and info.class_names == tuple(n for n, _ in DEEPGLOBE_CLASSES)

    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["ignore_index"] == 255 and meta["images"] == ["s0", "s1"]
    assert [c["color"] for c in meta["classes"]] == COLORS.tolist()
    valid = np.concatenate([t[t != 255] for t in truth.values()])
    assert meta["class_pixels"] == np.bincount(valid, minlength=7).tolist()
    pixels = np.concatenate([np.asarray(Image.open(tmp_path / "src" / f"{n}_sat.png")).reshape(-1, 3) / 255.0
                             for n in truth])
    np.testing.assert_allclose(meta["normalization"]["mean"], pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(meta["normalization"]["std"], pixels.std(0), atol=1e-5)

    ds = TrainingDataset(str(tmp_path / "ds"))
    for name, ids in truth.items():
        shapes = ds.shapes(name)
        assert shapes[0] == ids.shape and len(shapes) == 4  # 150 → 75 → 38 → 19 (≤ 32)
        np.testing.assert_array_equal(ds.mask_level(name, 0)[:], ids)
        for level in range(1, len(shapes)):
            m = ds.mask_level(name, level)[:]
            assert m.shape == shapes[level] == ds.image_level(name, level).shape[1:]
            np.testing.assert_array_equal(m, mode_2x2(ds.mask_level(name, level - 1)[:]))
    labels = zarr.open_group(str(tmp_path / "ds" / "s0.zarr" / "labels" / "mask"), mode="r").attrs.asdict()
    assert labels["ome"]["image-label"]["properties"][4] == {"label-value": 4, "name": "forest"}
    assert len(labels["ome"]["multiscales"][0]["datasets"]) == 4


def test_index_masks_add_to_a_dataset_and_rerun_keeps_it(tmp_path, caplog):
    classes = ["background", "road", "building"]
    truth = write_pairs(tmp_path / "a", [(64, 80)], kind="index", k=3, mask_pattern="{id}_label.png")
    info = import_pairs(str(tmp_path / "a"), str(tmp_path / "ds"), image_pattern="{id}_sat.png",
                        mask_pattern="{id}_label.png", classes=classes, mask_kind="index", min_size=16)
    assert info.class_colors[0] != info.class_colors[1]  # default colours for an index dataset
    np.testing.assert_array_equal(TrainingDataset(str(tmp_path / "ds")).mask_level("s0", 0)[:], truth["s0"])

    index = dict(classes=classes, mask_kind="index", min_size=16)
    write_pairs(tmp_path / "b", [(40, 40), (48, 30)], kind="index", k=3, seed=5, prefix="t")
    info = import_pairs(str(tmp_path / "b"), str(tmp_path / "ds"), image_pattern="{id}_sat.png", **index)
    assert info.images == ("s0", "t0", "t1")  # added to the dataset
    assert sum(info.class_pixels) == 64 * 80 + 40 * 40 + 48 * 30

    caplog.set_level("INFO", "pipeline.training.dataset_import")
    again = import_pairs(str(tmp_path / "a"), str(tmp_path / "ds"), image_pattern="{id}_sat.png",
                         mask_pattern="{id}_label.png", **index)
    assert "s0: already imported, kept" in caplog.text and again == info

    write_pairs(tmp_path / "c", [(40, 40)], kind="index", k=3, seed=6)  # another "s0"
    with pytest.raises(OutputConflictError, match="s0.zarr holds a sample imported from"):
        import_pairs(str(tmp_path / "c"), str(tmp_path / "ds"), image_pattern="{id}_sat.png", **index)

    with pytest.raises(OutputConflictError, match="holds a dataset with classes"):
        import_pairs(str(tmp_path / "a"), str(tmp_path / "ds"), image_pattern="{id}_sat.png",
                     mask_pattern="{id}_label.png", classes=["x", "y"], mask_kind="index")


def test_index_mask_with_unknown_ids_is_refused(tmp_path):
    write_pairs(tmp_path / "src", [(32, 32)], kind="index", k=5)
    with pytest.raises(UnsupportedImageError, match=r"holds ids \[3, 4\].*outside the 3 classes"):
        import_pairs(str(tmp_path / "src"), str(tmp_path / "ds"), image_pattern="{id}_sat.png",
                     classes=["a", "b", "c"], mask_kind="index")
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_pairing_rules_and_missing_masks(tmp_path):
    write_pairs(tmp_path / "img", [(16, 16), (16, 16)], image_pattern="{id}_sat.png", mask_pattern="{id}_m.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "img" / "s0_m.png").rename(tmp_path / "masks" / "s0_m.png")
    with pytest.raises(InputNotFoundError, match=r"1 image\(s\) .* have no mask .*s1_m.png"):
        match_pairs(str(tmp_path / "img"), str(tmp_path / "masks"), image_pattern="{id}_sat.png",
                    mask_pattern="{id}_m.png")
    (tmp_path / "img" / "s1_m.png").rename(tmp_path / "masks" / "s1_m.png")
    pairs = match_pairs(str(tmp_path / "img"), str(tmp_path / "masks"), image_pattern="{id}_sat.png",
                        mask_pattern="{id}_m.png")
    assert [(p.name, Path(p.mask.url).name) for p in pairs] == [("s0", "s0_m.png"), ("s1", "s1_m.png")]
    with pytest.raises(ValueError, match="exactly once"):
        match_pairs(str(tmp_path / "img"), image_pattern="sat.png")


def test_read_dataset_explains_a_missing_dataset(tmp_path):
    with pytest.raises(InputNotFoundError, match="no dataset.json.*import-pairs"):
        read_dataset(str(tmp_path))


def test_cmd_import(tmp_path, capsys):
    from jobs.train.cli import add_import_parser

    write_pairs(tmp_path / "src", [(24, 24)])
    parser = argparse.ArgumentParser()
    add_import_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["import-pairs", str(tmp_path / "src"), str(tmp_path / "ds"), "--palette", "deepglobe",
                              "--image-pattern", "{id}_sat.png"])
    assert args.func(args) == 0
    assert "1 image(s)" in capsys.readouterr().out
    args = parser.parse_args(["import-pairs", str(tmp_path / "src"), str(tmp_path / "ds2"),
                              "--image-pattern", "{id}_sat.png"])
    assert args.func(args) == 2
    assert "name the classes" in capsys.readouterr().err
    args = parser.parse_args(["import-pairs", str(tmp_path / "src"), str(tmp_path / "ds3"), "--class", "a:0,0,0",
                              "--class", "b:0,255,255", "--image-pattern", "{id}_sat.png"])
    assert args.func(args) == 0
    assert read_dataset(str(tmp_path / "ds3")).class_names == ("a", "b")
