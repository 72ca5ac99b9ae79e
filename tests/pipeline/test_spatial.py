"""Spatial metadata read from inputs (GeoTIFF, OME-TIFF, TIFF resolution, OME-Zarr, OpenSlide) and written with the
outputs (NGFF scale and units validated by ome-zarr-models, CF grid mappings rioxarray reads back)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import tifffile
import zarr

from pipeline import optional
from pipeline.errors import MissingDependencyError
from pipeline.output.arrays import create_outputs
from pipeline.output.layout import image_output
from pipeline.pyramid import ingest, prepare_pyramid
from pipeline.sources.discover import ImageRef, discover
from pipeline.sources.formats import open_source
from pipeline.sources.pixels import source_to_dask
from pipeline.sources.slides import SlideLevel
from pipeline.spatial import Spatial, cf_grid_mapping, nodata_mask
from tests.spatial_inputs import (
    GEO_TRANSFORM,
    SLIDE_MPP,
    write_geotiff,
    write_ome_tiff,
    write_ome_zarr_units,
    write_svs,
)


def _source(path, fmt):
    return open_source(ImageRef(str(path), path.stem, fmt))


# ---------------------------------------------------------------- the dataclass


def test_spatial_levels_and_json():
    s = Spatial((0.5, 0.5), "meter", "WKT", GEO_TRANSFORM, nodata=0)
    assert s.transform_at(0) == GEO_TRANSFORM
    assert s.transform_at(3) == (4.0, 0.0, 500_000.0, 0.0, -4.0, 5_000_000.0)
    assert s.geotransform(1) == "500000.0 1.0 0.0 5000000.0 0.0 -1.0"
    assert s.ngff_scale(2) == ((2.0, 2.0), "meter")
    assert Spatial.from_json(s.to_json()) == s
    assert Spatial().ngff_scale(1) == ((2.0, 2.0), None) and Spatial().to_json() == {}
    assert cf_grid_mapping(Spatial()) == {}
    with pytest.raises(ValueError, match="go together"):
        Spatial(crs_wkt="WKT")
    with pytest.raises(ValueError, match="NGFF space unit"):
        Spatial((1.0, 1.0), "degree")
    with pytest.raises(ValueError, match="invertible"):
        Spatial(crs_wkt="WKT", transform=(0, 0, 0, 0, 0, 0))


def test_nodata_mask_is_what_the_input_states():
    block = np.array([[[0, 0, 5], [7, 0, 0]]] * 3, np.uint8)  # (3, 2, 3)
    block[1, 0, 1] = 9  # one band differs: not nodata
    assert nodata_mask(block, Spatial(nodata=0)).tolist() == [[True, False, False], [False, True, True]]
    assert not nodata_mask(block, Spatial(nodata=-9999)).any(), "a value the dtype cannot hold matches nothing"
    floats = np.array([[[np.nan, 1.0]]] * 2)
    assert nodata_mask(floats, Spatial(nodata=math.nan)).tolist() == [[True, False]]
    rgba = np.zeros((4, 1, 2), np.uint8)
    rgba[3, 0, 1] = 255
    assert nodata_mask(rgba, Spatial(nodata_alpha=True)).tolist() == [[True, False]]
    assert not nodata_mask(rgba, Spatial()).any()


# ---------------------------------------------------------------- inputs


def test_geotiff_crs_transform_nodata(tmp_path):
    write_geotiff(tmp_path / "scene.tif", nodata_box=(0, 32, 0, 48))
    s = _source(tmp_path / "scene.tif", "tiff").spatial
    assert s.transform == GEO_TRANSFORM and s.epsg == 32633 and s.crs_name == "WGS 84 / UTM zone 33N"
    assert (s.pixel_size, s.unit, s.nodata, s.origin) == ((0.5, 0.5), "meter", 0.0, "geotiff")


def test_geotiff_in_feet_and_degrees(tmp_path):
    feet = (3.0, 0.0, 1_000_000.0, 0.0, -3.0, 200_000.0)
    write_geotiff(tmp_path / "ny.tif", 64, 64, crs="EPSG:2263", transform=feet, nodata=None)  # US survey feet
    s = _source(tmp_path / "ny.tif", "tiff").spatial
    assert s.unit == "meter" and s.pixel_size == pytest.approx((3 * 0.3048006096, 3 * 0.3048006096))
    assert s.transform == feet, "the CF transform stays in the CRS's own unit"
    deg = (0.001, 0.0, 13.0, 0.0, -0.001, 52.0)
    write_geotiff(tmp_path / "wgs.tif", 64, 64, crs="EPSG:4326", transform=deg, nodata=None)
    s = _source(tmp_path / "wgs.tif", "tiff").spatial
    assert s.unit is None and s.pixel_size == pytest.approx((0.001, 0.001)) and s.epsg == 4326


def test_ome_tiff_and_tiff_resolution(tmp_path):
    write_ome_tiff(tmp_path / "cells.ome.tif", 64, 64, size_yx=(300, 250), unit="nm")
    s = _source(tmp_path / "cells.ome.tif", "tiff").spatial
    assert (s.origin, s.unit) == ("ome-xml", "nanometer") and s.pixel_size == pytest.approx((300, 250))
    tifffile.imwrite(tmp_path / "res.tif", np.zeros((32, 32, 3), np.uint8), resolution=(20000, 40000),
                     resolutionunit="CENTIMETER")
    s = _source(tmp_path / "res.tif", "tiff").spatial
    assert s.unit == "micrometer" and s.pixel_size == pytest.approx((0.25, 0.5))
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((32, 32, 3), np.uint8))  # resolution unit "none"
    assert _source(tmp_path / "plain.tif", "tiff").spatial.empty


def test_ome_zarr_units(tmp_path):
    write_ome_zarr_units(tmp_path / "slide.ome.zarr", 64, 64, size=0.65)
    s = _source(tmp_path / "slide.ome.zarr", "ome-zarr").spatial
    assert (s.pixel_size, s.unit, s.origin) == ((0.65, 0.65), "micrometer", "ome-zarr")


def test_slide_through_openslide(tmp_path):
    rgb = write_svs(tmp_path / "slide.svs", 512, 384)
    [ref] = discover(str(tmp_path))
    assert ref.format == "slide"
    source = open_source(ref)
    assert [lv.shape_yx for lv in source.levels] == [(512, 384), (256, 192)]
    assert source.spatial.pixel_size == (SLIDE_MPP, SLIDE_MPP) and source.spatial.unit == "micrometer"
    level = SlideLevel(ref.url, 0)
    assert level.chunks == (256, 256, 4)
    np.testing.assert_array_equal(level[100:300, 50:170][..., :3], rgb[100:300, 50:170])
    np.testing.assert_array_equal(np.moveaxis(source_to_dask(source, 128).compute(), 0, -1), rgb)
    assert prepare_pyramid(source, str(tmp_path / "out.zarr"), {0}).base.slide, "level 0 read in place"


@pytest.mark.parametrize(("module", "extra", "make"), [
    ("rasterio", "geo", lambda p: write_geotiff(p / "g.tif", 32, 32)),
    ("openslide", "slides", lambda p: write_svs(p / "s.svs", 64, 64)),
])
def test_missing_extra_says_what_to_install(tmp_path, monkeypatch, module, extra, make):
    make(tmp_path)
    real = optional.importlib.import_module

    def fake(name, *args):
        if name.split(".")[0] == module:
            raise ImportError(f"No module named {module!r}")
        return real(name, *args)

    monkeypatch.setattr(optional.importlib, "import_module", fake)
    [ref] = discover(str(tmp_path))
    with pytest.raises(MissingDependencyError, match=rf"pip install 'gigaseg\[{extra}\]'"):
        open_source(ref)


# ---------------------------------------------------------------- outputs


def test_outputs_carry_ngff_units_and_cf_grid_mappings(tmp_path):
    import rioxarray  # noqa: F401 - registers the .rio accessor
    import xarray as xr
    from ome_zarr_models.v05 import Image, ImageLabel

    spatial = Spatial((0.5, 0.5), "meter", _wkt(), GEO_TRANSFORM, nodata=0)
    out = image_output(str(tmp_path), "scene", {})
    shapes = [(256, 320), (128, 160), (64, 80)]
    create_outputs(out, label_name="segmentation", shapes=shapes, class_names=["a", "b"],
                   class_colors=[(0, 0, 0), (255, 0, 0)], chunk=128, extras=["confidence"], labels_dtype="uint8",
                   spatial=spatial, nodata_label=255)
    labels = zarr.open_group(f"{out.group_url}/labels/segmentation", mode="r")
    model = ImageLabel.from_zarr(labels)
    scales = [d.coordinateTransformations[0].scale for d in model.attributes.ome.multiscales[0].datasets]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    assert {a.unit for a in model.attributes.ome.multiscales[0].axes} == {"meter"}
    assert {(c.label_value, tuple(c.rgba)) for c in model.attributes.ome.image_label.colors} >= {(255, (0, 0, 0, 0))}
    for level in range(3):
        others = [k for k in labels.keys() if k not in (str(level), f"spatial_ref_{level}")]
        da = xr.open_zarr(labels.store_path, decode_coords="all", consolidated=False, drop_variables=others)[str(level)]
        assert da.rio.crs.to_epsg() == 32633
        assert tuple(da.rio.transform())[:6] == spatial.transform_at(level)
    root = xr.open_zarr(out.group_url, decode_coords="all", consolidated=False)
    assert tuple(root["confidence"].rio.transform())[:6] == GEO_TRANSFORM

    # an ingested image pyramid carries the same scale and units (a PNG given a pixel size by hand)
    from PIL import Image as PILImage

    PILImage.fromarray(np.zeros((300, 260, 3), np.uint8)).save(tmp_path / "p.png")
    source = replace(_source(tmp_path / "p.png", "png"), spatial=Spatial((0.25, 0.25), "micrometer"))
    ingest(source, str(tmp_path / "p.zarr"), chunk=128)
    image = Image.from_zarr(zarr.open_group(str(tmp_path / "p.zarr"), mode="r"))
    datasets = image.attributes.ome.multiscales[0].datasets
    assert [d.coordinateTransformations[0].scale for d in datasets] == [[1.0, 0.25, 0.25], [1.0, 0.5, 0.5]]


def _wkt() -> str:
    from rasterio.crs import CRS

    return CRS.from_epsg(32633).to_wkt()


@pytest.mark.integration
def test_geotiff_on_s3_keeps_its_georeferencing(tmp_path, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    write_geotiff(tmp_path / "scene.tif", 64, 96)
    s3fs.S3FileSystem(**options).put_file(str(tmp_path / "scene.tif"), f"{bucket}/in/scene.tif")
    [ref] = discover(f"s3://{bucket}/in", storage_options=options)
    source = open_source(ref, options)
    assert source.spatial.transform == GEO_TRANSFORM and source.spatial.epsg == 32633
