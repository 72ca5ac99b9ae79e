"""Open class-id masks of any size lazily as Dask arrays: Zarr arrays, OME-Zarr label groups, PNG/TIFF.

Masks are read chunk by chunk (``sources`` readers), except PNG, which has no random access and is
decoded whole once. Colour-coded masks are decoded with a palette (``pipeline.palette``).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from PIL import Image

from pipeline import ome
from pipeline.errors import UnsupportedImageError
from pipeline.evaluation.palette import decode_palette
from pipeline.sources.formats import MAX_DECODE_PIXELS
from pipeline.sources.pixels import LazyLevel, read_chunks_yx
from pipeline.storage import filesystem, fs_path, join, zarr_store

log = logging.getLogger(__name__)

_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
_READ_CHUNK = 1024



def open_mask(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    colors: Sequence[tuple[int, int, int]] | None = None,
    unknown: int = 255,
    label_name: str = "segmentation",
) -> da.Array:
    """Lazy ``(H, W)`` class ids of the mask at ``url``: a Zarr array, a Zarr/OME-Zarr group (its
    ``labels/<label_name>/0``, else its first label, else its first multiscale level, else ``"0"``), a TIFF
    or a PNG (decoded whole, once). Colour masks ``(H, W, 3|4)`` / ``(3|4, H, W)`` are decoded with
    ``colors`` (unmatched → ``unknown``); without ``colors`` they must be grey (equal channels)."""
    so = dict(storage_options or {})
    low = url.lower().rstrip("/")
    if low.endswith((".png", ".jpg", ".jpeg")):
        return _open_pil(url, so, colors, unknown)
    if low.endswith((".tif", ".tiff", ".btf")):
        reader = LazyLevel(url, so, 0)
    else:
        reader = LazyLevel(_zarr_array_url(url, so, label_name), so, None)
    shape = tuple(reader.shape)
    spatial = _spatial_axes(shape, url)
    yx = read_chunks_yx(tuple(reader.chunks[i] for i in spatial), tuple(shape[i] for i in spatial),
                        _READ_CHUNK, reader.dtype.itemsize)
    read = tuple(yx[spatial.index(i)] if i in spatial else n for i, n in enumerate(shape))
    raw = da.from_array(reader, chunks=read, lock=False, asarray=False,
                        meta=np.empty((0,) * len(shape), reader.dtype))
    return _to_ids(raw, spatial, url, colors, unknown)


def _spatial_axes(shape: Sequence[int], url: str) -> list[int]:
    """Indices of (y, x) in ``shape``: ``yx``, ``yxc`` (last axis ≤ 4), ``cyx`` (first ≤ 4), singletons
    elsewhere allowed (``tczyx`` OME arrays)."""
    big = [i for i, n in enumerate(shape) if n > 1]
    if len(shape) == 2:
        return [0, 1]
    if len(big) <= 2:
        return [len(shape) - 2, len(shape) - 1] if len(big) < 2 else big
    if len(big) == 3 and shape[big[2]] <= 4:
        return big[:2]
    if len(big) == 3 and shape[big[0]] <= 4:
        return big[1:]
    raise UnsupportedImageError(
        f"{url}: a mask of shape {tuple(shape)} is neither (H, W) class ids nor an (H, W, 3) / (3, H, W) "
        "colour mask; save one 2-D class-id array per image."
    )


def _to_ids(raw: da.Array, spatial: list[int], url: str, colors, unknown: int) -> da.Array:
    chan = [i for i in range(raw.ndim) if i not in spatial and raw.shape[i] > 1]
    arr = raw[tuple(slice(None) if i in spatial or i in chan else 0 for i in range(raw.ndim))]
    if chan:  # (H, W, c) from here on
        arr = (da.moveaxis(arr, 0, -1) if chan[0] < spatial[0] else arr).rechunk({2: -1})
        fn = _colour_block if colors is not None else _grey_block
        arr = arr.map_blocks(fn, colors=colors, unknown=unknown, url=url, drop_axis=2,
                             dtype=np.uint8 if colors is not None else arr.dtype)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        raise UnsupportedImageError(
            f"{url}: a mask must hold integer class ids, got dtype {arr.dtype}; convert it to uint8/uint16."
        )
    return arr


def _colour_block(block: np.ndarray, colors, unknown: int, url: str) -> np.ndarray:
    if block.dtype != np.uint8:
        raise UnsupportedImageError(f"{url}: colour masks must be 8-bit RGB, got {block.dtype}.")
    return decode_palette(block, colors, unknown=unknown)


def _grey_block(block: np.ndarray, colors, unknown: int, url: str) -> np.ndarray:
    if not (block[..., 1:3] == block[..., :1]).all():
        raise UnsupportedImageError(
            f"{url}: a colour mask (channels differ) and no palette; pass --palette (e.g. deepglobe) to map "
            "colours to classes, or save class ids as a single-channel image."
        )
    return block[..., 0]


def _zarr_array_url(url: str, so: dict, label_name: str) -> str:
    """The class-id array inside a Zarr node: the node itself when it is an array."""
    node = zarr.open(store=zarr_store(url, so, read_only=True), mode="r")
    if isinstance(node, zarr.Array):
        return url
    members = set(node.group_keys())
    if "labels" in members:
        labels = node["labels"]
        listed = labels.attrs.get("ome", {}).get("labels") or labels.attrs.get("labels") or []
        for name in [label_name, *listed, *sorted(labels.group_keys())]:
            if name in labels:
                return _zarr_array_url(join(url, "labels", name), so, label_name)
    path = ome.read_multiscales(node.attrs)[0][0] if ome.is_multiscales(node.attrs) else "0"
    return join(url, path)


def _open_pil(url: str, so: dict, colors, unknown: int) -> da.Array:
    with filesystem(url, so).open(fs_path(url), "rb") as fh, Image.open(fh) as im:
        w, h = im.size
        mode = im.mode
    if w * h > MAX_DECODE_PIXELS:
        raise UnsupportedImageError(
            f"{url}: {w}×{h} px is over the {MAX_DECODE_PIXELS:,} px PNG decode limit; save the mask as a Zarr "
            "array or a tiled TIFF."
        )
    dtype = {"I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16, "I": np.int32}.get(mode, np.uint8)
    ids = dask.delayed(_decode_pil_mask, pure=True)(url, so, None if colors is None else list(colors), unknown)
    return da.from_delayed(ids, shape=(h, w), dtype=dtype).rechunk(_READ_CHUNK)


def _decode_pil_mask(url: str, so: dict, colors, unknown: int) -> np.ndarray:
    """Class ids of a PNG: grey/16-bit values, palette (mode P) indices, or colours decoded with ``colors``."""
    data = filesystem(url, so).cat_file(fs_path(url))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            if im.mode in ("1", "L", "P", "I", "I;16", "I;16L", "I;16B") and not (im.mode == "P" and colors):
                return np.asarray(im if im.mode != "1" else im.convert("L")).copy()
            if im.mode in ("LA", "La"):
                return np.asarray(im)[..., 0].copy()
            rgb = np.asarray(im.convert("RGB"))
    return _colour_block(rgb, colors, unknown, url) if colors else _grey_block(rgb, None, unknown, url)


def read_class_names(label_url: str, so: Mapping[str, Any]) -> list[str] | None:
    """Class names in id order from a label group's NGFF ``image-label`` properties, or None."""
    try:
        group = zarr.open_group(store=zarr_store(label_url, dict(so), read_only=True), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None
    props = group.attrs.get("ome", {}).get("image-label", {}).get("properties", [])
    by_id = {int(p["label-value"]): str(p.get("name", p["label-value"])) for p in props if "label-value" in p}
    if not by_id or sorted(by_id) != list(range(len(by_id))):
        return None
    return [by_id[i] for i in range(len(by_id))]


# ---------------------------------------------------------------- scoring


