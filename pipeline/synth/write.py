"""Writing the synthetic archive (``pipeline.synth``): Zarr images and masks, PNG copies, a training dataset.

Layout of ``write_split(url, …)`` (any fsspec URL)::

    <url>/synth.json                        configs, seeds, class table, split names; written last
    <url>/<split>/images/<name>.zarr        (3, H, W) uint8 Zarr v3 array, axes c, y, x: a job input archive
                                            for `gigaseg run` (inputs.url: <url>/val/images)
    <url>/<split>/masks/<name>.zarr         (H, W) uint8 class ids: ground truth for `gigaseg eval PRED <url>/val/masks`
    <url>/<split>/png/<name>_sat.png        (png=True, sides ≤ PNG_MAX_SIDE) RGB, and <name>_mask.png class ids
    <url>/dataset/                          (dataset=True) the training dataset `gigaseg train` reads
                                            (pipeline.training.dataset_import.import_samples), train and val samples together

``<split>`` is ``train`` or ``val``; sample ``i`` of a split is named ``<split>-<i:03d>`` and drawn with its own
seed, hashed from ``(base seed, split, i)``, so train and validation never share a scene. Each mask array
carries ``attrs["gigaseg"]["synth"]`` (its config) and is marked complete after both arrays are written; a
rerun keeps complete samples of the same config and rewrites the rest.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import zarr
from dask.callbacks import Callback
from PIL import Image
from zarr.codecs import ZstdCodec

from pipeline.sources.discover import ImageRef
from pipeline.storage import join, remove, write_bytes, write_json, zarr_store
from pipeline.synth import CLASSES, CONTEXT_PAIR, DETAIL_CLASSES, SynthConfig, synth_dask
from pipeline.synth.hash import hash_u64
from pipeline.training.dataset_import import import_samples
from pipeline.training.dataset_pairs import Pair

log = logging.getLogger(__name__)

PNG_MAX_SIDE = 8192  # a PNG is encoded whole in memory: 8192² RGB is 200 MB
SPLITS = ("train", "val")
_SPLIT_STREAM = 1000


@dataclass(frozen=True)
class SynthSample:
    name: str
    config: SynthConfig
    image_url: str
    mask_url: str
    png_urls: tuple[str, str] | None = None  # (image, mask)


@dataclass(frozen=True)
class SynthSplit:
    url: str
    train: tuple[SynthSample, ...]
    val: tuple[SynthSample, ...]
    dataset_url: str | None

    @property
    def samples(self) -> tuple[SynthSample, ...]:
        return self.train + self.val


class _Progress(Callback):
    """Logs a sample's share of tasks done, MP/s and ETA every ``every`` seconds while it is generated."""

    def __init__(self, name: str, megapixels: float, every: float = 10.0):
        super().__init__()
        self.name, self.megapixels, self.every = name, megapixels, every
        self.done, self.total, self.t0 = 0, 1, time.monotonic()
        self.last = self.t0

    def _start_state(self, dsk, state) -> None:
        self.total = max(len(dsk), 1)

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last, share = now, self.done / self.total
            log.info("%s: %.0f%% (%.2f MP/s, ETA %.0f s)", self.name, 100 * share,
                     share * self.megapixels / (now - self.t0), (now - self.t0) * (1 - share) / share)


def split_seed(base_seed: int, split: str, index: int) -> int:
    """Seed of sample ``index`` of ``split``: ``hash(base_seed, split, index) >> 1`` (distinct, < 2⁶³)."""
    return int(hash_u64(base_seed, _SPLIT_STREAM, SPLITS.index(split), index)[0] >> np.uint64(1))


def _marker(cfg: SynthConfig) -> dict[str, Any]:
    return {"config": cfg.to_json(), "classes": [{"name": n, "color": list(c)} for n, c in CLASSES]}


def _check_png(cfg: SynthConfig) -> None:
    if max(cfg.height, cfg.width) > PNG_MAX_SIDE:
        raise ValueError(
            f"PNG copies are encoded whole in memory, so they are written for sides up to {PNG_MAX_SIDE} px; "
            f"this image is {cfg.height}×{cfg.width}. Drop png (the Zarr arrays hold the same pixels)."
        )


def _complete(mask_url: str, cfg: SynthConfig, so: dict) -> bool:
    try:
        arr = zarr.open_array(store=zarr_store(mask_url, so, read_only=True), mode="r")
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError, KeyError):
        return False
    state = arr.attrs.get("gigaseg", {}).get("synth", {})
    return state.get("complete") is True and state.get("config") == cfg.to_json()


def _write(cfg: SynthConfig, url: str, name: str, png: bool, so: dict, scheduler: Any) -> tuple[SynthSample, bool]:
    image_url, mask_url = join(url, "images", f"{name}.zarr"), join(url, "masks", f"{name}.zarr")
    png_urls = (join(url, "png", f"{name}_sat.png"), join(url, "png", f"{name}_mask.png")) if png else None
    sample = SynthSample(name, cfg, image_url, mask_url, png_urls)
    if _complete(mask_url, cfg, so):
        log.info("%s: complete, kept", mask_url)
        written = False
    else:
        c = cfg.chunk
        common = {"dtype": "uint8", "compressors": ZstdCodec(level=3), "fill_value": 0, "overwrite": True}
        image = zarr.create_array(store=zarr_store(image_url, so), shape=(3, cfg.height, cfg.width),
                                  chunks=(3, c, c), dimension_names=("c", "y", "x"), **common)
        mask = zarr.create_array(store=zarr_store(mask_url, so), shape=(cfg.height, cfg.width), chunks=(c, c),
                                 dimension_names=("y", "x"), **common)
        marker = _marker(cfg)
        image.attrs["gigaseg"] = {"synth": marker}
        mask.attrs["gigaseg"] = {"synth": {**marker, "complete": False}}
        log.info("%s: generating %d×%d px (seed %d)", name, cfg.height, cfg.width, cfg.seed)
        with _Progress(name, cfg.height * cfg.width / 1e6):
            da.store(list(synth_dask(cfg)), [image, mask], lock=False, scheduler=scheduler)
        mask.attrs["gigaseg"] = {"synth": {**marker, "complete": True}}
        written = True
    if png_urls:
        image = zarr.open_array(store=zarr_store(image_url, so, read_only=True), mode="r")
        mask = zarr.open_array(store=zarr_store(mask_url, so, read_only=True), mode="r")
        for target, pixels, mode in ((png_urls[0], np.moveaxis(image[:], 0, -1), "RGB"), (png_urls[1], mask[:], "L")):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(pixels), mode).save(buf, format="PNG")
            write_bytes(target, buf.getvalue(), so)
    return sample, written


def write_synth(
    cfg: SynthConfig,
    url: str,
    name: str = "synth",
    *,
    png: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    scheduler: Any = "threads",
) -> SynthSample:
    """Write one image and its mask: ``<url>/images/<name>.zarr``, ``<url>/masks/<name>.zarr`` (and
    ``<url>/png/<name>_sat.png`` / ``_mask.png`` when ``png``), chunk by chunk; see the module doc."""
    if png:
        _check_png(cfg)
    return _write(cfg, url, name, png, dict(storage_options or {}), scheduler)[0]


def write_split(
    url: str,
    cfg: SynthConfig,
    *,
    train: int = 4,
    val: int = 1,
    png: bool = False,
    dataset: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    scheduler: Any = "threads",
) -> SynthSplit:
    """Write ``train`` + ``val`` images like ``cfg`` (their seeds from ``split_seed(cfg.seed, …)``), the training
    dataset at ``<url>/dataset`` when ``dataset``, and ``<url>/synth.json``; see the module doc."""
    if train < 0 or val < 0 or train + val == 0:
        raise ValueError(f"train={train}, val={val}: ask for at least one image and no negative count.")
    if png:
        _check_png(cfg)
    so = dict(storage_options or {})
    dataset_url = join(url, "dataset") if dataset else None
    samples: dict[str, list[SynthSample]] = {}
    pairs, stale = [], []
    for split, count in zip(SPLITS, (train, val)):
        samples[split] = []
        for i in range(count):
            sample, written = _write(cfg.with_seed(split_seed(cfg.seed, split, i)), join(url, split),
                                     f"{split}-{i:03d}", png, so, scheduler)
            samples[split].append(sample)
            pairs.append(Pair(sample.name, ImageRef(sample.image_url, sample.name, "zarr"),
                              ImageRef(sample.mask_url, sample.name, "zarr")))
            stale += [sample.name] if written else []
    if dataset_url:
        for name in stale:  # its pixels changed: the dataset's copy must be imported again
            remove(join(dataset_url, f"{name}.zarr"), so)
        import_samples(pairs, dataset_url, classes=list(CLASSES), mask_kind="index", chunk=cfg.chunk,
                       storage_options=so)
    result = SynthSplit(url, tuple(samples["train"]), tuple(samples["val"]), dataset_url)
    write_json(join(url, "synth.json"), _description(result), so)
    return result


def _description(split: SynthSplit) -> dict[str, Any]:
    names = dict(CLASSES)
    return {
        "format": "gigaseg-synth", "version": 1,
        "classes": [{"id": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(CLASSES)],
        "context_pair": [list(names)[k] for k in CONTEXT_PAIR],
        "detail_classes": [list(names)[k] for k in DETAIL_CLASSES],
        "splits": {s: [{"name": x.name, "seed": x.config.seed, "image": x.image_url, "mask": x.mask_url,
                        "png": list(x.png_urls) if x.png_urls else None} for x in getattr(split, s)]
                   for s in SPLITS},
        "config": {k: v for k, v in split.samples[0].config.to_json().items() if k != "seed"},
        "dataset": split.dataset_url,
        "train_spec": ({"dataset": {"url": split.dataset_url, "validation": {"names": [x.name for x in split.val]}}}
                       if split.dataset_url and split.val else None),
    }  # fmt: skip


__all__ = ["PNG_MAX_SIDE", "SynthSample", "SynthSplit", "split_seed", "write_split", "write_synth"]
