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
from PIL import Image

from pipeline.sources.convert import ValueRange, out_channels, to_uint8
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


def index_slices(index: np.ndarray) -> list[slice]:
    """``index`` (a ``reflect_index`` result) as the runs of consecutive indices it is made of, each a slice
    (a mirrored run is a reversed slice), so ``take_slices`` copies the whole with memcpy-speed slicing instead
    of an element-by-element gather (a few runs: the inside and a mirrored margin at each end)."""
    out: list[slice] = []
    i, n = 0, len(index)
    while i < n:
        j = i + 1
        step = int(index[j] - index[i]) if j < n and abs(int(index[j] - index[i])) == 1 else 1
        while j < n and int(index[j] - index[j - 1]) == step:
            j += 1
        a, b = int(index[i]), int(index[j - 1])
        out.append(slice(a, b + 1) if step == 1 else slice(a, b - 1 if b > 0 else None, -1))
        i = j
    return out


def take_slices(array: np.ndarray, slices: list[slice], axis: int) -> np.ndarray:
    """``array`` indexed along ``axis`` by the runs of ``index_slices``: a view for one forward run, else one copy."""
    pick = [slice(None)] * array.ndim
    if len(slices) == 1 and slices[0].step is None:
        pick[axis] = slices[0]
        return array[tuple(pick)]
    parts = []
    for s in slices:
        pick[axis] = s
        parts.append(array[tuple(pick)])
    return np.concatenate(parts, axis=axis)


def row_runs(windows: list[Window]) -> list[list[int]]:
    """Indices of ``windows`` grouped into runs that can be read as one: the same rows (``y0``, ``h``) and
    x ranges that overlap or touch, in x order. Windows apart in x stay apart, so a run's union never
    covers pixels none of its windows needs."""
    runs: list[list[int]] = []
    by_row: dict[tuple[int, int], list[int]] = {}
    for k, w in enumerate(windows):
        by_row.setdefault((w.y0, w.h), []).append(k)
    for ks in by_row.values():
        ks.sort(key=lambda k: windows[k].x0)
        run, end = [ks[0]], windows[ks[0]].x1
        for k in ks[1:]:
            if windows[k].x0 <= end:
                run.append(k)
                end = max(end, windows[k].x1)
            else:
                runs.append(run)
                run, end = [k], windows[k].x1
        runs.append(run)
    return runs


def read_windows(
    array,
    axes: str,
    shape_yx: tuple[int, int],
    windows: list[Window],
    *,
    pad: PadMode = "reflect",
    value_range: ValueRange | None = None,
    bands: tuple[int, ...] | None = None,
) -> np.ndarray:
    """``read_window`` of each window, stacked ``(N, C, h, w)`` (all windows one size), reading each run of
    side-by-side windows (``row_runs``) as one union window.

    Neighbouring tiles overlap and share chunks; read one by one, a chunk is fetched and decoded once per
    tile that touches it (a 1024² chunk by up to 9 tiles of 512 with overlap 128), read as runs once per
    run. That is fewer GETs on an object store, and less CPU: 6.3 → 2.4 ms per 512² tile from a local
    Zarr with 1024² zstd chunks, batch 8.
    Padding and conversion are per pixel and depend only on global coordinates (``reflect_index``), so a
    slice of the union equals the window read alone, bit for bit.
    """
    if len({(w.h, w.w) for w in windows}) > 1:
        raise ValueError(f"read_windows needs windows of one size, got {sorted({(w.h, w.w) for w in windows})}")
    out: list[np.ndarray | None] = [None] * len(windows)
    for run in row_runs(windows):
        x0 = min(windows[k].x0 for k in run)
        x1 = max(windows[k].x1 for k in run)
        first = windows[run[0]]
        block = read_window(array, axes, shape_yx, Window(first.y0, x0, first.h, x1 - x0), pad=pad,
                            value_range=value_range, bands=bands)
        for k in run:
            out[k] = block[:, :, windows[k].x0 - x0 : windows[k].x1 - x0]
    return np.stack(out)


def resize_image(image: np.ndarray, out: int) -> np.ndarray:
    """``(C, r, r)`` uint8 → ``(C, out, out)`` uint8, bilinear (PIL; its support widens when shrinking). Three
    channels are resized as one RGB image, any other count band by band (PIL resamples each band alike)."""
    if image.shape[1:] == (out, out):
        return image
    if image.shape[0] != 3:
        return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(band)).resize(
            (out, out), Image.Resampling.BILINEAR)) for band in image])
    hwc = Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1)))
    return np.moveaxis(np.asarray(hwc.resize((out, out), Image.Resampling.BILINEAR)), -1, 0)


def upsample_index(start: int, length: int, src_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of a ×2 bilinear upsampling (``align_corners=False``) of ``src_size`` rows.

    Output row ``i`` samples ``u = max(0, (i + ½)/2 − ½)``: ``i0 = ⌊u⌋``, ``i1 = min(i0 + 1, src_size − 1)``,
    ``λ = u − i0``; value ``(1 − λ)·src[i0] + λ·src[i1]``. This is ``F.interpolate(scale_factor=2)`` on the
    whole map, so a window computed alone equals the same window of the whole upsampled map.
    """
    i = np.arange(start, start + length, dtype=np.float64)
    u = np.maximum(0.0, (i + 0.5) / 2.0 - 0.5)
    i0 = np.minimum(np.floor(u).astype(np.int64), src_size - 1)
    i1 = np.minimum(i0 + 1, src_size - 1)
    return i0, i1, (u - i0).astype(np.float32)


def is_half(src_size: int, dst_size: int) -> bool:
    """Whether ``src_size`` is half of ``dst_size`` as a pyramid level is (``⌊dst/2⌋`` or ``⌈dst/2⌉``)."""
    return abs(2 * src_size - dst_size) <= 1


def resize_index(start: int, length: int, src_size: int, dst_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of a bilinear resize (``align_corners=False``, no antialias) of ``src_size`` rows to
    ``dst_size``, output rows ``[start, start + length)``: ``upsample_index`` (exactly ×2) where ``src_size`` is
    half of ``dst_size`` (``is_half``: adjacent pyramid levels), else ``F.interpolate(size=…, mode="bilinear")``'s
    rule in float32: ``u = max(0, (i + ½)·src/dst − ½)``, ``i0 = min(⌊u⌋, src − 1)``, ``i1 = min(i0 + 1, src − 1)``,
    ``λ = u − i0``; value ``(1 − λ)·src[i0] + λ·src[i1]``."""
    if is_half(src_size, dst_size):
        return upsample_index(start, length, src_size)
    scale = np.float32(src_size) / np.float32(dst_size)
    i = np.arange(start, start + length, dtype=np.float32)
    u = np.maximum(np.float32(0), scale * (i + np.float32(0.5)) - np.float32(0.5))
    i0 = np.minimum(np.floor(u).astype(np.int64), src_size - 1)
    i1 = np.minimum(i0 + 1, src_size - 1)
    return i0, i1, (u - i0).astype(np.float32)


def upsample2x_window(array, src_shape: tuple[int, int], dst_shape: tuple[int, int], window: Window) -> np.ndarray:
    """Window of the bilinear upsampling of a ``(C, H, W)`` map to ``dst_shape`` (×2 between pyramid levels, else
    by the ratio of the sizes: ``resize_index``), mirrored past ``dst_shape``: float32.

    Only the source rows and columns under the window are read. Pixels outside the destination image take
    the upsampled value at their mirror position (``reflect_index``), as tiles see images.
    """
    iy = reflect_index(window.y0, window.h, dst_shape[0])
    ix = reflect_index(window.x0, window.w, dst_shape[1])
    y0, y1 = int(iy.min()), int(iy.max()) + 1
    x0, x1 = int(ix.min()), int(ix.max()) + 1
    ry0, ry1, wy = resize_index(y0, y1 - y0, src_shape[0], dst_shape[0])
    rx0, rx1, wx = resize_index(x0, x1 - x0, src_shape[1], dst_shape[1])
    sy0, sy1 = int(ry0.min()), int(ry1.max()) + 1
    sx0, sx1 = int(rx0.min()), int(rx1.max()) + 1
    src = np.asarray(array[:, sy0:sy1, sx0:sx1], dtype=np.float32)
    rows = src[:, ry0 - sy0] * (1 - wy)[None, :, None] + src[:, ry1 - sy0] * wy[None, :, None]
    up = rows[:, :, rx0 - sx0] * (1 - wx)[None, None, :] + rows[:, :, rx1 - sx0] * wx[None, None, :]
    return up[:, iy - y0][:, :, ix - x0]


def read_window(
    array,
    axes: str,
    shape_yx: tuple[int, int],
    window: Window,
    *,
    pad: PadMode = "reflect",
    value_range: ValueRange | None = None,
    bands: tuple[int, ...] | None = None,
) -> np.ndarray:
    """uint8 ``(C, window.h, window.w)`` of an image level (RGB, or the ``bands`` selected:
    ``convert.to_uint8``), padded outside ``shape_yx``.

    Only the chunks under the part of the image the window (or its mirror image) covers are read.
    """
    inner = window.clip(*shape_yx)
    if inner == window:
        return to_uint8(read_region(array, axes, window), value_range, bands)
    if pad == "constant":
        if inner.empty:
            return np.zeros((out_channels(bands), window.h, window.w), np.uint8)
        return pad_to_window(to_uint8(read_region(array, axes, inner), value_range, bands), inner, window, pad)
    iy = reflect_index(window.y0, window.h, shape_yx[0])
    ix = reflect_index(window.x0, window.w, shape_yx[1])
    region = Window(int(iy.min()), int(ix.min()), int(iy.max() - iy.min()) + 1, int(ix.max() - ix.min()) + 1)
    block = to_uint8(read_region(array, axes, region), value_range, bands)
    rows = take_slices(block, index_slices(iy - region.y0), 1)
    return take_slices(rows, index_slices(ix - region.x0), 2)
