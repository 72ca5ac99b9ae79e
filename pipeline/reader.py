"""Windows read straight from a Zarr pyramid level, padded where they reach past the image.

Workers call these; they never see a whole image. A window is clipped to the image, only the chunks
under the clipped part are read, and the rest is filled by padding:

- ``reflect`` (tiles): mirror without repeating the edge pixel, so a fully convolutional network sees
  plausible content at the border; numpy repeats the reflection when the pad exceeds the data.
- ``constant`` (context windows): zeros, as FCtL pads its context crops.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pipeline.convert import to_rgb8
from pipeline.tiling import Window

PadMode = Literal["reflect", "constant"]


def read_region(array, axes: str, region: Window) -> np.ndarray:
    """Read ``region`` (inside the image) of an array with named ``axes`` as ``(C, h, w)``.

    Axes other than c/y/x (t, z) must be singleton or are read at index 0.
    """
    index = []
    for ax in axes:
        if ax == "y":
            index.append(slice(region.y0, region.y1))
        elif ax == "x":
            index.append(slice(region.x0, region.x1))
        elif ax == "c":
            index.append(slice(None))
        else:
            index.append(0)
    block = np.asarray(array[tuple(index)])
    kept = [ax for ax in axes if ax in "cyx"]
    if "c" not in kept:
        block = block[None]
        kept = ["c", *kept]
    return np.transpose(block, [kept.index(a) for a in "cyx"])


def pad_to_window(block: np.ndarray, inner: Window, window: Window, mode: PadMode) -> np.ndarray:
    """Pad ``block`` (``(C, inner.h, inner.w)``, the part of ``window`` inside the image) to the window."""
    pads = ((0, 0), (inner.y0 - window.y0, window.y1 - inner.y1), (inner.x0 - window.x0, window.x1 - inner.x1))
    if not any(p for axis in pads for p in axis):
        return block
    if mode == "reflect" and min(block.shape[1:]) < 2:
        mode_np = "edge"  # a one-pixel strip has nothing to mirror
    else:
        mode_np = mode
    return np.pad(block, pads, mode=mode_np)


def read_window(
    array,
    axes: str,
    shape_yx: tuple[int, int],
    window: Window,
    *,
    pad: PadMode = "reflect",
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """RGB uint8 ``(3, window.h, window.w)`` of an image level, padded outside ``shape_yx``."""
    inner = window.clip(*shape_yx)
    if inner.empty:
        return np.zeros((3, window.h, window.w), np.uint8)
    block = to_rgb8(read_region(array, axes, inner), value_range)
    return pad_to_window(block, inner, window, pad)
