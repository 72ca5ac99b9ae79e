"""Nodata in the masks: where the input states it has no data (``pipeline.spatial``), the mask says so with a
reserved label, never with a class the model guessed there.

The reserved label is the largest value of the labels' dtype: 255 for uint8 masks (up to 255 classes), 65535 for
uint16. The NGFF ``image-label`` lists it as ``nodata`` with a transparent colour, the COG export makes it the
band's nodata value and the polygon export leaves it out. The model still runs over those pixels (a tile needs
whole windows); its labels there are replaced after the last stage, before the label pyramid, whose 2×2 mode then
treats nodata like any class. Confidence and probabilities keep what the model computed.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import zarr

from pipeline.errors import UnsupportedImageError
from pipeline.sources.formats import ImageSource
from pipeline.sources.pixels import level_reader
from pipeline.spatial import nodata_mask


def nodata_label(num_classes: int, dtype: Any, where: str = "image") -> int:
    """The reserved label of masks of ``dtype``; an error when the classes leave no value for it."""
    label = int(np.iinfo(np.dtype(dtype)).max)
    if num_classes > label:
        raise UnsupportedImageError(
            f"{where}: the input states nodata, but {num_classes} classes fill {np.dtype(dtype)} masks and leave no "
            f"label value for it (gigaseg reserves {label}); use a model with at most {label} classes.")
    return label


def apply_nodata(source: ImageSource, labels: zarr.Array, label: int, scheduler: Any = "threads") -> None:
    """Write ``label`` into level-0 ``labels`` wherever ``source``'s level 0 is no data. One task per mask chunk
    reads its window of the raw input (before any conversion to RGB) and rewrites the chunk only when it holds
    nodata, so each chunk has one writer and chunks without nodata are left as they are."""
    reader, axes = level_reader(source, 0)
    h, w = source.shape_yx
    cy, cx = labels.chunks
    tasks = [dask.delayed(_chunk)(reader, axes, source, labels, label, y, min(y + cy, h), x, min(x + cx, w))
             for y in range(0, h, cy) for x in range(0, w, cx)]
    dask.compute(*tasks, scheduler=scheduler)


def _chunk(reader, axes: str, source: ImageSource, labels: zarr.Array, label: int, y0: int, y1: int, x0: int,
           x1: int) -> None:
    index = tuple(slice(y0, y1) if a == "y" else slice(x0, x1) if a == "x" else slice(None) if a == "c" else 0
                  for a in axes)
    block = np.asarray(reader[index])
    kept = [a for a in axes if a in "cyx"]
    if "c" not in kept:
        block, kept = block[None], ["c", *kept]
    mask = nodata_mask(np.transpose(block, [kept.index(a) for a in "cyx"]), source.spatial, axis=0)
    if mask.any():
        window = labels[y0:y1, x0:x1]
        window[mask] = label
        labels[y0:y1, x0:x1] = window


__all__ = ["apply_nodata", "nodata_label"]
