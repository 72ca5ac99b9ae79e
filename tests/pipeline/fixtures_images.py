"""Small seeded images in every layout the data path reads, generated in code under a test's tmp_path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import zarr
from PIL import Image

from pipeline import ome


def pixels(shape: Sequence[int], dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    """Seeded noise over the full range of ``dtype`` (floats in [0, 1))."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.random(tuple(shape)).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, tuple(shape), dtype=dt, endpoint=True)


def write_tiff(path: Path, data: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, **kwargs)
    return path


def write_pyramidal_tiff(path: Path, data: np.ndarray, levels: int = 3, tile: int = 128) -> Path:
    """A (H, W, 3) image with ``levels - 1`` reduced-resolution SubIFDs (what slide scanners write)."""
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(data, subifds=levels - 1, tile=(tile, tile), photometric="rgb")
        for level in range(1, levels):
            f = 2**level
            tw.write(data[::f, ::f], subfiletype=1, tile=(tile, tile), photometric="rgb")
    return path


def write_image(path: Path, data: np.ndarray, **kwargs) -> Path:
    """PNG or JPEG via PIL (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data).save(path, **kwargs)
    return path


def write_zarr(path: Path, data: np.ndarray, chunks: Sequence[int] | None = None, zarr_format: int = 3) -> Path:
    arr = zarr.create_array(
        store=str(path), shape=data.shape, dtype=data.dtype, chunks=tuple(chunks or data.shape),
        zarr_format=zarr_format,
    )
    arr[...] = data
    return path


def write_ome_zarr(
    path: Path, levels: Sequence[np.ndarray], axes: str = "cyx", version: str = "0.5", chunk: int = 128
) -> Path:
    """An OME-Zarr multiscale group; 0.5 is Zarr v3 with attrs["ome"], 0.4 is Zarr v2 with attrs["multiscales"]."""
    fmt = 3 if version == "0.5" else 2
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    for i, data in enumerate(levels):
        chunks = tuple(chunk if a in "yx" else 1 if a in "tz" else n for a, n in zip(axes, data.shape))
        group.create_array(str(i), shape=data.shape, dtype=data.dtype, chunks=chunks)[...] = data
    meta = ome.image_multiscales(path.stem, len(levels), axes=tuple(axes))
    if version == "0.5":
        group.attrs["ome"] = meta
    else:
        ms = meta["multiscales"][0]
        group.attrs["multiscales"] = [{**ms, "version": "0.4"}]
    return path


def mean2_reference(a: np.ndarray) -> np.ndarray:
    """Brute-force 2×2 mean of (C, h, w) uint8: floor((S + n/2) / n) over the n pixels that exist."""
    c, h, w = a.shape
    out = np.zeros((c, (h + 1) // 2, (w + 1) // 2), np.uint8)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            block = a[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].astype(np.int64)
            n = block.shape[1] * block.shape[2]
            out[:, i, j] = (block.sum(axis=(1, 2)) + n // 2) // n
    return out
