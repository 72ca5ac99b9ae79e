"""The HTML preview's picture of an image and what it says about where its pixels are: the image as the model
saw it (RGB, or three of the bands ``inputs.bands`` selects, ``inputs.preview_bands``), a scale bar sized for the
picture as shown, and the CRS of a georeferenced image (``pipeline.spatial.Spatial``, as the mask group records
it)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

from pipeline.sources.formats import ImageSource
from pipeline.sources.pixels import source_to_dask
from pipeline.spatial import Spatial, short_unit


def preview_rgb(image: np.ndarray, preview_bands: Sequence[int] | None = None) -> np.ndarray:
    """``(C, h, w)`` uint8 as the model sees it → ``(h, w, 3)`` uint8 to show: channels ``preview_bands`` as red,
    green, blue (positions among the channels; default ``0, 1, 2``); an image of fewer than 3 channels and no
    ``preview_bands`` shows its first as gray."""
    c = image.shape[0]
    if preview_bands is None:
        preview_bands = (0, 1, 2) if c >= 3 else (0, 0, 0)
    if len(preview_bands) != 3 or not all(0 <= b < c for b in preview_bands):
        raise ValueError(f"preview bands {list(preview_bands)}: three positions among the image's {c} channels")
    return np.ascontiguousarray(np.moveaxis(image[list(preview_bands)], 0, -1))


def image_preview(source: ImageSource, step: int, preview_bands: Sequence[int] | None = None) -> np.ndarray:
    """Every ``step``-th pixel of ``source`` as the model sees it (``source_to_dask``: RGB or the selected bands),
    as ``preview_rgb`` shows it: ``(⌈H/step⌉, ⌈W/step⌉, 3)`` uint8, read chunk by chunk."""
    pixels = source_to_dask(source, chunk=2048)[:, ::step, ::step].compute()
    return preview_rgb(pixels, preview_bands)

_BIGGER = {"meter": ("kilometer", 1000.0), "micrometer": ("millimeter", 1000.0), "millimeter": ("meter", 1000.0)}


def nice_length(limit: float) -> float:
    """The largest 1, 2 or 5 × 10^k not above ``limit`` (> 0): ``nice_length(370) == 200``."""
    if not limit > 0:
        raise ValueError(f"a scale bar needs a length > 0, got {limit}")
    k = math.floor(math.log10(limit))
    return max(m * 10.0**k for m in (1, 2, 5) if m * 10.0**k <= limit * (1 + 1e-12))


def scale_bar(spatial: Spatial, step: int, panel_width: int, fraction: float = 0.25) -> tuple[int, str]:
    """``(bar width in shown px, label)`` for a picture shown at one pixel per ``step`` level-0 pixels, about
    ``fraction`` of ``panel_width``: length ``L = nice_length(fraction · panel_width · step · size_x)`` in the
    image's unit (level-0 pixels when it has none; a larger unit from 1000 up), width ``L / (step · size_x)``."""
    size = spatial.pixel_size[1] if spatial.pixel_size else 1.0
    unit = spatial.unit if spatial.pixel_size else None
    per_shown_px = step * size
    length = nice_length(fraction * panel_width * per_shown_px)
    width = max(1, round(length / per_shown_px))
    shown, shown_unit = length, unit
    if unit in _BIGGER and length >= _BIGGER[unit][1]:
        shown_unit, factor = _BIGGER[unit]
        shown = length / factor
    if spatial.pixel_size and unit is None and spatial.georeferenced:
        label = f"{shown:g} (CRS units)"
    else:
        label = f"{shown:g} {short_unit(shown_unit)}"
    return width, label


def spatial_html(spatial: Spatial, step: int, panel_width: int) -> str:
    """A scale bar and, for a georeferenced image, its CRS and pixel size, as an HTML fragment."""
    width, label = scale_bar(spatial, step, panel_width)
    bar = (f"<div style='display:flex;align-items:center;gap:6px'><div style='width:{width}px;height:6px;"
           f"background:#111;border:1px solid #fff;outline:1px solid #111'></div>"
           f"<span>{html.escape(label)}</span></div>")
    facts = []
    if spatial.georeferenced:
        name = spatial.crs_name or "a CRS without a name"
        facts.append(f"CRS: {name}" + (f" (EPSG:{spatial.epsg})" if spatial.epsg else ""))
    if spatial.pixel_size:
        sy, sx = spatial.pixel_size
        size = f"{sx:g}" if sx == sy else f"{sx:g} × {sy:g}"
        facts.append(f"pixel {size} {short_unit(spatial.unit) if spatial.unit else '(CRS units)'}")
    else:
        facts.append("no physical pixel size in the input")
    return bar + f"<p style='margin:2px 0 0 0'>{html.escape('; '.join(facts))}</p>"


__all__ = ["nice_length", "scale_bar", "spatial_html"]
