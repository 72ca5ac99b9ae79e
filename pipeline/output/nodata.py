"""Nodata in the masks: where the input states it has no data (``pipeline.spatial``), the mask says so with a
reserved label, never with a class the model guessed there.

The reserved label is the largest value of the labels' dtype: 255 for uint8 masks (up to 255 classes), 65535 for
uint16. The NGFF ``image-label`` lists it as ``nodata`` with a transparent colour, the COG export makes it the
band's nodata value and the polygon export leaves it out. The model still runs over those pixels (a tile needs
whole windows); the blocks that write the labels replace them there as they write (``workers.sinks.LabelWriter``),
before the label pyramid, whose 2×2 mode then treats nodata like any class, so each chunk still has one writer.
Confidence and probabilities keep what the model computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import UnsupportedImageError
from pipeline.spatial import Spatial, nodata_mask
from pipeline.tiling import Window


def nodata_label(num_classes: int, dtype: Any, where: str = "image") -> int:
    """The reserved label of masks of ``dtype``; an error when the classes leave no value for it."""
    label = int(np.iinfo(np.dtype(dtype)).max)
    if num_classes > label:
        raise UnsupportedImageError(
            f"{where}: the input states nodata, but {num_classes} classes fill {np.dtype(dtype)} masks and leave no "
            f"label value for it (gigaseg reserves {label}); use a model with at most {label} classes.")
    return label


@dataclass(frozen=True)
class Nodata:
    """Where level 0 of an input states no data, for the blocks that write its labels: ``reader`` is the raw level
    (its own dtype and ``axes``, before any conversion: ``sources.pixels.level_reader``; it pickles), ``spatial``
    says what counts as no data, ``label`` is what the mask says there."""

    reader: Any
    axes: str
    spatial: Spatial
    label: int

    def mask(self, region: Window) -> np.ndarray:
        """``(h, w)`` bool: the pixels of ``region`` (inside level 0) that are no data."""
        index = tuple(slice(region.y0, region.y1) if a == "y" else slice(region.x0, region.x1) if a == "x"
                      else slice(None) if a == "c" else 0 for a in self.axes)
        block = np.asarray(self.reader[index])
        kept = [a for a in self.axes if a in "cyx"]
        if "c" not in kept:
            block, kept = block[None], ["c", *kept]
        return nodata_mask(np.transpose(block, [kept.index(a) for a in "cyx"]), self.spatial, axis=0)


__all__ = ["Nodata", "nodata_label"]
