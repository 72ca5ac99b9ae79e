"""The spatial metadata of an input, from its own metadata only (``pipeline.spatial.Spatial``):

- GeoTIFF (a TIFF with GeoKeys, model pixel scale, tiepoints or a model transformation): CRS, affine transform
  and nodata, read by rasterio (GDAL), the ``geo`` extra. Without it such a file fails with an error naming the
  extra, rather than losing its georeferencing silently.
- OME-TIFF: ``Pixels`` ``PhysicalSizeX/Y`` and their units (µm when not given, as the OME schema says).
- Other TIFFs: the resolution tags when ``ResolutionUnit`` is centimetre or inch (what OpenSlide reads as the mpp
  of a generic TIFF); unit "none" (tifffile's default) means no size.
- OME-Zarr: the ``scale`` of the first dataset and the axes' units (NGFF names already).
- Whole-slide images: OpenSlide's ``openslide.mpp-x/y`` (``pipeline.sources.slides``).

A GeoTIFF's ``GDAL_NODATA`` tag is its nodata value; nothing else is taken as nodata.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.errors import UnsupportedImageError
from pipeline.optional import require
from pipeline.spatial import NGFF_SPACE_UNITS, OME_XML_UNITS, Spatial, crs_name_of, pixel_size_of
from pipeline.storage import filesystem, fs_path, is_local, local_path

log = logging.getLogger(__name__)

#: TIFF tags that make a file a GeoTIFF: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735)
GDAL_NODATA_TAG = 42113
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}  # ResolutionUnit inch / centimetre → µm per unit
#: metres per unit of each NGFF length unit gigaseg meets in inputs (to put y and x in one unit).
_METRES = {"angstrom": 1e-10, "picometer": 1e-12, "nanometer": 1e-9, "micrometer": 1e-6, "millimeter": 1e-3,
           "centimeter": 1e-2, "decimeter": 0.1, "meter": 1.0, "kilometer": 1e3, "inch": 0.0254, "foot": 0.3048,
           "yard": 0.9144, "mile": 1609.344}


def tiff_spatial(tif: Any, url: str, storage_options: Mapping[str, Any]) -> Spatial:
    """The spatial metadata of an open ``tifffile.TiffFile`` (module docstring); ``url`` to open it with GDAL."""
    page = tif.pages[0]
    tags = page.tags
    if any(code in tags for code in GEOTIFF_TAGS):
        return geotiff_spatial(url, storage_options)
    nodata = _gdal_nodata(tags)
    if tif.is_ome:
        found = ome_xml_spatial(tif.ome_metadata or "", url)
        if found is not None:
            return Spatial(*found, nodata=nodata, origin="ome-xml")
    unit_code = int(tags[296].value) if 296 in tags else 1
    if unit_code in _RESOLUTION_UNIT_UM and 282 in tags and 283 in tags:
        per_unit = _RESOLUTION_UNIT_UM[unit_code]
        xres, yres = (_rational(tags[code].value) for code in (282, 283))
        if xres > 0 and yres > 0:
            return Spatial((per_unit / yres, per_unit / xres), "micrometer", nodata=nodata, origin="tiff resolution")
    return Spatial(nodata=nodata, origin="gdal nodata tag" if nodata is not None else None)


def geotiff_spatial(url: str, storage_options: Mapping[str, Any]) -> Spatial:
    """CRS, transform and nodata of a GeoTIFF, read by rasterio. A file without a CRS keeps only its nodata (its
    transform alone would place it nowhere); ground control points are not read (warped inputs are out of scope)."""
    rasterio = require("rasterio", f"{url}: a GeoTIFF (reading its CRS, transform and nodata)")
    try:
        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
            if is_local(url):
                ds = rasterio.open(local_path(url))
            else:  # GDAL reads through fsspec (rasterio's opener): the same credentials and endpoint as the pixels
                ds = rasterio.open(fs_path(url), opener=filesystem(url, storage_options))
            with ds:
                crs, transform, nodata = ds.crs, tuple(ds.transform)[:6], ds.nodata
    except rasterio.errors.RasterioError as exc:
        raise UnsupportedImageError(f"{url}: GDAL cannot read this GeoTIFF's georeferencing ({exc}).") from exc
    if crs is None:
        log.warning("%s: GeoTIFF tags but no CRS; the mask is written without georeferencing", url)
        return Spatial(nodata=nodata, origin="geotiff")
    wkt = crs.to_wkt()
    size = pixel_size_of(transform)
    unit = None
    if not crs.is_geographic:
        try:
            name, metres = crs.linear_units_factor
        except Exception:  # noqa: BLE001 - a CRS without a linear unit: sizes stay in CRS units, no NGFF unit
            name, metres = None, None
        if metres:
            size, unit = (size[0] * metres, size[1] * metres), "meter"
        else:
            log.warning("%s: CRS unit %r is not a length; the NGFF scale carries no unit", url, name)
    return Spatial(size, unit, wkt, transform, crs_name_of(wkt), crs.to_epsg(), nodata, origin="geotiff")


def ome_xml_spatial(xml: str, url: str) -> tuple[tuple[float, float], str] | None:
    """``((y, x) size, NGFF unit)`` of the first ``Pixels`` of an OME-XML document, None when it states none."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        log.warning("%s: unreadable OME-XML (%s); no physical pixel size", url, exc)
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    x = float(pixels.attrib["PhysicalSizeX"])
    y = float(pixels.attrib.get("PhysicalSizeY", x))
    ux = _ome_unit(pixels.attrib.get("PhysicalSizeXUnit", "µm"), url)
    uy = _ome_unit(pixels.attrib.get("PhysicalSizeYUnit", "µm"), url)
    return (convert_length(y, uy, ux), x), ux


def ome_zarr_spatial(attrs: Mapping[str, Any], axes: str, scale0: Sequence[float], url: str) -> Spatial:
    """Pixel size and unit of an OME-Zarr's first dataset: its ``scale`` on y and x and the axes' units. A unit
    that is not an NGFF space unit is dropped (with a warning); a scale of 1 without a unit is no metadata."""
    if not scale0:
        return Spatial()
    iy, ix = axes.index("y"), axes.index("x")
    size = (float(scale0[iy]), float(scale0[ix]))
    ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales") or [{}]
    entries = [a for a in ms[0].get("axes", ()) if isinstance(a, Mapping)]
    units = {str(a.get("name", "")).lower(): a.get("unit") for a in entries}
    uy, ux = units.get("y"), units.get("x")
    for u in {uy, ux} - {None}:
        if u not in NGFF_SPACE_UNITS:
            log.warning("%s: axis unit %r is not an NGFF space unit; ignored", url, u)
    uy, ux = (u if u in NGFF_SPACE_UNITS else None for u in (uy, ux))
    if ux is None and uy is None and size == (1.0, 1.0):
        return Spatial()
    if ux and uy and ux != uy:
        size = (convert_length(size[0], uy, ux), size[1])
    return Spatial(size, ux or uy, origin="ome-zarr")


def convert_length(value: float, unit: str, to: str) -> float:
    """``value`` in ``unit`` expressed in ``to`` (both NGFF length units)."""
    if unit == to:
        return value
    if unit not in _METRES or to not in _METRES:
        raise UnsupportedImageError(f"pixel size in {unit!r} cannot be put in {to!r}; use one unit for y and x.")
    return value * _METRES[unit] / _METRES[to]


def _ome_unit(symbol: str, url: str) -> str:
    unit = OME_XML_UNITS.get(symbol)
    if unit is None:
        raise UnsupportedImageError(
            f"{url}: OME-XML physical size unit {symbol!r} is not a length gigaseg knows "
            f"({sorted(OME_XML_UNITS)}); fix PhysicalSizeXUnit/YUnit.")
    return unit


def _rational(value: Any) -> float:
    """A TIFF RATIONAL as tifffile gives it: ``(numerator, denominator)`` or a number."""
    if isinstance(value, tuple):
        return value[0] / value[1] if value[1] else 0.0
    return float(value)


def _gdal_nodata(tags: Any) -> float | None:
    if GDAL_NODATA_TAG not in tags:
        return None
    text = str(tags[GDAL_NODATA_TAG].value).strip().strip("\x00")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) or math.isnan(value) else None


__all__ = ["GEOTIFF_TAGS", "convert_length", "geotiff_spatial", "ome_xml_spatial", "ome_zarr_spatial", "tiff_spatial"]
