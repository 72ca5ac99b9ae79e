"""``gigaseg train SPEC``: data-parallel training with Ray Train, resumable from per-epoch checkpoints.

Three tasks: ``segmenter`` (the default) trains ``model.*`` (with ``model.refine: pointrend``, a PointRend:
``jobs.train_pointrend``); ``magnet_refiner`` trains MagNet's refiner with the segmenter of ``refiner.segmenter``
frozen (``jobs.train_refiner``); ``fctl`` runs one stage of FCtL's staged training (``jobs.train_fctl``, whose
docstring gives the three commands). Output layout (any fsspec URL)::

    <out>/epoch-NNN/model.safetensors   gigaseg checkpoint: weights, config, classes, colours, normalisation
                                        (refiner.safetensors for the refiner: ``models.magnet.save_refiner``;
                                        an FCtL checkpoint for fctl stage fused: ``save_fctl``)
    <out>/epoch-NNN/state.pt            optimiser, scheduler, epoch, step, history (torch.save; read back
                                        with torch.load(weights_only=True): plain tensors and containers)
    <out>/latest.json                   the last complete epoch, written after its files: a killed run resumes
                                        from it, whatever else it left behind
    <out>/history.json, curves.png      metrics per epoch
    <out>/model.safetensors             the final weights, usable as ``model.checkpoint`` of ``gigaseg run``
    <out>/refiner.safetensors           (refiner task) usable as ``model.magnet.refiner`` of ``gigaseg run``
    <out>/_ray/                         Ray Train's own run state

The driver checks the spec against the dataset (and the checkpoints it names), starts (or joins) Ray and
runs a ``TorchTrainer`` whose workers run ``jobs.train_loop.train_worker``; rank 0 writes the checkpoints
(``jobs.train_store.CheckpointStore``) and sends progress to the driver through a Ray queue.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from jobs.train_loop import Plan, init_weights, lr_factor, train_worker, weights_name
from jobs.train_spec import TrainSpec, load_train_spec
from jobs.train_store import CURVES, HISTORY, CheckpointStore, read_url
from pipeline.errors import CheckpointError, GigasegError, OutputConflictError

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # read when ray.train is first imported

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_SPEC = 0, 1, 2


@dataclass(frozen=True)
class TrainResult:
    output_url: str
    model_url: str  # the final weights: model.safetensors, or refiner.safetensors for the refiner
    start_epoch: int  # first epoch this call trained (epochs + 1 when there was nothing left)
    last_epoch: int
    history: dict[str, list]
    seconds: float


# ---------------------------------------------------------------- driver


def train(spec: TrainSpec, *, progress: bool = True) -> TrainResult:
    """Train as ``spec`` says, resuming from ``<output>/latest.json`` when it is there; see the module doc."""
    from pipeline.storage import join

    t0 = time.monotonic()
    spec = _absolute(spec)
    out = CheckpointStore(spec.output.url, spec.output.storage_options, weights=weights_name(spec))
    plan = make_plan(spec)
    if spec.output.if_exists == "overwrite":
        out.clear()
    latest = out.latest()
    _check_resumable(latest, plan, spec.output.url)
    start = latest["epoch"] + 1 if latest else 1
    if start > spec.epochs and out.exists(out.weights):
        log.info("%s: all %d epochs done already", spec.output.url, latest["epoch"])
    else:
        if latest:
            log.info("resuming from epoch %d of %d (%s)", latest["epoch"], spec.epochs, spec.output.url)
        _run_trainer(spec, plan, progress)
    latest = out.latest() or {"epoch": 0}
    return TrainResult(spec.output.url, join(spec.output.url, out.weights), start, latest["epoch"],
                       out.read_json(HISTORY) or {}, time.monotonic() - t0)


def _absolute(spec: TrainSpec) -> TrainSpec:
    """Local paths made absolute: Ray Train workers run in their own working directory."""
    from pipeline.storage import is_local, local_path

    def fix(url):
        return os.path.abspath(local_path(url)) if url and is_local(url) else url

    data = spec.model_dump()
    data["dataset"]["url"] = fix(spec.dataset.url)
    data["output"]["url"] = fix(spec.output.url)
    data["model"]["init"] = fix(spec.model.init)
    if spec.refiner:
        data["refiner"]["segmenter"] = fix(spec.refiner.segmenter)
    if spec.fctl:
        data["fctl"]["local"] = fix(spec.fctl.local)
        if spec.fctl.context_checkpoints:
            data["fctl"]["context_checkpoints"] = [fix(u) for u in spec.fctl.context_checkpoints]
    return TrainSpec.model_validate(data)


def make_plan(spec: TrainSpec) -> Plan:
    """Check the spec against the dataset (and the checkpoints it names); ``SpecError`` lists every problem."""
    from jobs.spec import SpecError
    from pipeline.datasets import read_dataset

    info = read_dataset(spec.dataset.url, spec.dataset.storage_options)
    v = spec.dataset.validation
    names = sorted(info.images)
    problems = []
    if v.names:
        unknown = sorted(set(v.names) - set(names))
        if unknown:
            problems.append(f"dataset.validation.names: {unknown} are not images of {info.url} ({names[:10]})")
        val = sorted(set(v.names) & set(names))
    elif v.fraction:
        order = np.random.default_rng(spec.seed).permutation(len(names))
        val = sorted(names[i] for i in order[: math.ceil(v.fraction * len(names))])
    else:
        val = []
    train_names = [n for n in names if n not in val]
    if not train_names:
        problems.append("dataset.validation: no image left to train on; hold out fewer images")
    bad = sorted(set(v.exclude_classes) - set(info.class_names))
    if bad:
        problems.append(f"dataset.validation.exclude_classes: {bad} are not classes ({list(info.class_names)})")
    if spec.task == "magnet_refiner":
        model, normalization = _refiner_model(spec, info, problems)
    elif spec.task == "fctl":
        from jobs.train_fctl import fctl_plan

        model, normalization = fctl_plan(spec, info, problems)
    else:
        model, normalization = _segmenter_model(spec, info, problems), info.normalization
    if problems:
        raise SpecError("spec", problems)
    return Plan(
        model=model, class_names=list(info.class_names),
        class_colors=[list(c) for c in info.class_colors], normalization=normalization,
        ignore_index=info.ignore_index if spec.loss.ignore_index is None else spec.loss.ignore_index,
        train_names=train_names, val_names=val,
        exclude_classes=[info.class_names.index(c) for c in v.exclude_classes],
    )


def _segmenter_model(spec: TrainSpec, info, problems: list[str]) -> dict[str, Any]:
    """The ``ModelConfig`` dict of ``model.*`` (with ``refine``, the PointRend wrapped around it) for the dataset's
    classes, the init checkpoint checked."""
    from jobs.spec import SpecError
    from jobs.train_pointrend import model_config

    try:
        config = model_config(spec.model, info.num_classes)
    except ValueError as err:
        raise SpecError("spec", [*problems, str(err)]) from None
    if spec.model.init:
        try:
            init_weights(None, read_url(spec.model.init, spec.dataset.storage_options), config, info.class_names)
        except (CheckpointError, FileNotFoundError) as err:
            problems.append(f"model.init: {spec.model.init}: {err}")
    return config.to_dict()


def _refiner_model(spec: TrainSpec, info, problems: list[str]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The refiner's plan entry (the segmenter's hash in it, so a resume with another segmenter is refused)
    and the segmenter's normalisation, which both of its inputs get."""
    from models.checkpoint import read_info

    r = spec.refiner
    model = {"task": "magnet_refiner", "num_classes": info.num_classes, "width": r.width, "scales": r.scales}
    try:
        data = read_url(r.segmenter, spec.dataset.storage_options)
        seg = read_info(data)
    except FileNotFoundError:
        problems.append(f"refiner.segmenter: {r.segmenter} does not exist; point it at the model.safetensors "
                        "of a finished `gigaseg train` run")
        return model, info.normalization
    except CheckpointError as err:
        problems.append(f"refiner.segmenter: {r.segmenter}: {err}")
        return model, info.normalization
    if tuple(seg.class_names) != tuple(info.class_names):
        problems.append(
            f"refiner.segmenter: {r.segmenter} predicts {list(seg.class_names)} but the dataset's classes are "
            f"{list(info.class_names)}; the refiner learns the dataset's masks from the segmenter's "
            "probabilities, so train it on a dataset with the segmenter's class table")
    return {**model, "segmenter_sha256": hashlib.sha256(data).hexdigest()}, seg.normalization.to_dict()


def _check_resumable(latest: dict | None, plan: Plan, url: str) -> None:
    if latest and (latest.get("model") != plan.model or latest.get("class_names") != plan.class_names):
        raise OutputConflictError(
            f"{url} holds checkpoints of another model or class table ({latest.get('model')}, "
            f"{latest.get('class_names')}); set output.if_exists: overwrite to replace them, or choose another "
            "output.url"
        )


def _run_trainer(spec: TrainSpec, plan: Plan, progress: bool) -> None:
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from pipeline.cluster import start_ray

    w = spec.workers
    local_gpus = torch.cuda.device_count() if w.use_gpu is not False else 0
    session = start_ray(spec.cluster.address, num_cpus=w.num_workers * w.cpus_per_worker, num_gpus=local_gpus)
    try:
        use_gpu = w.use_gpu
        if use_gpu == "auto":
            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = gpus >= w.num_workers and bool(spec.cluster.address or torch.cuda.is_available())
        log.info("training on %d worker(s), %s", w.num_workers, "GPU" if use_gpu else "CPU")
        events = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"spec": spec.model_dump(mode="json"), "plan": asdict(plan), "events": events},
            scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": w.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}", **_ray_storage(spec),
                                 failure_config=FailureConfig(max_failures=w.max_failures)),
        )
        watcher = ProgressWatcher(events, spec.epochs, enabled=progress)
        watcher.start()
        try:
            trainer.fit()
        finally:
            watcher.stop()
            ray.kill(events.actor)
    finally:
        session.stop()


def _ray_storage(spec: TrainSpec) -> dict[str, Any]:
    """Ray Train keeps its run state under ``<output>/_ray`` (through fsspec for object stores)."""
    from pipeline.storage import filesystem, fs_path, is_local, join

    url = join(spec.output.url, "_ray")
    if is_local(url):
        return {"storage_path": fs_path(url)}
    import pyarrow.fs

    fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem(url, spec.output.storage_options)))
    return {"storage_path": fs_path(url), "storage_filesystem": fs}


class ProgressWatcher(threading.Thread):
    """Shows rank 0's progress events: a one-line bar on a terminal, log lines otherwise."""

    def __init__(self, events, epochs: int, enabled: bool = True, stream=None, interval: float = 10.0):
        super().__init__(daemon=True)
        self.events, self.epochs, self.enabled = events, epochs, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval, self._last = interval, 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll(timeout=0.5)

    def poll(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout)
        except Exception:  # noqa: BLE001 - ray.util.queue.Empty, or the queue actor is gone
            return
        if self.enabled:
            self.show(event)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        while self.enabled and not self.events.empty():
            self.poll(timeout=0.1)
        if self.tty:
            self.stream.write("\r\033[K")

    def show(self, e: dict[str, Any]) -> None:
        if e["kind"] == "epoch":
            if self.tty:
                self.stream.write("\r\033[K")
            m = e["metrics"]
            shown = ("train_point_loss", "val_loss", "miou", "pixel_accuracy", "segmenter_miou")
            extra = "".join(f"  {k} {m[k]:.4f}" for k in shown if m.get(k) is not None)
            log.info("epoch %d/%d: train_loss %.4f%s  %.1f crops/s  %.1f s", m["epoch"], self.epochs,
                     m["train_loss"], extra, m["crops_per_s"], m["seconds"])
            return
        done, total = e["step"], e["steps"]
        eta = (total - done) * e["elapsed"] / done if done else float("nan")
        bar = "#" * int(24 * done / total) + "-" * (24 - int(24 * done / total))
        line = (f"epoch {e['epoch']}/{self.epochs} [{bar}] {done}/{total} steps  loss {e['loss']:.4f}  "
                f"{e['crops_per_s']:.1f} crops/s  ETA {eta:.0f} s")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif time.monotonic() - self._last >= self.interval:
            log.info(line)
            self._last = time.monotonic()


# ---------------------------------------------------------------- command line


def _print_problems(err) -> None:
    for line in err.problems:
        print(f"error: {err.source}: {line}", file=sys.stderr)


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on a Zarr training dataset (exit 0 ok, 1 failed, 2 bad spec)")
    p.add_argument("spec", help="training spec (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set workers.num_workers=4 (repeatable)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from jobs.spec import SpecError

    try:
        spec = load_train_spec(args.spec, args.set)
        result = train(spec)
    except SpecError as err:
        _print_problems(err)
        return EXIT_SPEC
    except GigasegError as err:
        print(f"error: {err}", file=sys.stderr)
        if getattr(args, "debug", False):
            raise
        return EXIT_SPEC if isinstance(err, (FileNotFoundError, OutputConflictError, CheckpointError)) else EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - a failed worker (ray.train.TrainingFailedError) and the like
        if getattr(args, "debug", False):
            raise
        print(f"error: training failed: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILED
    losses = result.history.get("train_loss") or [float("nan")]
    print(f"trained epochs {result.start_epoch}..{result.last_epoch} (last train_loss {losses[-1]:.4f}) in "
          f"{result.seconds:.0f} s\nmodel: {result.model_url}  curves: {result.output_url}/{CURVES}")
    return EXIT_OK


def add_import_parser(subparsers) -> None:
    p = subparsers.add_parser("import-pairs", help="build a Zarr training dataset from image/mask file pairs")
    p.add_argument("images", help="folder (URL) of the images")
    p.add_argument("out", help="dataset folder (URL) to create or add to")
    p.add_argument("--masks", default=None, help="folder of the masks (default: the images' folder)")
    p.add_argument("--image-pattern", default="{id}_sat.jpg", help="image file name with {id} (default %(default)s)")
    p.add_argument("--mask-pattern", default="{id}_mask.png", help="mask file name with {id} (default %(default)s)")
    p.add_argument("--palette", default=None, help="named class table of colour-coded masks, e.g. deepglobe")
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME[:R,G,B]",
                   help="a class, in id order (repeatable); colours needed for colour-coded masks")
    p.add_argument("--mask-kind", choices=["palette", "index"], default="palette",
                   help="colour-coded RGB masks, or masks of class ids")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--storage-options", default=None, help="fsspec options of the inputs, as JSON")
    p.add_argument("--out-storage-options", default=None, help="fsspec options of the output, as JSON")
    p.add_argument("--overwrite", action="store_true", help="re-import samples already there")
    p.set_defaults(func=cmd_import)


def _parse_classes(args) -> list:
    from pipeline.palette import get_palette

    if args.palette and args.classes:
        raise ValueError("give --palette or --class, not both")
    if args.palette:
        return list(get_palette(args.palette))
    if not args.classes:
        raise ValueError("name the classes: --palette NAME or --class NAME[:R,G,B] (repeated, in id order)")
    out = []
    for item in args.classes:
        name, _, rgb = item.partition(":")
        color = tuple(int(v) for v in rgb.split(",")) if rgb else None
        if color is not None and len(color) != 3:
            raise ValueError(f"--class {item!r}: the colour must be R,G,B")
        out.append((name, color))
    return out


def cmd_import(args) -> int:
    import json

    from pipeline.dataset_import import import_pairs

    try:
        classes = _parse_classes(args)
        so = json.loads(args.storage_options) if args.storage_options else None
        out_so = json.loads(args.out_storage_options) if args.out_storage_options else None
        info = import_pairs(args.images, args.out, masks_url=args.masks, image_pattern=args.image_pattern,
                            mask_pattern=args.mask_pattern, classes=classes, mask_kind=args.mask_kind,
                            ignore_index=args.ignore_index, chunk=args.chunk, storage_options=so,
                            out_storage_options=out_so, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # GigasegErrors are builtins too
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SPEC
    except GigasegError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    pixels = sum(info.class_pixels) or 1
    print(f"{args.out}: {len(info.images)} image(s), classes "
          + ", ".join(f"{n} {p / pixels:.1%}" for n, p in zip(info.class_names, info.class_pixels)))
    return EXIT_OK


__all__ = ["CheckpointStore", "TrainResult", "add_import_parser", "add_train_parser", "cmd_import", "cmd_train",
           "init_weights", "lr_factor", "make_plan", "train"]
