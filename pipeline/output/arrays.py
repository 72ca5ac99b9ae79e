"""The arrays of an image's output: the label pyramid and extras with their NGFF metadata, and the tile store a
stage writes while it runs (paths: ``pipeline.output.layout``)."""

from __future__ import annotations

import logging
import re
from typing import Any

import zarr

from pipeline import ome
from pipeline.output.layout import ImageOutput
from pipeline.storage import filesystem, fs_path, zarr_store

log = logging.getLogger(__name__)


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


def create_map(group_url: str, name: str, shape: tuple[int, ...], chunk: int, storage_options) -> zarr.Array:
    """A stage map ``name`` ((C, H, W) or (H, W) float16) in the group at ``group_url``, chunked like the masks
    (each chunk one task's), created anew (a map of an interrupted stage is recomputed whole)."""
    group = zarr.open_group(store=zarr_store(group_url, storage_options), mode="a")
    chunks = (*shape[:-2], min(chunk, shape[-2]), min(chunk, shape[-1]))
    return group.create_array(name, shape=shape, chunks=chunks, dtype="float16", fill_value=0, overwrite=True,
                              compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"))


__all__ = ["create_map", "create_outputs", "create_tile_store", "finished_tiles"]
