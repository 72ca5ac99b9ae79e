"""Building training datasets: import image/mask pairs (``import_pairs``, paired by ``pipeline.dataset_pairs``;
``import_samples``) into the layout ``pipeline.datasets`` reads.

Each sample is ingested as an OME-Zarr image pyramid with its label pyramid (``labels/mask``), then marked
with its pixel statistics; ``dataset.json`` is written last, so an interrupted import is redone sample by
sample on a rerun. Importing into an existing dataset adds samples (the class table must match); the
normalisation is recomputed from the per-sample sums, so no image is read twice. Masks are read chunk by
chunk where the format allows (TIFF, Zarr); PNG/JPEG are decoded whole, once.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import zarr
from PIL import Image
from zarr.codecs import ZstdCodec

from pipeline import ome
from pipeline.blend import downsample_labels
from pipeline.errors import OutputConflictError, UnsupportedImageError
from pipeline.evaluation.palette import DEEPGLOBE_CLASSES, decode_palette, default_colors
from pipeline.pyramid import ingest
from pipeline.sources.formats import ImageSource, open_source
from pipeline.sources.pixels import LazyLevel, source_to_dask
from pipeline.storage import filesystem, fs_path, join, remove, write_json, zarr_store
from pipeline.training.dataset_pairs import Pair, match_pairs
from pipeline.training.datasets import _SAMPLE_KEY, DATASET_FILE, MASK_LABEL, DatasetInfo, read_dataset

log = logging.getLogger(__name__)

MaskKind = Literal["palette", "index"]
ClassEntry = tuple[str, tuple[int, int, int] | None]


def import_pairs(
    images_url: str,
    out_url: str,
    *,
    masks_url: str | None = None,
    image_pattern: str = "{id}_sat.jpg",
    mask_pattern: str = "{id}_mask.png",
    classes: Sequence[ClassEntry | str] = DEEPGLOBE_CLASSES,
    mask_kind: MaskKind = "palette",
    ignore_index: int = 255,
    threshold: int = 128,
    chunk: int = 512,
    min_size: int = 256,
    storage_options: Mapping[str, Any] | None = None,
    out_storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> DatasetInfo:
    """Build (or add to) the training dataset at ``out_url`` from image/mask file pairs; see the module doc.

    ``mask_kind="palette"``: masks are colour-coded RGB, decoded with ``pipeline.evaluation.palette.decode_palette``
    (class ``i`` = ``classes[i]``'s colour; unmatched colours → ``ignore_index``). ``"index"``: masks hold
    class ids (one channel); ids outside ``0..K−1`` other than ``ignore_index`` are an error.
    """
    pairs = match_pairs(images_url, masks_url, image_pattern=image_pattern, mask_pattern=mask_pattern,
                        storage_options=storage_options)
    return import_samples(pairs, out_url, classes=classes, mask_kind=mask_kind, ignore_index=ignore_index,
                          threshold=threshold, chunk=chunk, min_size=min_size, storage_options=storage_options,
                          out_storage_options=out_storage_options, overwrite=overwrite)


def import_samples(
    pairs: Sequence[Pair],
    out_url: str,
    *,
    classes: Sequence[ClassEntry | str],
    mask_kind: MaskKind = "palette",
    ignore_index: int = 255,
    threshold: int = 128,
    chunk: int = 512,
    min_size: int = 256,
    storage_options: Mapping[str, Any] | None = None,
    out_storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> DatasetInfo:
    """``import_pairs`` for pairs already matched (e.g. built by hand with ``Pair``/``discover``)."""
    names, colors = _class_table(classes, mask_kind, ignore_index)
    so = dict(storage_options or {})
    out_so = dict(so if out_storage_options is None else out_storage_options)
    existing = None
    if not overwrite and filesystem(out_url, out_so).exists(fs_path(join(out_url, DATASET_FILE))):
        existing = read_dataset(out_url, out_so)
        if (existing.class_names, existing.ignore_index) != (names, ignore_index):
            raise OutputConflictError(
                f"{out_url} holds a dataset with classes {list(existing.class_names)} and ignore_index "
                f"{existing.ignore_index}, not {list(names)} / {ignore_index}; import into another folder."
            )
    for i, pair in enumerate(pairs, 1):
        log.info("importing %s (%d/%d)", pair.name, i, len(pairs))
        _import_sample(pair, join(out_url, f"{pair.name}.zarr"), names, colors, mask_kind, ignore_index,
                       threshold, chunk, min_size, so, out_so, overwrite)
    images = sorted(set(existing.images if existing else ()) | {p.name for p in pairs})
    info = _summarise(out_url, out_so, images, names, colors, ignore_index)
    write_json(join(out_url, DATASET_FILE), info.to_json(), out_so)
    return info


def _class_table(
    classes: Sequence[ClassEntry | str], mask_kind: MaskKind, ignore_index: int
) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    entries = [(c, None) if isinstance(c, str) else (c[0], c[1]) for c in classes]
    names = tuple(n for n, _ in entries)
    if not names or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"classes must be distinct non-empty names, got {list(names)}")
    if mask_kind == "palette" and any(c is None for _, c in entries):
        raise ValueError("palette masks need a colour for every class: give (name, (r, g, b)) pairs")
    if 0 <= ignore_index < len(names):
        raise ValueError(f"ignore_index={ignore_index} is also class {names[ignore_index]!r}; use ≥ {len(names)}")
    fallback = default_colors(len(names))
    colors = tuple(tuple(int(v) for v in (c if c is not None else fallback[i])) for i, (_, c) in enumerate(entries))
    return names, colors


def _label_dtype(num_classes: int, ignore_index: int) -> np.dtype:
    return np.dtype(np.uint8 if max(num_classes - 1, ignore_index) <= 255 else np.uint16)


_INDEX_PIL_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")


def _decode_index_image(url: str, so: dict) -> np.ndarray:
    """A whole PNG/JPEG of class ids ``(H, W)``; palette ("P") images give their indices, not colours."""
    with Image.open(io.BytesIO(filesystem(url, so).cat_file(fs_path(url)))) as im:
        if im.mode not in _INDEX_PIL_MODES:
            raise UnsupportedImageError(
                f"{url}: an index mask must be a one-channel or palette image of class ids, this one is {im.mode}; "
                "colour-coded masks need mask_kind='palette'."
            )
        ids = np.asarray(im)
    if ids.dtype.kind == "i" and ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise UnsupportedImageError(f"{url}: class ids must be in 0..65535, found {ids.min()}..{ids.max()}.")
    return ids.astype(np.uint16)


def _checked_ids(block: np.ndarray, num_classes: int, ignore_index: int, dtype: np.dtype, url: str) -> np.ndarray:
    """``block`` cast to the label dtype; ids outside ``0..K−1`` other than ``ignore_index`` raise."""
    bad = (block >= num_classes) & (block != ignore_index)
    if block.dtype.kind == "i":
        bad |= block < 0
    if bad.any():
        values = np.unique(block[bad])
        raise UnsupportedImageError(
            f"{url}: holds ids {values[:10].tolist()} ({int(bad.sum())} px in one chunk) outside the "
            f"{num_classes} classes 0..{num_classes - 1} and ignore_index {ignore_index}; fix the class list, "
            "the ignore index or the mask."
        )
    return block.astype(dtype)


def _mask_dask(source: ImageSource, chunk: int) -> da.Array:
    """Level 0 of an integer mask as ``(H, W)``, unconverted (ids are not intensities)."""
    h, w = source.shape_yx
    if source.ref.format in ("png", "jpeg"):
        decoded = dask.delayed(_decode_index_image, pure=True)(source.ref.url, source.storage_options)
        return da.from_delayed(decoded, (h, w), dtype=np.uint16).rechunk(chunk)
    if source.channels != 1:
        raise UnsupportedImageError(
            f"{source.ref.url}: an index mask needs 1 channel of class ids, it has {source.channels}; "
            "colour-coded masks need mask_kind='palette'."
        )
    tiff = source.ref.format == "tiff"
    url = source.ref.url if tiff else join(source.group_url or source.ref.url, source.levels[0].path)
    reader = LazyLevel(url, source.storage_options, 0 if tiff else None)
    meta = np.empty((0,) * reader.ndim, reader.dtype)
    raw = da.from_array(reader, chunks=reader.chunks, lock=False, asarray=False, meta=meta)
    raw = raw[tuple(slice(None) if a in "yx" else 0 for a in source.axes)]
    return raw.rechunk(chunk)


def _import_sample(
    pair: Pair, group_url: str, names, colors, mask_kind: MaskKind, ignore_index: int, threshold: int,
    chunk: int, min_size: int, so: dict, out_so: dict, overwrite: bool,
) -> None:
    table = {"classes": list(names), "ignore_index": ignore_index, "mask_kind": mask_kind,
             "image": pair.image.url, "mask": pair.mask.url}
    done = _sample_state(group_url, out_so).get("table")
    if overwrite:
        remove(group_url, out_so)
    elif done == table:
        log.info("%s: already imported, kept", pair.name)
        return
    elif done:
        raise OutputConflictError(
            f"{group_url} holds a sample imported from {done['image']} / {done['mask']} "
            f"({done['mask_kind']} masks), not {pair.image.url} / {pair.mask.url} ({mask_kind}); rename one of the "
            "images, import into another folder, or overwrite."
        )
    image = open_source(pair.image, so)
    mask = open_source(pair.mask, so)
    if mask.shape_yx != image.shape_yx:
        raise UnsupportedImageError(
            f"{pair.mask.url} is {mask.shape_yx} px but its image {pair.image.url} is {image.shape_yx} px; "
            "a mask must have its image's size."
        )
    pyramid = ingest(image, group_url, chunk=chunk, min_size=min_size, storage_options=out_so)
    group = zarr.open_group(store=zarr_store(group_url, out_so), mode="a")
    group.attrs["gigaseg"] = {**group.attrs.get("gigaseg", {}), _SAMPLE_KEY: None}
    dtype = _label_dtype(len(names), ignore_index)
    if mask_kind == "palette":
        level0 = source_to_dask(mask, chunk).map_blocks(
            lambda b: decode_palette(np.moveaxis(b, 0, -1), colors, threshold, ignore_index).astype(dtype),
            drop_axis=0, dtype=dtype, meta=np.empty((0, 0), dtype),
        )
    else:
        level0 = _mask_dask(mask, chunk).map_blocks(
            _checked_ids, len(names), ignore_index, dtype, pair.mask.url, dtype=dtype, meta=np.empty((0, 0), dtype))
    labels = group.require_group("labels")
    labels.attrs.update(ome.labels_group_attrs([MASK_LABEL]))
    mask_group = labels.require_group(MASK_LABEL)
    arrays = [
        mask_group.create_array(str(lvl), shape=(h, w), chunks=(chunk, chunk), dtype=dtype, fill_value=ignore_index,
                                compressors=ZstdCodec(level=3), dimension_names=("y", "x"), overwrite=True)
        for lvl, (h, w) in enumerate(pyramid.shapes)
    ]
    da.store(level0, arrays[0], lock=False)
    counts = _label_counts(arrays[0], len(names), ignore_index)
    for lvl in range(1, len(arrays)):
        downsample_labels(arrays[lvl - 1], arrays[lvl], len(names))
    mask_group.attrs.update({"ome": {
        **ome.label_multiscales(MASK_LABEL, len(arrays), method="mode"),
        "image-label": ome.image_label([(i, (*c, 255)) for i, c in enumerate(colors)], list(enumerate(names))),
    }})
    level = da.from_zarr(zarr.open_array(store=zarr_store(pyramid.level_url(0), out_so, read_only=True), mode="r"))
    pixels = level.astype(np.float64)
    s, ss = dask.compute(pixels.sum(axis=(1, 2)), (pixels * pixels).sum(axis=(1, 2)))
    state = {
        "table": table, "pixels": int(level.shape[1] * level.shape[2]),
        "sum": [float(v) for v in s], "sumsq": [float(v) for v in ss],
        "class_pixels": [int(v) for v in counts[: len(names)]], "ignored": int(counts[ignore_index]),
    }
    if state["ignored"]:
        log.info("%s: %d pixel(s) match no class and are ignored (id %d)", pair.name, state["ignored"], ignore_index)
    group.attrs["gigaseg"] = {**group.attrs.get("gigaseg", {}), _SAMPLE_KEY: state}


def _label_counts(array: zarr.Array, num_classes: int, ignore_index: int) -> np.ndarray:
    """Pixels per id ``(max(K, ignore_index + 1) or more,)`` int64, chunk by chunk."""
    n = max(num_classes, ignore_index + 1, 256 if array.dtype == np.uint8 else 65536)
    labels = da.from_zarr(array)
    per_block = labels.map_blocks(
        lambda b: np.bincount(b.ravel(), minlength=n)[None, None], new_axis=2,
        chunks=((1,) * len(labels.chunks[0]), (1,) * len(labels.chunks[1]), (n,)), dtype=np.int64,
    )
    return np.asarray(per_block.sum(axis=(0, 1)).compute())


def _sample_state(group_url: str, so: dict) -> dict[str, Any]:
    try:
        attrs = zarr.open_group(store=zarr_store(group_url, so, read_only=True), mode="r").attrs.asdict()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return {}
    return (attrs.get("gigaseg") or {}).get(_SAMPLE_KEY) or {}


def _summarise(out_url, so, images, names, colors, ignore_index) -> DatasetInfo:
    n, s, ss = 0, np.zeros(3), np.zeros(3)
    class_pixels = np.zeros(len(names), np.int64)
    for name in images:
        state = _sample_state(join(out_url, f"{name}.zarr"), so)
        if not state:
            raise OutputConflictError(f"{out_url}/{name}.zarr: import incomplete; rerun the import to finish it.")
        n += state["pixels"]
        s += np.asarray(state["sum"]) / 255.0
        ss += np.asarray(state["sumsq"]) / 255.0**2
        class_pixels += np.asarray(state["class_pixels"], np.int64)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    std = np.maximum(std, 1.0 / 255)  # a flat channel: avoid dividing by 0 at train time
    return DatasetInfo(out_url, names, colors, ignore_index, tuple(images), tuple(round(float(v), 6) for v in mean),
                       tuple(round(float(v), 6) for v in std), tuple(int(v) for v in class_pixels), so)


__all__ = ["ClassEntry", "MaskKind", "import_pairs", "import_samples"]
