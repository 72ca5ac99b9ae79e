"""Find the images of an archive, describe them from metadata alone, and read them lazily as RGB uint8.

Descriptors (``ImageRef``, ``ImageSource``) are frozen dataclasses holding URLs and ``storage_options`` only,
never open handles, so they pickle to other processes. Their pixels are read by ``pipeline.source_pixels``.
PNG/JPEG have no random access and are decoded whole, once, so they are refused over ``MAX_DECODE_PIXELS``.

Axes are strings over ``"tczyx"`` in array order. ``t`` and ``z`` must have size 1 and are dropped (index 0);
images with more than one time point or plane are rejected at open time.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile
import zarr
from PIL import Image

from models.errors import GigasegError
from pipeline import ome
from pipeline.errors import ImageReadError, InputNotFoundError, UnsupportedImageError
from pipeline.sources.convert import ValueRange, check_convertible, is_per_band, out_channels
from pipeline.sources.discover import ImageRef, _sample
from pipeline.sources.georef import ome_zarr_spatial, tiff_spatial
from pipeline.sources.slides import open_slide, slide_levels, slide_spatial
from pipeline.spatial import Spatial
from pipeline.storage import filesystem, fs_path, is_local, zarr_store

log = logging.getLogger(__name__)

MAX_DECODE_PIXELS = 2**30
"""Largest PNG/JPEG decoded (about 1.07 gigapixels, 32768², 3.2 GB as RGB): larger ones must be converted to
tiled TIFF or Zarr. PIL's own decompression-bomb limit is raised to this value on import."""
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_DECODE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS

# PIL mode → (mode converted to on decode or None, channels, dtype). 16-bit RGB PNGs decode as 8-bit in PIL.
_PIL_MODES: dict[str, tuple[str | None, int, str]] = {
    "1": ("L", 1, "uint8"), "L": (None, 1, "uint8"), "LA": (None, 2, "uint8"), "La": ("LA", 2, "uint8"),
    "P": ("RGB", 3, "uint8"), "PA": ("RGBA", 4, "uint8"), "RGB": (None, 3, "uint8"),
    "RGBA": (None, 4, "uint8"), "RGBa": ("RGBA", 4, "uint8"), "RGBX": ("RGB", 3, "uint8"),
    "CMYK": ("RGB", 3, "uint8"), "YCbCr": ("RGB", 3, "uint8"), "HSV": ("RGB", 3, "uint8"),
    "I;16": (None, 1, "uint16"), "I;16L": (None, 1, "uint16"), "I;16B": (None, 1, "uint16"),
    "I": (None, 1, "int32"), "F": (None, 1, "float32"),
}  # fmt: skip


@dataclass(frozen=True)
class ArrayLevel:
    """One resolution level: ``path`` relative to the source's array root, its (H, W), and its (y, x) scale:
    the OME ``scale`` transform for OME-Zarr, else the downsampling factor relative to level 0."""

    path: str
    shape_yx: tuple[int, int]
    scale: tuple[float, float]


@dataclass(frozen=True)
class ImageSource:
    """What ``open_source`` learnt from an image's metadata; enough to read it anywhere.

    The array of level ``i`` is at ``join(group_url or ref.url, levels[i].path)`` (path ``""`` for a bare
    Zarr array); for TIFF and slides, ``path`` is the pyramid level index and PNG/JPEG have one level ``"0"``.
    ``spatial``: where the pixels are (pixel size, CRS and transform, nodata; ``pipeline.sources.georef``).
    """

    ref: ImageRef
    group_url: str | None
    levels: tuple[ArrayLevel, ...]
    axes: str
    channels: int
    dtype: str
    has_pyramid: bool
    storage_options: dict = field(default_factory=dict, hash=False)
    value_range: ValueRange | None = None
    spatial: Spatial = Spatial()
    bands: tuple[int, ...] | None = None  # the source channels the model sees, in order (None: RGB)

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError(f"{self.ref.url}: an ImageSource needs at least one level.")
        object.__setattr__(self, "storage_options", dict(self.storage_options))
        object.__setattr__(self, "value_range", normalise_range(self.value_range))
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))

    @property
    def out_channels(self) -> int:
        """The channels the model sees: 3 (RGB) or one per selected band."""
        return out_channels(self.bands)

    @property
    def shape_yx(self) -> tuple[int, int]:
        return self.levels[0].shape_yx


# ---------------------------------------------------------------- metadata

# group_url, levels, axes, channels, dtype, spatial
_Meta = tuple["str | None", tuple[ArrayLevel, ...], str, int, str, Spatial]


def open_source(
    ref: ImageRef, storage_options: Mapping[str, Any] | None = None, value_range: ValueRange | None = None,
    bands: Sequence[int] | None = None,
) -> ImageSource:
    """Describe ``ref`` from metadata alone (no pixels decoded) and check it converts to uint8: RGB, or the
    ``bands`` selected (``pipeline.sources.convert``).

    Raises ``InputNotFoundError`` (gone), ``UnsupportedImageError`` (layout, channel count or dtype with no
    conversion, see ``pipeline.convert``) or ``ImageReadError`` (not a readable image).
    """
    so = dict(storage_options or {})
    readers = {"zarr": _zarr_meta, "ome-zarr": _zarr_meta, "tiff": _tiff_meta, "png": _pil_meta, "jpeg": _pil_meta,
               "slide": _slide_meta}
    try:
        group_url, levels, axes, channels, dtype, spatial = readers[ref.format](ref, so)
    except GigasegError:
        raise
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"{ref.url}: image missing or incomplete ({exc}).") from exc
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported as one line
        raise ImageReadError(
            f"{ref.url}: cannot read {ref.format} metadata ({type(exc).__name__}: {exc}); the file may be "
            f"corrupt, truncated or not really {ref.format}. Re-export it or exclude it with inputs.patterns."
        ) from exc
    check_convertible(dtype, channels, value_range, where=ref.url, bands=bands)
    has_pyramid = ref.format in ("zarr", "ome-zarr") and group_url is not None and len(levels) >= 2
    return ImageSource(ref, group_url, levels, axes, channels, dtype, has_pyramid, so, value_range, spatial,
                       None if bands is None else tuple(bands))


def normalise_range(value_range: Any) -> ValueRange | None:
    """``value_range`` as floats: one ``(lo, hi)``, or a tuple of them (one per band)."""
    if value_range is None:
        return None
    if is_per_band(value_range):
        return tuple((float(lo), float(hi)) for lo, hi in value_range)
    return tuple(float(v) for v in value_range)


def native_dtype(dtype: Any) -> str:
    return np.dtype(dtype).newbyteorder("=").name


def _check_axes(axes: str, shape: Sequence[int], where: str) -> int:
    """Validate ``axes`` against ``shape``; return the channel count."""
    if len(axes) != len(shape) or len(set(axes)) != len(axes) or not set(axes) <= set("tczyx"):
        raise UnsupportedImageError(
            f"{where}: axes {axes!r} do not fit array shape {tuple(shape)}; axes must be distinct letters of "
            f"'tczyx', one per dimension."
        )
    if "y" not in axes or "x" not in axes:
        raise UnsupportedImageError(f"{where}: axes {axes!r} lack y or x; a 2-D image is required.")
    for a in "tz":
        if a in axes and shape[axes.index(a)] != 1:
            raise UnsupportedImageError(
                f"{where}: axis {a!r} has size {shape[axes.index(a)]}; only single 2-D images (t = z = 1) are "
                f"segmented. Export the plane to segment as its own image."
            )
    return shape[axes.index("c")] if "c" in axes else 1


def _infer_axes(shape: Sequence[int], where: str) -> str:
    """Plain arrays: ``(y, x)`` → ``"yx"``; ``(y, x, c≤4)`` → ``"yxc"``; ``(c≤4, y, x)`` → ``"cyx"``; with more
    channels, the end axis (first or last) that is smaller than both others: ``(y, x, c)`` or ``(c, y, x)``."""
    if len(shape) == 2:
        return "yx"
    if len(shape) == 3 and shape[-1] <= 4:
        return "yxc"
    if len(shape) == 3 and shape[0] <= 4:
        return "cyx"
    if len(shape) == 3 and shape[-1] < min(shape[0], shape[1]):
        return "yxc"
    if len(shape) == 3 and shape[0] < min(shape[1], shape[2]):
        return "cyx"
    raise UnsupportedImageError(
        f"{where}: array of shape {tuple(shape)} has no recognised layout; plain Zarr arrays must be (y, x), "
        f"(y, x, c) or (c, y, x), the channel axis smaller than y and x. Use an OME-Zarr group with axes "
        f"metadata."
    )


def spatial_shape(shape: Sequence[int], axes: str) -> tuple[int, int]:
    return int(shape[axes.index("y")]), int(shape[axes.index("x")])


def _zarr_meta(ref: ImageRef, so: dict) -> _Meta:
    node = zarr.open(store=zarr_store(ref.url, so, read_only=True), mode="r")
    if isinstance(node, zarr.Array):
        axes = _infer_axes(node.shape, ref.url)
        level = ArrayLevel("", spatial_shape(node.shape, axes), (1.0, 1.0))
        return None, (level,), axes, _check_axes(axes, node.shape, ref.url), native_dtype(node.dtype), Spatial()
    attrs = node.attrs.asdict()
    if not ome.is_multiscales(attrs):
        names = sorted(node.array_keys())
        if len(names) != 1:
            raise UnsupportedImageError(
                f"{ref.url}: Zarr group without OME multiscales holds {len(names)} arrays {_sample(names)}, so "
                f"the image is ambiguous; point inputs.url/patterns at one array or add OME-NGFF metadata."
            )
        arr = node[names[0]]
        axes = _infer_axes(arr.shape, ref.url)
        level = ArrayLevel(names[0], spatial_shape(arr.shape, axes), (1.0, 1.0))
        return ref.url, (level,), axes, _check_axes(axes, arr.shape, ref.url), native_dtype(arr.dtype), Spatial()
    entries = ome.read_multiscales(attrs)
    arrays = [node[path] for path, _ in entries]
    shape0 = arrays[0].shape
    axes = ome.read_axes(attrs) or ("tczyx" if len(shape0) == 5 else "?")  # NGFF ≤ 0.3 implies tczyx
    channels = _check_axes(axes, shape0, ref.url)
    iy, ix = axes.index("y"), axes.index("x")
    levels = []
    for (path, scale), arr in zip(entries, arrays, strict=True):
        if arr.ndim != len(axes):
            raise UnsupportedImageError(
                f"{ref.url}: dataset {path!r} has {arr.ndim} dimensions but axes are {axes!r}; fix the OME "
                f"multiscales metadata."
            )
        shape_yx = spatial_shape(arr.shape, axes)
        sy, sx = (scale[iy], scale[ix]) if scale else (shape0[iy] / shape_yx[0], shape0[ix] / shape_yx[1])
        levels.append(ArrayLevel(path, shape_yx, (float(sy), float(sx))))
    spatial = ome_zarr_spatial(attrs, axes, entries[0][1], ref.url)
    return ref.url, tuple(levels), axes, channels, native_dtype(arrays[0].dtype), spatial


def _tiff_axes(tiff_axes: str, shape: Sequence[int], where: str) -> str:
    """tifffile series axes → ``tczyx`` letters (``S`` samples and ``C`` → ``c``)."""
    mapping = {"S": "c", "C": "c", "Y": "y", "X": "x", "T": "t", "Z": "z"}
    for letter, size in zip(tiff_axes, shape, strict=True):
        if letter not in mapping:
            raise UnsupportedImageError(
                f"{where}: TIFF series 0 has axes {tiff_axes!r} with shape {tuple(shape)}; axis {letter!r} "
                f"(size {size}) is not a channel, y or x axis. Only single 2-D images (any number of samples "
                f"per pixel) are read; split the stack into one file per image."
            )
    return "".join(mapping[a] for a in tiff_axes)


def open_tiff_file(url: str, so: Mapping[str, Any]) -> Any:
    """Binary file handle for tifffile. Remote files get a 64 KiB read-ahead block, not fsspec's 5 MiB
    default: tile reads jump around the file, and each jump would otherwise fetch a whole block."""
    fs = filesystem(url, so)
    if is_local(url):
        return fs.open(fs_path(url), "rb")
    return fs.open(fs_path(url), "rb", block_size=2**16, cache_type="readahead")


def _tiff_meta(ref: ImageRef, so: dict) -> _Meta:
    with open_tiff_file(ref.url, so) as fh, tifffile.TiffFile(fh) as tif:
        series = tif.series[0]
        axes = _tiff_axes(series.axes, series.shape, ref.url)
        channels = _check_axes(axes, series.shape, ref.url)
        h0, w0 = spatial_shape(series.shape, axes)
        levels = []
        for i, lvl in enumerate(series.levels):
            h, w = spatial_shape(lvl.shape, axes)
            levels.append(ArrayLevel(str(i), (h, w), (h0 / h, w0 / w)))
        spatial = tiff_spatial(tif, ref.url, so)
        return None, tuple(levels), axes, channels, native_dtype(series.dtype), spatial


def pil_mode(mode: str, info: Mapping[str, Any], where: str) -> tuple[str | None, int, str]:
    if mode == "P" and "transparency" in info:
        return "RGBA", 4, "uint8"
    if mode not in _PIL_MODES:
        raise UnsupportedImageError(
            f"{where}: PIL image mode {mode!r} has no RGB conversion (supported: {sorted(_PIL_MODES)}); "
            f"re-export the image as RGB or grayscale."
        )
    return _PIL_MODES[mode]


def _pil_meta(ref: ImageRef, so: dict) -> _Meta:
    fs = filesystem(ref.url, so)
    with fs.open(fs_path(ref.url), "rb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(fh) as im:  # reads the header only
                mode, info, (w, h) = im.mode, dict(im.info), im.size
        except Image.DecompressionBombError:  # over 2 × PIL's limit, i.e. over 2 × MAX_DECODE_PIXELS
            raise _too_large(ref, f"over {2 * MAX_DECODE_PIXELS:,} px") from None
    if w * h > MAX_DECODE_PIXELS:
        raise _too_large(ref, f"{w}×{h} px")
    _, channels, dtype = pil_mode(mode, info, ref.url)
    return None, (ArrayLevel("0", (h, w), (1.0, 1.0)),), "cyx", channels, dtype, Spatial()


def _slide_meta(ref: ImageRef, so: dict) -> _Meta:
    """A whole-slide image's levels (RGBA uint8, ``yxc``; ``pipeline.sources.slides``) and its mpp."""
    slide = open_slide(ref.url)
    try:
        levels = tuple(ArrayLevel(str(i), shape, (ds, ds)) for i, (shape, ds) in enumerate(slide_levels(slide)))
        return None, levels, "yxc", 4, "uint8", slide_spatial(slide.properties)
    finally:
        slide.close()


def _too_large(ref: ImageRef, size: str) -> UnsupportedImageError:
    return UnsupportedImageError(
        f"{ref.url}: {ref.format.upper()} of {size} exceeds the {MAX_DECODE_PIXELS:,} px decode limit; PNG/JPEG "
        f"have no random access and are decoded whole. Convert it to a tiled BigTIFF or Zarr "
        f"(e.g. `vips tiffsave in.png out.tif --tile --bigtiff --compression zstd`)."
    )
