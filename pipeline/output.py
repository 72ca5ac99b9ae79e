"""The output layout users rely on, and the per-image state that makes runs resumable.

    <output>/<name>.zarr/                      OME-Zarr (NGFF 0.5) image group
        0, 1, …                                image pyramid (3, H_l, W_l) uint8 — absent when the
                                               source OME-Zarr was used in place (attrs name it)
        labels/<label>/0, 1, …                 class ids (H_l, W_l), same levels as the image
        confidence                             optional: max blended probability (H, W) float32
        probabilities                          optional: blended probabilities (C, H, W) float16
    <output>/_work/<name>/stage-0/tiles        tile store while the image runs; removed when done
    <output>/report.json

An image group carries ``attrs["gigaseg"]``: the run fingerprint (model and tiling that produced it) and
``complete``, set last, so an interrupted image is recognised and resumed and a finished one skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import zarr

from pipeline import ome
from pipeline.errors import OutputConflictError
from pipeline.storage import exists, filesystem, fs_path, join, open_group, zarr_store

log = logging.getLogger(__name__)

WORK_DIR = "_work"
REPORT_NAME = "report.json"


@dataclass(frozen=True)
class ImageOutput:
    name: str
    group_url: str
    work_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)


def image_output(output_url: str, name: str, storage_options: dict[str, Any]) -> ImageOutput:
    return ImageOutput(
        name=name,
        group_url=join(output_url, f"{name}.zarr"),
        work_url=join(output_url, WORK_DIR, name),
        storage_options=dict(storage_options),
    )


def fingerprint(**parts: Any) -> str:
    """A short stable hash of everything that determines an image's output."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_state(out: ImageOutput) -> dict[str, Any] | None:
    """``attrs["gigaseg"]`` of the image group, or None when the group does not exist yet."""
    try:
        group = open_group(out.group_url, out.storage_options, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None
    return dict(group.attrs.get("gigaseg", {}))


def remove(url: str, storage_options: dict[str, Any]) -> None:
    fs = filesystem(url, storage_options)
    path = fs_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_resumable(out: ImageOutput, run_fingerprint: str, if_exists: str) -> str:
    """Decide what to do with an image's existing output: ``"new"``, ``"resume"`` or ``"complete"``.

    ``overwrite`` removes the image group and its work area; ``resume`` refuses output written by a
    different model or tiling, since mixing them would silently corrupt the mask.
    """
    if if_exists == "overwrite":
        remove(out.group_url, out.storage_options)
        remove(out.work_url, out.storage_options)
        return "new"
    state = read_state(out)
    if state is None or "fingerprint" not in state:
        return "new" if state is None else "resume"
    if state["fingerprint"] != run_fingerprint:
        raise OutputConflictError(
            f"{out.group_url} was written by a different model or tiling (fingerprint {state['fingerprint']}, "
            f"this run {run_fingerprint}); resuming would mix two results. Set output.if_exists=overwrite "
            "to replace it, or choose another output.url"
        )
    return "complete" if state.get("complete") else "resume"


def mark(out: ImageOutput, **values: Any) -> None:
    """Merge ``values`` into the image group's ``attrs["gigaseg"]`` (creating the group if needed)."""
    group = zarr.open_group(store=zarr_store(out.group_url, out.storage_options), mode="a")
    state = dict(group.attrs.get("gigaseg", {}))
    state.update(values)
    group.attrs["gigaseg"] = state


def default_colors(n: int) -> list[tuple[int, int, int]]:
    """A fixed, distinguishable palette (tab10-like, then golden-angle hues)."""
    base = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    out = base[:n]
    for i in range(len(out), n):
        h = (i * 0.618033988749895) % 1.0
        out.append(tuple(int(255 * max(0.0, min(1.0, abs(h * 6 - k) - 1))) for k in (3, 2, 4)))
    return out


def create_outputs(
    out: ImageOutput,
    *,
    label_name: str,
    shapes: list[tuple[int, int]],
    class_names: list[str],
    class_colors: list[tuple[int, int, int]],
    chunk: int,
    extras: list[str],
    labels_dtype,
) -> dict[str, Any]:
    """Create (or recreate) the label pyramid and extra arrays with their NGFF metadata.

    Returns ``{"labels": [level arrays], "confidence": array?, "probabilities": array?}``. Arrays are
    recreated on every blend, so a blend interrupted half-way never leaves stale chunks behind.
    """
    root = zarr.open_group(store=zarr_store(out.group_url, out.storage_options), mode="a")
    labels = root.require_group("labels")
    labels.attrs["ome"] = ome.labels_group_attrs([label_name])["ome"]
    group = labels.require_group(label_name)
    levels = [
        group.create_array(
            str(level), shape=shape, chunks=(min(chunk, shape[0]), min(chunk, shape[1])),
            dtype=labels_dtype, fill_value=0, overwrite=True, compressors=_zstd(),
            dimension_names=("y", "x"),
        )
        for level, shape in enumerate(shapes)
    ]
    meta = ome.label_multiscales(label_name, len(shapes))
    meta["image-label"] = ome.image_label(
        colors=[(i, (*c, 255)) for i, c in enumerate(class_colors)],
        properties=[(i, name) for i, name in enumerate(class_names)],
    )
    group.attrs["ome"] = meta
    arrays: dict[str, Any] = {"labels": levels}
    h, w = shapes[0]
    c = min(chunk, h), min(chunk, w)
    if "confidence" in extras:
        arrays["confidence"] = root.create_array(
            "confidence", shape=(h, w), chunks=c, dtype="float32", fill_value=0.0, overwrite=True,
            compressors=_zstd(), dimension_names=("y", "x"),
        )
    if "probabilities" in extras:
        n = len(class_names)
        arrays["probabilities"] = root.create_array(
            "probabilities", shape=(n, h, w), chunks=(n, *c), dtype="float16", fill_value=0.0,
            overwrite=True, compressors=_zstd(), dimension_names=("c", "y", "x"),
        )
        arrays["probabilities"].attrs["classes"] = class_names
    return arrays


def _zstd():
    return zarr.codecs.ZstdCodec(level=3)


def safe_remove_work(out: ImageOutput) -> None:
    try:
        remove(out.work_url, out.storage_options)
    except OSError as err:  # leftover scratch space is harmless; say so and go on
        log.warning("could not remove work area %s: %s", out.work_url, err)


def work_exists(out: ImageOutput) -> bool:
    return exists(out.work_url, out.storage_options)


_CHUNK_KEY = re.compile(r"/c/(\d+)/(\d+)/0/0/0$")


def finished_tiles(tiles_url: str, storage_options: dict[str, Any]) -> set[tuple[int, int]]:
    """Tiles whose chunk exists in the tile store (one listing, not one request per tile).

    A chunk exists only once written whole: LocalStore writes temp + rename, object stores PUT
    atomically, and the tile store writes empty chunks too (``write_empty_chunks``).
    """
    fs = filesystem(tiles_url, storage_options)
    root = fs_path(tiles_url)
    try:
        keys = fs.find(root + "/c")
    except FileNotFoundError:
        return set()
    found = set()
    for key in keys:
        m = _CHUNK_KEY.search("/" + key.replace("\\", "/"))
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
    return found


def create_tile_store(tiles_url: str, storage_options, shape: tuple[int, ...]) -> zarr.Array:
    """The tile store ``(ny, nx, C, T, T)`` float16: one chunk per tile, NaN until written."""
    store = zarr_store(tiles_url, storage_options)
    try:
        arr = zarr.open_array(store=store, mode="r")
        if arr.shape == shape:
            return arr
        log.info("tile store %s has shape %s, expected %s: recreating", tiles_url, arr.shape, shape)
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, KeyError):
        pass
    return zarr.create_array(
        store=store, shape=shape, chunks=(1, 1, *shape[2:]), dtype="float16", fill_value=float("nan"),
        compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=3, shuffle="shuffle", typesize=2),
        config={"write_empty_chunks": True}, overwrite=True,
    )
