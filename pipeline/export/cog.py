"""A mask as a Cloud-Optimized GeoTIFF (GDAL's COG driver, through rasterio: the ``geo`` extra).

The level-0 labels are copied chunk by chunk into a tiled temporary GeoTIFF beside the destination (no process
holds the mask), with the image's CRS and transform, a colour table (class colours; the nodata label transparent),
the nodata value (the reserved label, where the input stated nodata) and the class names as band metadata
(``class_<id>=<name>``). GDAL's COG driver then writes the COG: 512² tiles, DEFLATE with the horizontal predictor,
and overviews down to one tile built with ``MODE`` resampling (each overview pixel the most frequent class of the
pixels under it, as the Zarr label pyramid; ties may fall differently), within GDAL's block cache, so memory stays
flat too. An image that is not georeferenced gets no CRS; its pixel size, when known in a length unit, is written
as TIFF resolution tags (pixels per centimetre), which slide viewers read as the mpp.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np

from pipeline.export.masks import MaskInfo
from pipeline.optional import require
from pipeline.sources.georef import convert_length

BLOCK = 512


def export_cog(mask: MaskInfo, path: str, *, compress: str = "DEFLATE") -> str:
    """Write ``mask`` as a COG at the local ``path`` (replaced atomically: written beside it, then renamed)."""
    rasterio = require("rasterio", "gigaseg export-masks --to cog")
    require("rasterio.shutil", "gigaseg export-masks --to cog")
    from rasterio.transform import Affine

    h, w = mask.shape
    spatial = mask.spatial
    profile = dict(driver="GTiff", width=w, height=h, count=1, dtype=mask.dtype, tiled=True, blockxsize=BLOCK,
                   blockysize=BLOCK, compress="ZSTD", BIGTIFF="IF_SAFER")
    if spatial.georeferenced:
        profile.update(crs=rasterio.crs.CRS.from_wkt(spatial.crs_wkt), transform=Affine(*spatial.transform))
    if mask.nodata_label is not None:
        profile["nodata"] = mask.nodata_label
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".gigaseg-cog-") as tmp:
        staging, out = os.path.join(tmp, "labels.tif"), os.path.join(tmp, "cog.tif")
        with rasterio.Env(GDAL_CACHEMAX=256), warnings.catch_warnings():
            # an image with no CRS is written without one on purpose
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            _write_staging(rasterio, mask, staging, profile)
            rasterio.shutil.copy(staging, out, driver="COG", BLOCKSIZE=BLOCK, COMPRESS=compress, PREDICTOR="YES",
                                 OVERVIEW_RESAMPLING="MODE", BIGTIFF="IF_SAFER")
        os.replace(out, path)
    return path


def _write_staging(rasterio, mask: MaskInfo, staging: str, profile: dict) -> None:
    """The tiled GeoTIFF the COG is copied from: the labels a chunk (rounded to whole 512² tiles) at a time, the
    colour table first (GDAL sets the palette photometric before any pixel is written), class names and
    resolution as metadata."""
    from rasterio.windows import Window

    array = mask.open()
    h, w = mask.shape
    cy, cx = mask.chunks
    step_y, step_x = max(cy, BLOCK) // BLOCK * BLOCK, max(cx, BLOCK) // BLOCK * BLOCK
    with rasterio.open(staging, "w", **profile) as dst:
        if np.dtype(mask.dtype) in (np.uint8, np.uint16):
            dst.write_colormap(1, _colormap(mask))
        for y in range(0, h, step_y):
            for x in range(0, w, step_x):
                block = np.asarray(array[y : y + step_y, x : x + step_x])
                dst.write(block, 1, window=Window(x, y, block.shape[1], block.shape[0]))
        dst.update_tags(1, **{f"class_{i}": n for i, n in enumerate(mask.class_names)})
        dst.update_tags(gigaseg_mask=mask.name, **_resolution_tags(mask))


def _colormap(mask: MaskInfo) -> dict[int, tuple[int, int, int, int]]:
    table = {i: (*c, 255) for i, c in enumerate(mask.class_colors)}
    if mask.nodata_label is not None:
        table[mask.nodata_label] = (0, 0, 0, 0)
    return table


def _resolution_tags(mask: MaskInfo) -> dict[str, str]:
    """TIFF resolution tags (pixels per cm) of an image with a pixel size in a length unit but no CRS."""
    spatial = mask.spatial
    if spatial.georeferenced or spatial.pixel_size is None or spatial.unit is None:
        return {}
    y_cm, x_cm = (convert_length(v, spatial.unit, "centimeter") for v in spatial.pixel_size)
    return {"TIFFTAG_XRESOLUTION": repr(1 / x_cm), "TIFFTAG_YRESOLUTION": repr(1 / y_cm), "TIFFTAG_RESOLUTIONUNIT": "3"}


__all__ = ["export_cog"]
