"""Polygons of a mask written batch by batch: GeoPackage through pyogrio (GDAL), or GeoParquet 1.1 through pyarrow.

Each feature: ``geometry`` (a Polygon in the image's CRS, or in level-0 pixel coordinates, x right and y down,
when the image has none), ``class_id``, ``class_name`` and ``pixels`` (the region's exact pixel count). A
GeoPackage without CRS gets GDAL's "undefined Cartesian" SRS; a GeoParquet file says ``"crs": null`` (unknown),
never the CRS84 its readers would assume when the key is left out.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np

from pipeline.export.masks import MaskInfo
from pipeline.export.polygons import polygonize, to_crs
from pipeline.optional import require

BATCH, BATCH_BYTES = 10_000, 8 * 2**20  # a write once either many features or this much WKB wait: few appends, and
# what waits stays bounded however many features the image has


class GpkgWriter:
    """A GeoPackage layer, appended one batch at a time (pyogrio)."""

    suffix = ".gpkg"

    def __init__(self, path: str, layer: str, crs_wkt: str | None) -> None:
        self.pyogrio_raw = require("pyogrio", "gigaseg export-masks --to polygons --format gpkg").raw
        self.path, self.layer, self.crs_wkt, self.started = path, layer, crs_wkt, False

    def write(self, wkb: Sequence[bytes], class_id: Sequence[int], class_name: Sequence[str],
              pixels: Sequence[int]) -> None:
        fields = [np.asarray(class_id, np.int32), np.asarray(class_name, dtype=object), np.asarray(pixels, np.int64)]
        with warnings.catch_warnings():  # an image with no CRS is written without one on purpose
            warnings.filterwarnings("ignore", message=".*'crs' was not provided")
            self._write(wkb, fields)
        self.started = True

    def _write(self, wkb, fields) -> None:
        self.pyogrio_raw.write(self.path, np.asarray(wkb, dtype=object), fields, ["class_id", "class_name", "pixels"],
                               layer=self.layer, driver="GPKG", geometry_type="Polygon", crs=self.crs_wkt,
                               append=self.started)

    def close(self) -> None:
        if not self.started:  # no region at all: still an (empty) layer
            self.write([], [], [], [])


class ParquetWriter:
    """A GeoParquet 1.1 file (WKB geometry column, ``geo`` metadata), one row group per batch (pyarrow)."""

    suffix = ".parquet"

    def __init__(self, path: str, layer: str, crs_wkt: str | None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        crs = None
        if crs_wkt is not None:
            rasterio = require("rasterio", "GeoParquet's CRS (PROJJSON)")
            crs = rasterio.crs.CRS.from_wkt(crs_wkt).to_dict(projjson=True)
        geo = {"version": "1.1.0", "primary_column": "geometry",
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs}}}
        self.pa = pa
        self.schema = pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("pixels", pa.int64()),
                                 ("geometry", pa.binary())], metadata={b"geo": json.dumps(geo).encode()})
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")

    def write(self, wkb: Sequence[bytes], class_id: Sequence[int], class_name: Sequence[str],
              pixels: Sequence[int]) -> None:
        pa = self.pa
        self.writer.write_table(pa.table([pa.array(class_id, pa.int32()), pa.array(class_name, pa.string()),
                                          pa.array(pixels, pa.int64()), pa.array(wkb, pa.binary())],
                                         schema=self.schema))

    def close(self) -> None:
        self.writer.close()


WRITERS = {"gpkg": GpkgWriter, "parquet": ParquetWriter}


def export_polygons(mask: MaskInfo, path: str, *, fmt: str = "gpkg", tolerance: float = 0.0, chunk: int = 1024,
                    exclude: Sequence[int] = ()) -> int:
    """Write the regions of ``mask`` (``pipeline.export.polygons``) to the local ``path`` (replaced atomically);
    return how many. ``tolerance``: simplification in level-0 pixels; ``exclude``: class ids left out (the nodata
    label always is)."""
    if fmt not in WRITERS:
        raise ValueError(f"polygon format {fmt!r} unknown; valid: {sorted(WRITERS)}")
    if tolerance < 0:
        raise ValueError(f"--simplify {tolerance}: the tolerance is a distance in pixels, ≥ 0.")
    shapely = require("shapely", "gigaseg export-masks --to polygons")
    skip = set(exclude) | ({mask.nodata_label} if mask.nodata_label is not None else set())
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    count = 0
    with tempfile.TemporaryDirectory(dir=folder, prefix=".gigaseg-polygons-") as tmp:
        staging = os.path.join(tmp, "out" + WRITERS[fmt].suffix)
        writer = WRITERS[fmt](staging, mask.label_name, mask.spatial.crs_wkt)
        batch: tuple[list, list, list, list] = ([], [], [], [])
        waiting = 0
        for region in polygonize(mask.open(), chunk, sorted(skip), tolerance):
            wkb = shapely.to_wkb(to_crs(region.geometry, mask.spatial.transform))
            for column, value in zip(batch, (wkb, region.value, _name(mask, region.value), region.pixels),
                                     strict=True):
                column.append(value)
            waiting += len(wkb)
            if len(batch[0]) >= BATCH or waiting >= BATCH_BYTES:
                writer.write(*batch)
                count += len(batch[0])
                batch, waiting = ([], [], [], []), 0
        if batch[0]:
            writer.write(*batch)
            count += len(batch[0])
        writer.close()
        os.replace(staging, path)
    return count


def _name(mask: MaskInfo, value: int) -> str:
    return mask.class_names[value] if 0 <= value < len(mask.class_names) else str(value)


__all__ = ["WRITERS", "GpkgWriter", "ParquetWriter", "export_polygons"]
