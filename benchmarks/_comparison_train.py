"""Training half of ``benchmarks.context_comparison``: the archive, the training dataset and one ``gigaseg train``
run per trained model, each through the CLI as a subprocess (so each step can be repeated by hand).

Budget rule (the table's notes repeat it): every segmenter — the resize-only one, the patch-only one (also
FCtL's local model), MagNet's, and each PointRend variant — takes the same ``steps × batch`` crops of
``crop²`` pixels, the same optimiser, schedule and seed; they differ only in ``crops.scales`` (the windows the
crops cover) and ``model.refine``. The methods' own extra stages take ``stage_steps`` steps each on the same
crop size: MagNet's refiner (one per segmenter it refines), FCtL's two context segmenters and its fused stage.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FAST_RAY_TRAIN = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@dataclass(frozen=True)
class Budget:
    """What every trained model gets; ``image`` is the training images' side (the resize-only crop covers it)."""

    steps: int = 400
    stage_steps: int = 200
    batch: int = 8
    crop: int = 256
    width: int = 16
    model: str = "fpn_resnet18"
    lr: float = 2e-3
    image: int = 2448
    magnet_scales: int = 4
    point_channels: int = 64
    fctl_contexts: tuple[float, ...] = (2.0, 4.0)
    class_weights: str = "median_frequency"  # loss.class_weights of every run but the refiner's ("none": unweighted)
    precise_bn_batches: int = 16  # BatchNorm statistics recomputed after every epoch (models.precise_bn)
    refiner_residual: bool = True  # MagNet's refiner adds log O and starts as the fine prediction (False: reference's)

    @property
    def resize_scale(self) -> float:
        """Crop scale whose window is the whole image: the network sees it downsampled to ``crop``²."""
        return self.image / self.crop

    @property
    def magnet_crop_scales(self) -> list[float]:
        """MagNet trains its segmenter on every level it runs at: windows of ``crop · 2^l``, l = 0 … scales−1."""
        return [float(2**level) for level in range(self.magnet_scales)]


@dataclass
class Trained:
    name: str
    url: str  # model.safetensors / refiner.safetensors
    seconds: float
    steps: int
    spec: dict[str, Any] = field(repr=False, default_factory=dict)


def _common(budget: Budget, dataset: str, out: Path, steps: int, classes_excluded: list[str]) -> dict[str, Any]:
    per_epoch = max(1, steps // 2)
    return {
        "dataset": {"url": dataset, "validation": {"exclude_classes": classes_excluded}},
        "crops": {"size": budget.crop, "batches_per_epoch": per_epoch, "batch_size": budget.batch},
        "augment": {"flips": True, "rot90": True},
        "optimizer": {"name": "adamw", "lr": budget.lr, "weight_decay": 1e-4},
        "schedule": {"name": "poly", "power": 0.9, "warmup_steps": min(5, steps // 10)},
        "epochs": max(1, steps // per_epoch),
        "workers": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 2, "torch_threads": 2},
        "output": {"url": str(out), "if_exists": "overwrite", "keep_last": 1},
        "loss": {"class_weights": budget.class_weights},  # the name: each task's default (CE, OHEM, focal)
        "precise_bn_batches": budget.precise_bn_batches,
        "seed": 0,
    }


def segmenter_spec(budget: Budget, dataset: str, out: Path, scales: list[float], pointrend: bool,
                   exclude: list[str]) -> dict[str, Any]:
    spec = _common(budget, dataset, out, budget.steps, exclude)
    spec["model"] = {"name": budget.model, "width": budget.width}
    if pointrend:
        spec["model"].update(refine="pointrend", point_channels=budget.point_channels)
    spec["crops"]["scales"] = scales
    spec["loss"]["name"] = "ce"
    return spec


def refiner_spec(budget: Budget, dataset: str, out: Path, segmenter: str, exclude: list[str]) -> dict[str, Any]:
    spec = _common(budget, dataset, out, budget.stage_steps, exclude)
    spec.update(task="magnet_refiner", refiner={"segmenter": segmenter, "width": budget.width,
                                                "scales": budget.magnet_scales, "residual": budget.refiner_residual})
    # OHEM already trains on the hard pixels; class weights on top made the 50-step refiner paint buildings
    # and field-open everywhere (MagNet 25.3 against 34.7 mIoU unweighted, RESULTS.md)
    spec["loss"] = {"class_weights": "none"}
    return spec


def fctl_spec(budget: Budget, dataset: str, out: Path, local: str, exclude: list[str], *, factor: float | None = None,
              contexts: list[str] | None = None) -> dict[str, Any]:
    spec = _common(budget, dataset, out, budget.stage_steps, exclude)
    if factor is not None:
        spec["fctl"] = {"stage": "context", "local": local, "factor": factor}
    else:
        spec["fctl"] = {"stage": "fused", "local": local, "contexts": list(budget.fctl_contexts),
                        "context_checkpoints": contexts}
    spec["task"] = "fctl"
    return spec


def train(name: str, spec: dict[str, Any], work: Path, commands: list[str], product: str = "model.safetensors",
          reuse: bool = True) -> Trained:
    """``gigaseg train`` of ``spec`` (written to ``work/specs/train-<name>.yaml``); reused when already done."""
    import os

    out = Path(spec["output"]["url"])
    path = work / "specs" / f"train-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = out / "done.json"
    steps = spec["epochs"] * spec["crops"]["batches_per_epoch"]
    commands.append(shlex.join(["gigaseg", "train", str(path)]))
    if reuse and done.exists() and json.loads(done.read_text()).get("spec") == spec:
        seconds = json.loads(done.read_text())["seconds"]
        print(f"  {name}: reused ({seconds:.0f} s when trained)", flush=True)
        return Trained(name, str(out / product), seconds, steps, spec)
    log = work / "logs" / f"train-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {name}: training {steps} steps ...", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call([sys.executable, "-m", "jobs.cli", "train", str(path)], stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, **FAST_RAY_TRAIN})
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"gigaseg train {path} failed (exit {rc}); see {log}")
    done.write_text(json.dumps({"spec": spec, "seconds": seconds}))
    print(f"  {name}: {seconds:.0f} s", flush=True)
    return Trained(name, str(out / product), seconds, steps, spec)


def train_all(budget: Budget, dataset: str, work: Path, methods: list[str], exclude: list[str],
              commands: list[str]) -> dict[str, Trained]:
    """Every model the ``methods`` need, in dependency order; keys as ``_comparison_run.METHODS`` reads them."""
    t, out = {}, work / "train"
    need = set(methods)
    if need & {"patch", "fctl"}:
        t["patch"] = train("patch", segmenter_spec(budget, dataset, out / "patch", [1.0], False, exclude), work,
                           commands)
    if "resize" in need:
        t["resize"] = train("resize", segmenter_spec(budget, dataset, out / "resize", [budget.resize_scale], False,
                                                     exclude), work, commands)
    for key, pr in (("magnet", False), ("magnet+pointrend", True)):
        if key in need:
            seg = train(f"{key}-segmenter", segmenter_spec(budget, dataset, out / f"{key}-segmenter",
                                                           budget.magnet_crop_scales, pr, exclude), work, commands)
            t[f"{key}-segmenter"] = seg
            t[f"{key}-refiner"] = train(f"{key}-refiner", refiner_spec(budget, dataset, out / f"{key}-refiner", seg.url,
                                                                       exclude), work, commands, "refiner.safetensors")
    if "fctl" in need:
        local = t["patch"].url
        ctx = [train(f"fctl-context-{f:g}", fctl_spec(budget, dataset, out / f"fctl-context-{f:g}", local, exclude,
                                                    factor=float(f)), work, commands) for f in budget.fctl_contexts]
        t.update({c.name: c for c in ctx})
        t["fctl"] = train("fctl-fused", fctl_spec(budget, dataset, out / "fctl-fused", local, exclude,
                                                  contexts=[c.url for c in ctx]), work, commands)
    if need & {"patch+pointrend", "fctl+pointrend"}:
        t["patch+pointrend"] = train("patch+pointrend", segmenter_spec(budget, dataset, out / "patch+pointrend", [1.0],
                                                                       True, exclude), work, commands)
    if "fctl+pointrend" in need:  # FCtL around the PointRend local model: its point head refines the fused features
        local = t["patch+pointrend"].url
        ctx = [train(f"fctl+pointrend-context-{f:g}", fctl_spec(budget, dataset, out / f"fctl+pointrend-context-{f:g}",
                                                              local, exclude, factor=float(f)), work, commands)
               for f in budget.fctl_contexts]
        t.update({c.name: c for c in ctx})
        t["fctl+pointrend"] = train("fctl+pointrend-fused", fctl_spec(budget, dataset, out / "fctl+pointrend-fused",
                                                                      local, exclude, contexts=[c.url for c in ctx]),
                                    work, commands)
    return t
