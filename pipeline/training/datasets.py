"""Training datasets on Zarr: image pyramids with integer label pyramids (``pipeline.dataset_import`` builds them).

Layout (any fsspec URL)::

    <ds>/dataset.json              class table, ignore_index, image names, normalisation, class pixel counts
    <ds>/<name>.zarr/              an ingested OME-Zarr image pyramid (pipeline.pyramid.ingest), levels 0..n-1
    <ds>/<name>.zarr/labels/mask/  class ids (H_l, W_l) uint8 (uint16 past 255 ids), the same levels as the
                                   image; level l = mode_2x2 of level l−1 (pipeline.blend)

``dataset.json`` is written last, and each sample's ``attrs["gigaseg"]["training_sample"]`` (its pixel
statistics) is written after its masks, so an interrupted import is redone sample by sample on a rerun and
a dataset is only ever read complete. Importing into an existing dataset adds samples (the class table must
match); the normalisation (per-channel mean/std of all pixels, 0..1 units) is recomputed from the per-sample
sums, so no image is read twice.

Masks are read chunk by chunk where the format allows (TIFF, Zarr); PNG/JPEG are decoded whole, once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import zarr

from pipeline.errors import InputNotFoundError, UnsupportedImageError
from pipeline.pyramid import Pyramid, open_pyramid
from pipeline.storage import filesystem, fs_path, join, zarr_store

log = logging.getLogger(__name__)

DATASET_FILE = "dataset.json"
FORMAT = "gigaseg-training-dataset"
VERSION = 1
MASK_LABEL = "mask"
_SAMPLE_KEY = "training_sample"



@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says. ``mean``/``std`` are per channel in 0..1 units."""

    url: str
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    ignore_index: int
    images: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_pixels: tuple[int, ...]
    storage_options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def sample_url(self, name: str) -> str:
        return join(self.url, f"{name}.zarr")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION,
            "classes": [{"name": n, "color": list(c)} for n, c in zip(self.class_names, self.class_colors)],
            "ignore_index": self.ignore_index, "images": list(self.images),
            "normalization": self.normalization, "class_pixels": list(self.class_pixels),
        }  # fmt: skip


def read_dataset(url: str, storage_options: Mapping[str, Any] | None = None) -> DatasetInfo:
    """Parse ``<url>/dataset.json``; a missing or foreign file raises naming the fix."""
    so = dict(storage_options or {})
    try:
        with filesystem(url, so).open(fs_path(join(url, DATASET_FILE)), "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise InputNotFoundError(
            f"{url}: no {DATASET_FILE}, so it is no gigaseg training dataset (or its import was interrupted); "
            "build it with `gigaseg import-pairs` (pipeline.training.dataset_import.import_pairs)."
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise UnsupportedImageError(f"{url}/{DATASET_FILE}: not a {FORMAT} version {VERSION} file.")
    return DatasetInfo(
        url=url,
        class_names=tuple(c["name"] for c in data["classes"]),
        class_colors=tuple(tuple(c["color"]) for c in data["classes"]),
        ignore_index=int(data["ignore_index"]),
        images=tuple(data["images"]),
        mean=tuple(data["normalization"]["mean"]),
        std=tuple(data["normalization"]["std"]),
        class_pixels=tuple(data["class_pixels"]),
        storage_options=so,
    )


class TrainingDataset:
    """Open image and mask level arrays of a dataset, once per process (crop samplers read through it)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.info = read_dataset(url, storage_options)
        self._pyramids: dict[str, Pyramid] = {}
        self._arrays: dict[tuple[str, str, int], zarr.Array] = {}

    def pyramid(self, name: str) -> Pyramid:
        if name not in self._pyramids:
            if name not in self.info.images:
                raise KeyError(f"{name!r} is not an image of {self.info.url}; it has {list(self.info.images)[:10]}")
            self._pyramids[name] = open_pyramid(self.info.sample_url(name), self.info.storage_options)
        return self._pyramids[name]

    def shapes(self, name: str) -> tuple[tuple[int, int], ...]:
        return self.pyramid(name).shapes

    def _array(self, name: str, kind: str, level: int) -> zarr.Array:
        key = (name, kind, level)
        if key not in self._arrays:
            pyr = self.pyramid(name)
            url = pyr.level_url(level) if kind == "image" else join(pyr.url, "labels", MASK_LABEL, str(level))
            self._arrays[key] = zarr.open_array(store=zarr_store(url, pyr.storage_options, read_only=True), mode="r")
        return self._arrays[key]

    def image_level(self, name: str, level: int) -> zarr.Array:
        """``(3, H_l, W_l)`` uint8, axes ``cyx``."""
        return self._array(name, "image", level)

    def mask_level(self, name: str, level: int) -> zarr.Array:
        """``(H_l, W_l)`` class ids."""
        return self._array(name, "mask", level)


__all__ = ["DATASET_FILE", "DatasetInfo", "TrainingDataset", "read_dataset"]
