"""Where an image's pixels are: the physical size of a pixel and, for a georeferenced image, its CRS and affine
transform. Read from the input by ``pipeline.sources.georef``, carried beside the image (``ImageSource.spatial``)
and written with every output: NGFF ``scale`` and units per pyramid level, a CF grid mapping that rioxarray reads
(``cf_grid_mapping``), and the exports (``pipeline.export``).

Transform convention (GDAL and rasterio, pixel corners): the top-left corner of level-0 pixel (row, col) is at

    x = a·col + b·row + c,    y = d·col + e·row + f,        transform = (a, b, c, d, e, f)

Level ``l`` of a power-of-two pyramid: pixel (row, col) of level l starts at level-0 pixel (2^l·row, 2^l·col), so

    T_l = (a·2^l, b·2^l, c, d·2^l, e·2^l, f)

GDAL's GeoTransform (what CF's ``GeoTransform`` attribute and rioxarray hold) lists the same six numbers as
``c a b f d e``. The pixel size is ``(hypot(b, e), hypot(a, d))`` (y, x) in the CRS's unit; ``pixel_size`` holds it
in ``unit``, an NGFF (UDUNITS-2) length: metres for a projected CRS (a CRS in feet is converted), micrometres for
microscopy. A geographic CRS measures in degrees, which is no length: its ``unit`` is None and ``pixel_size`` is in
degrees.

Nodata, never guessed: only what the input states is nodata: a GeoTIFF's nodata value (a pixel whose every band
equals it; NaN matches NaN) or, for whole-slide images, a pixel OpenSlide returns fully transparent (outside the
scanned area). Those pixels get the label ``nodata_label`` in the mask (``pipeline.output.nodata``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: NGFF 0.5 space units (UDUNITS-2 names).
NGFF_SPACE_UNITS = frozenset({
    "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot", "gigameter", "hectometer",
    "inch", "kilometer", "megameter", "meter", "micrometer", "mile", "millimeter", "nanometer", "parsec",
    "petameter", "picometer", "terameter", "yard", "yoctometer", "yottameter", "zeptometer", "zettameter",
})
#: OME-XML unit symbols (``PhysicalSizeXUnit``) → NGFF names.
OME_XML_UNITS = {
    "Å": "angstrom", "nm": "nanometer", "µm": "micrometer", "um": "micrometer", "mm": "millimeter",
    "cm": "centimeter", "dm": "decimeter", "m": "meter", "km": "kilometer", "pm": "picometer", "in": "inch",
    "ft": "foot", "yd": "yard", "mi": "mile",
}
_SHORT = {"meter": "m", "kilometer": "km", "micrometer": "µm", "millimeter": "mm", "nanometer": "nm",
          "centimeter": "cm", "foot": "ft", "inch": "in"}


@dataclass(frozen=True)
class Spatial:
    """An image's spatial metadata (module docstring); every field None when the input states none.

    ``pixel_size``: (y, x) size of a level-0 pixel in ``unit`` (or degrees when ``unit`` is None and the CRS is
    geographic). ``crs_wkt``/``transform``: set together, for georeferenced images. ``crs_name``: for people
    (``"WGS 84 / UTM zone 33N"``), ``epsg`` when the CRS has one. ``nodata``: the input value meaning no data;
    ``nodata_alpha``: fully transparent pixels are no data. ``origin``: what it was read from.
    """

    pixel_size: tuple[float, float] | None = None
    unit: str | None = None
    crs_wkt: str | None = None
    transform: tuple[float, float, float, float, float, float] | None = None
    crs_name: str | None = None
    epsg: int | None = None
    nodata: float | None = None
    nodata_alpha: bool = False
    origin: str | None = None

    def __post_init__(self) -> None:
        if self.pixel_size is not None:
            size = tuple(float(v) for v in self.pixel_size)
            if len(size) != 2 or not all(math.isfinite(v) and v > 0 for v in size):
                raise ValueError(f"Spatial.pixel_size must be two finite sizes > 0 (y, x), got {self.pixel_size!r}.")
            object.__setattr__(self, "pixel_size", size)
        if self.unit is not None and self.unit not in NGFF_SPACE_UNITS:
            raise ValueError(f"Spatial.unit {self.unit!r} is not an NGFF space unit ({sorted(NGFF_SPACE_UNITS)}).")
        if (self.crs_wkt is None) != (self.transform is None):
            raise ValueError("Spatial: crs_wkt and transform go together (a georeferenced image has both).")
        if self.transform is not None:
            t = tuple(float(v) for v in self.transform)
            if len(t) != 6 or not all(math.isfinite(v) for v in t) or t[0] * t[4] - t[1] * t[3] == 0:
                raise ValueError(f"Spatial.transform must be 6 finite numbers (a, b, c, d, e, f) of an invertible "
                                 f"affine map, got {self.transform!r}.")
            object.__setattr__(self, "transform", t)
        if self.nodata is not None:
            object.__setattr__(self, "nodata", float(self.nodata))

    @property
    def georeferenced(self) -> bool:
        return self.transform is not None

    @property
    def has_nodata(self) -> bool:
        return self.nodata is not None or self.nodata_alpha

    @property
    def empty(self) -> bool:
        return self == Spatial()

    def transform_at(self, level: int) -> tuple[float, ...] | None:
        """``T_l`` (module docstring), or None when not georeferenced."""
        if self.transform is None:
            return None
        a, b, c, d, e, f = self.transform
        s = float(2**level)
        return (a * s, b * s, c, d * s, e * s, f)

    def geotransform(self, level: int = 0) -> str | None:
        """GDAL's GeoTransform ``"c a b f d e"`` of level ``level`` (CF ``GeoTransform``, rioxarray)."""
        t = self.transform_at(level)
        if t is None:
            return None
        a, b, c, d, e, f = t
        return " ".join(repr(v) for v in (c, a, b, f, d, e))

    def ngff_scale(self, level: int = 0) -> tuple[tuple[float, float], str | None]:
        """(y, x) NGFF ``scale`` of level ``level`` (``pixel_size · 2^l``, 2^l pixels when none) and its unit."""
        size = self.pixel_size or (1.0, 1.0)
        return (size[0] * 2**level, size[1] * 2**level), self.unit

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if v is not None and v is not False}  # nodata 0 is kept

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Spatial:
        data = dict(data or {})
        for key in ("pixel_size", "transform"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def pixel_size_of(transform: tuple[float, ...]) -> tuple[float, float]:
    """(y, x) pixel size of an affine transform: ``(hypot(b, e), hypot(a, d))``."""
    a, b, _, d, e, _ = transform
    return math.hypot(b, e), math.hypot(a, d)


def crs_name_of(wkt: str) -> str | None:
    """The CRS's name: the first quoted string of its WKT (``PROJCRS["WGS 84 / UTM zone 33N", …``)."""
    m = re.match(r'\s*[A-Z_]+\[\s*"([^"]*)"', wkt)
    return m.group(1) if m else None


def cf_grid_mapping(spatial: Spatial, level: int = 0) -> dict[str, str]:
    """Attributes of a CF grid-mapping variable for level ``level``: ``crs_wkt`` (CF 1.7), ``spatial_ref`` (what GDAL
    writes and reads) and ``GeoTransform`` (GDAL's order); rioxarray reads the CRS from the first two and the
    transform from the third. Empty when ``spatial`` is not georeferenced."""
    if not spatial.georeferenced:
        return {}
    return {"crs_wkt": spatial.crs_wkt, "spatial_ref": spatial.crs_wkt, "GeoTransform": spatial.geotransform(level)}


def grid_mapping_name(level: int) -> str:
    """The name of level ``level``'s grid-mapping array beside it: ``spatial_ref_<level>`` (a group holding several
    levels needs one per level, each with its own GeoTransform)."""
    return f"spatial_ref_{level}"


def nodata_mask(block: np.ndarray, spatial: Spatial, axis: int = 0) -> np.ndarray:
    """Where a raw input block (bands along ``axis``, before any conversion) is no data: every band equals
    ``spatial.nodata`` (NaN matching NaN), or, with ``nodata_alpha``, the last band (alpha) is 0."""
    moved = np.moveaxis(block, axis, 0)
    out = np.zeros(moved.shape[1:], bool)
    if spatial.nodata is not None:
        v = spatial.nodata
        if moved.dtype.kind == "f":
            out |= (np.isnan(moved) if math.isnan(v) else moved == v).all(0)
        elif _representable(v, moved.dtype):
            out |= (moved == moved.dtype.type(v)).all(0)
    if spatial.nodata_alpha and moved.shape[0] in (2, 4):
        out |= moved[-1] == 0
    return out


def _representable(value: float, dtype: np.dtype) -> bool:
    """An integer dtype holds the nodata value exactly (GDAL stores it as a double; -9999 on uint8 never matches)."""
    if not float(value).is_integer():
        return False
    info = np.iinfo(dtype)
    return info.min <= value <= info.max


def short_unit(unit: str | None) -> str:
    """``"micrometer"`` → ``"µm"``; other NGFF units as they are; None → ``"px"``."""
    return "px" if unit is None else _SHORT.get(unit, unit)


__all__ = ["NGFF_SPACE_UNITS", "OME_XML_UNITS", "Spatial", "cf_grid_mapping", "crs_name_of", "grid_mapping_name",
           "nodata_mask", "pixel_size_of", "short_unit"]
