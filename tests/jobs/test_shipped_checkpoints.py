"""The checkpoints shipped in ``jobs/checkpoints/`` (what ``gigaseg demo`` runs): they load, and MagNet with
PointRend built from them segments a generated scene they were never trained on to at least a stated mIoU.

No Ray: ``pipeline.frameworks.magnet_maps.whole_image`` is the algorithm the tiled run matches (tests/pipeline/test_magnet.py),
run on two 1280² synthetic images whose seeds are neither training nor demo seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from jobs.demo import MAGNET_SCALES, REFINER, SEGMENTER, demo_spec, make_archive
from jobs.spec import parse_spec
from models.checkpoint import load_checkpoint
from models.magnet import load_refiner
from pipeline.evaluation.metrics import iou_per_class, mean_iou
from pipeline.frameworks.magnet_maps import MagnetConfig, whole_image
from pipeline.pyramid import downsample_mean2, level_shapes
from pipeline.synth import CLASSES, SynthConfig, image_and_labels

SIDE = 1280  # 4 pyramid levels (1280 … 160), as MagNet's 4 scales need
# Scenes whose seeds are neither training nor demo seeds → (least mIoU, least pixel accuracy). Measured with
# the shipped checkpoints (jobs/checkpoints/README.md): seed 16 (bare 16 %, field-hedged 81 %, hedges, roads,
# buildings) mIoU 0.351, pixel accuracy 0.227: hedges 0.81, roads 0.22, buildings 0.09, but the field-hedged
# area is taken for its look-alike field-open (IoU 0.07) — its regions are 2048 px, wider than this 1280² scene,
# so the rim that tells them apart may not be in the image at all; seed 19 (bare and forest) mIoU 0.474,
# accuracy 0.980. Bounds leave margin for other torch builds; a retrained checkpoint must restate them.
SCENES = {16: (0.28, 0.15), 19: (0.38, 0.9)}


def confusion(pred: np.ndarray, gt: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(gt.ravel().astype(np.int64) * k + pred.ravel(), minlength=k * k).reshape(k, k)


@pytest.fixture(scope="module", params=sorted(SCENES))
def magnet_masks(request):
    image, labels = image_and_labels(SynthConfig(height=SIDE, width=SIDE, seed=request.param), 0, 0, SIDE, SIDE)
    levels = [image]
    for _ in level_shapes((SIDE, SIDE))[1:]:
        levels.append(downsample_mean2(levels[-1]))
    segmenter, info = load_checkpoint(SEGMENTER.read_bytes())
    refiner = load_refiner(REFINER.read_bytes(), info.config.num_classes)
    torch.manual_seed(0)
    with torch.inference_mode():
        probs = whole_image(levels, segmenter, refiner, MagnetConfig(scales=MAGNET_SCALES), margin=64,
                            normalization=info.normalization)
    return info, probs.argmax(0).astype(np.int64), labels, SCENES[request.param]


def test_the_shipped_checkpoints_are_small_and_describe_the_synth_classes():
    assert SEGMENTER.stat().st_size + REFINER.stat().st_size < 20 * 2**20
    info = load_checkpoint(SEGMENTER.read_bytes())[1]
    assert list(info.class_names) == [n for n, _ in CLASSES]
    assert info.config.refine == "pointrend"  # the demo's headline path: MagNet with PointRend


def test_magnet_with_pointrend_reaches_the_stated_miou_on_an_unseen_scene(magnet_masks):
    info, pred, labels, (min_miou, min_accuracy) = magnet_masks
    cm = confusion(pred, labels, info.config.num_classes)
    miou, iou = mean_iou(cm, []), iou_per_class(cm)
    accuracy = np.trace(cm) / cm.sum()
    assert miou >= min_miou, f"mIoU {miou:.3f} < {min_miou} (per class {np.round(iou, 3).tolist()})"
    assert accuracy >= min_accuracy, f"pixel accuracy {accuracy:.3f} < {min_accuracy}"


def test_the_demo_spec_runs_the_shipped_checkpoints(tmp_path):
    images = make_archive(tmp_path, large=1088)
    spec = parse_spec(yaml.safe_load(yaml.safe_dump(demo_spec(tmp_path))), "demo")
    assert spec.model.framework == "magnet" and spec.model.checkpoint == str(SEGMENTER)
    assert spec.model.magnet.refiner == str(REFINER) and spec.model.magnet.scales == MAGNET_SCALES
    assert {p.suffix for p in (tmp_path / "archive").rglob("*") if p.suffix} >= {".zarr", ".tif", ".png", ".jpg"}
    for im in images:  # each image has its ground truth, the image's size, and more than one class
        truth = np.asarray(Image.open(tmp_path / "truth" / f"{im.name}.png"))
        assert truth.shape == (im.height, im.width) and len(np.unique(truth)) > 1
        assert len(level_shapes((im.height, im.width))) >= MAGNET_SCALES, "MagNet's scales need as many levels"
