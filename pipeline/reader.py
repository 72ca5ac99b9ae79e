"""Windows read straight from a Zarr pyramid level, padded where they reach past the image.

Workers call these; they never see a whole image. A window is clipped to the image, only the chunks
under the clipped part are read, and the rest is filled by padding:

- ``reflect`` (tiles): the image mirrored about its own edges without repeating the edge pixel, with
  global indices (``reflect_index``), so every tile grid sees the same virtual padded image and two
  grids agree near the border too. A fully convolutional network sees plausible content there.
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
    return np.pad(block, pads, mode=mode)


def reflect_index(start: int, length: int, size: int) -> np.ndarray:
    """Indices ``start … start+length−1`` mirrored into ``[0, size)`` (numpy's "reflect", any distance).

    ``m = i mod 2(size−1)``; index ``= m`` if ``m < size`` else ``2(size−1) − m``; ``size == 1`` → 0.
    """
    i = np.arange(start, start + length)
    if size == 1:
        return np.zeros_like(i)
    period = 2 * (size - 1)
    m = np.mod(i, period)
    return np.where(m < size, m, period - m)


def read_window(
    array,
    axes: str,
    shape_yx: tuple[int, int],
    window: Window,
    *,
    pad: PadMode = "reflect",
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """RGB uint8 ``(3, window.h, window.w)`` of an image level, padded outside ``shape_yx``.

    Only the chunks under the part of the image the window (or its mirror image) covers are read.
    """
    inner = window.clip(*shape_yx)
    if inner == window:
        return to_rgb8(read_region(array, axes, window), value_range)
    if pad == "constant":
        if inner.empty:
            return np.zeros((3, window.h, window.w), np.uint8)
        return pad_to_window(to_rgb8(read_region(array, axes, inner), value_range), inner, window, pad)
    iy = reflect_index(window.y0, window.h, shape_yx[0])
    ix = reflect_index(window.x0, window.w, shape_yx[1])
    region = Window(int(iy.min()), int(ix.min()), int(iy.max() - iy.min()) + 1, int(ix.max() - ix.min()) + 1)
    block = to_rgb8(read_region(array, axes, region), value_range)
    return block[:, iy - region.y0][:, :, ix - region.x0]
