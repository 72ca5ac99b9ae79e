"""End to end on a real local Ray cluster: a GeoTIFF, an OME-TIFF, an OME-Zarr and an SVS slide keep where their
pixels are through ``gigaseg run`` (rioxarray reads the mask's CRS and transform, each level's scaled by 2^l;
NGFF scale and units validated by ome-zarr-models; the slide's mpp), nodata becomes the reserved label, and
``gigaseg export-masks`` writes a valid COG and polygons that add up to the mask."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from jobs.cli import main
from jobs.runner import run_spec
from jobs.spec import parse_spec
from tests.archive import spec_dict
from tests.spatial_inputs import (
    GEO_TRANSFORM,
    SLIDE_MPP,
    write_geotiff,
    write_ome_tiff,
    write_ome_zarr_units,
    write_svs,
)

pytestmark = pytest.mark.integration
NODATA_BOX = (0, 40, 0, 72)  # (y0, y1, x0, x1) of the GeoTIFF's nodata corner


def _level(labels_url: str, level: int):
    """Level ``level`` of a label group as rioxarray sees it (the other levels dropped: their sizes differ)."""
    import rioxarray  # noqa: F401 - registers the .rio accessor
    import xarray as xr

    others = [k for k in zarr.open_group(labels_url, mode="r").keys() if k not in (str(level), f"spatial_ref_{level}")]
    return xr.open_zarr(labels_url, decode_coords="all", consolidated=False, drop_variables=others)[str(level)]


def test_spatial_metadata_survives_the_run_and_the_exports(tmp_path, ray_cluster):
    from ome_zarr_models.v05 import ImageLabel, Labels
    from rasterio.crs import CRS

    src = tmp_path / "in"
    write_geotiff(src / "scene.tif", 256, 320, nodata_box=NODATA_BOX)
    write_ome_tiff(src / "cells.ome.tif", 192, 256, size_yx=(0.3, 0.25))
    write_ome_zarr_units(src / "tissue.ome.zarr", 256, 192, size=0.65)
    write_svs(src / "slide.svs", 320, 256)
    out = tmp_path / "out"
    results = run_spec(parse_spec(spec_dict(str(src), str(out))))
    assert {(r.name, r.status) for r in results} == {(n, "ok") for n in ("scene", "cells", "tissue", "slide")}

    # GeoTIFF: rioxarray reads the same CRS and transform, level l's scaled by 2^l
    scene = str(out / "scene.zarr" / "labels" / "segmentation")
    n_levels = len(zarr.open_group(scene, mode="r").attrs["ome"]["multiscales"][0]["datasets"])
    assert n_levels == 2
    a, b, c, d, e, f = GEO_TRANSFORM
    for level in range(n_levels):
        da = _level(scene, level)
        assert da.rio.crs == CRS.from_epsg(32633)
        assert tuple(da.rio.transform())[:6] == (a * 2**level, b, c, d, e * 2**level, f)
    # nodata: the reserved label exactly where the input said so, listed in the NGFF image-label
    mask = np.asarray(zarr.open_array(f"{scene}/0", mode="r"))
    y0, y1, x0, x1 = NODATA_BOX
    nodata = np.zeros(mask.shape, bool)
    nodata[y0:y1, x0:x1] = True
    assert (mask[nodata] == 255).all() and (mask[~nodata] < 3).all()
    label_meta = ImageLabel.from_zarr(zarr.open_group(scene, mode="r")).attributes.ome
    assert {(p.label_value, p.name) for p in label_meta.image_label.properties} >= {(255, "nodata")}
    assert label_meta.multiscales[0].axes[0].unit == "meter"

    # OME-TIFF and OME-Zarr: the same scale and units in the NGFF output; the slide keeps its mpp
    for name, size, levels in (("cells", (0.3, 0.25), 1), ("tissue", (0.65, 0.65), 2), ("slide", (SLIDE_MPP,) * 2, 2)):
        group = zarr.open_group(str(out / f"{name}.zarr" / "labels"), mode="r")
        Labels.from_zarr(group)
        ms = ImageLabel.from_zarr(group["segmentation"]).attributes.ome.multiscales[0]
        assert [ax.unit for ax in ms.axes] == ["micrometer", "micrometer"]
        scales = [tuple(ds.coordinateTransformations[0].scale) for ds in ms.datasets]
        assert scales == [tuple(s * 2**lv for s in size) for lv in range(levels)], name
    slide_state = zarr.open_group(str(out / "slide.zarr"), mode="r").attrs["gigaseg"]
    assert slide_state["in_place"] and slide_state["spatial"]["pixel_size"] == [SLIDE_MPP, SLIDE_MPP]

    # COG: valid, the same CRS and transform, nodata the reserved label
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    assert main(["export-masks", str(out), "--to", "cog", "--images", "scene", "slide"]) == 0
    valid, errors, _ = cog_validate(str(out / "export" / "scene.tif"))
    assert valid, errors
    with rasterio.open(out / "export" / "scene.tif") as cog:
        assert cog.crs == CRS.from_epsg(32633) and tuple(cog.transform)[:6] == GEO_TRANSFORM
        assert cog.nodata == 255 and np.array_equal(cog.read(1), mask)

    # polygons: in the CRS, nodata left out, their pixels add up to the mask's class counts
    import pyogrio

    assert main(["export-masks", str(out), "--to", "polygons", "--images", "scene", "--chunk", "96"]) == 0
    class_id, _, pixels = pyogrio.raw.read(str(out / "export" / "scene.gpkg"))[3]
    counts = np.bincount(class_id, weights=pixels, minlength=3)
    assert counts.tolist() == np.bincount(mask[~nodata], minlength=3).tolist()
    assert pyogrio.read_info(str(out / "export" / "scene.gpkg"))["crs"] == "EPSG:32633"
    assert main(["export-masks", str(out), "--to", "cog", "--images", "nothere"]) == 2
