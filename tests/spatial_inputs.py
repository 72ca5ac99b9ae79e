"""Small inputs with spatial metadata, generated in code: a GeoTIFF (rasterio), an OME-TIFF and an OME-Zarr with
physical pixel sizes, an SVS-like slide OpenSlide reads (tifffile, an Aperio ImageDescription with its MPP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import ome
from pipeline.synth.land_cover import land_cover

UTM33 = "EPSG:32633"
GEO_TRANSFORM = (0.5, 0.0, 500_000.0, 0.0, -0.5, 5_000_000.0)  # 0.5 m pixels, north up
SLIDE_MPP = 0.499


def write_geotiff(path: Path, height: int = 256, width: int = 320, *, crs: str = UTM33,
                  transform: tuple = GEO_TRANSFORM, nodata: float | None = 0, nodata_box: tuple | None = None,
                  seed: int = 21) -> np.ndarray:
    """A tiled RGB uint8 GeoTIFF; pixels of ``nodata_box`` (y0, y1, x0, x1) set to ``nodata`` in every band (and
    no other pixel is: 0 is lifted to 1). Returns the (3, H, W) pixels."""
    import rasterio
    from rasterio.transform import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.moveaxis(land_cover(0, 0, height, width, seed=seed), -1, 0).copy()
    rgb[rgb == 0] = 1
    if nodata_box is not None:
        y0, y1, x0, x1 = nodata_box
        rgb[:, y0:y1, x0:x1] = nodata
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                       transform=Affine(*transform), nodata=nodata, tiled=True, blockxsize=128,
                       blockysize=128) as dst:
        dst.write(rgb)
    return rgb


def write_ome_tiff(path: Path, height: int = 256, width: int = 256, size_yx=(0.3, 0.25), unit: str = "µm",
                   seed: int = 22) -> Path:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.moveaxis(land_cover(0, 0, height, width, seed=seed), -1, 0)
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(128, 128), ome=True,
                     metadata={"axes": "CYX", "PhysicalSizeY": size_yx[0], "PhysicalSizeX": size_yx[1],
                               "PhysicalSizeYUnit": unit, "PhysicalSizeXUnit": unit})
    return path


def write_ome_zarr_units(path: Path, height: int = 256, width: int = 256, size: float = 0.65,
                         unit: str = "micrometer", seed: int = 23) -> Path:
    """An NGFF 0.5 pyramid of 2 levels, axes c, y, x with ``unit`` on y and x, scale ``size · 2^l``."""
    import zarr

    rgb = np.moveaxis(land_cover(0, 0, height, width, seed=seed), -1, 0)
    group = zarr.open_group(str(path), mode="w")
    for level, data in enumerate((rgb, rgb[:, ::2, ::2])):
        group.create_array(str(level), shape=data.shape, chunks=(3, 128, 128), dtype="uint8",
                           dimension_names=("c", "y", "x"))[:] = data
    group.attrs["ome"] = ome.image_multiscales("slide", 2, pixel_size=size, unit=unit)
    return path


def write_svs(path: Path, height: int = 512, width: int = 384, mpp: float = SLIDE_MPP, seed: int = 24) -> np.ndarray:
    """An Aperio-like SVS (tiled, deflate; a second level at half size) that OpenSlide opens as ``aperio``. Returns
    the (H, W, 3) level-0 pixels."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = land_cover(0, 0, height, width, seed=seed)
    head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] (256x256)"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None,
                 description=f"{head}|AppMag = 20|MPP = {mpp}")
        tw.write(np.ascontiguousarray(rgb[::2, ::2]), tile=(256, 256), photometric="rgb", compression="zlib",
                 metadata=None, description=f"{head} -> {width // 2}x{height // 2}|AppMag = 20|MPP = {mpp}")
    return rgb
