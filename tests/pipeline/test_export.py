"""The exports: polygons of known rectangles come back exactly, whatever the chunking (regions merged across chunk
borders); GeoPackage and GeoParquet carry the CRS and map pixels by the transform; the COG validates with
rio-cogeo and reopens with the same CRS, transform, colours and nodata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.export.cog import export_cog
from pipeline.export.masks import list_masks, read_mask
from pipeline.export.polygons import polygonize
from pipeline.export.vector import export_polygons
from pipeline.output.arrays import create_outputs
from pipeline.output.layout import image_output
from pipeline.output.state import mark
from pipeline.spatial import Spatial
from tests.spatial_inputs import GEO_TRANSFORM

# (class, y0, y1, x0, x1) on a class-0 background, none overlapping, none touching one of its own class; the chunk
# borders of the tests (48, 64) cut through most, and the bars meet the column (another class) edge to edge
RECTANGLES = [(1, 10, 90, 20, 150), (2, 100, 190, 30, 60), (3, 0, 200, 200, 215), (2, 120, 130, 100, 200),
              (1, 120, 130, 215, 300), (2, 150, 151, 5, 6)]


def rectangles_mask() -> np.ndarray:
    mask = np.zeros((200, 300), np.uint8)
    for value, y0, y1, x0, x1 in RECTANGLES:
        assert not mask[y0:y1, x0:x1].any()
        mask[y0:y1, x0:x1] = value
    return mask


def _key(geometry) -> bytes:
    return shapely.to_wkb(shapely.normalize(geometry))


def _boxes(transform=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)) -> set[tuple[int, int, bytes]]:
    """(class, pixels, geometry) of ``RECTANGLES``, mapped by ``transform``."""
    a, _, c, _, e, f = transform
    return {(v, (y1 - y0) * (x1 - x0), _key(shapely.box(c + a * x0, f + e * y0, c + a * x1, f + e * y1)))
            for v, y0, y1, x0, x1 in RECTANGLES}


@pytest.mark.parametrize("chunk", [48, 64, 1000])
def test_rectangles_come_back_exactly(chunk):
    regions = list(polygonize(rectangles_mask(), chunk=chunk, exclude=[0]))
    assert {(r.value, r.pixels, _key(r.geometry)) for r in regions} == _boxes()
    assert all(r.pixels == r.geometry.area for r in regions)
    assert all(len(r.geometry.exterior.coords) == 5 for r in regions), "collinear seam vertices dropped"
    background = [r.pixels for r in polygonize(rectangles_mask(), chunk=chunk) if r.value == 0]
    assert sorted(background) == [5950, 10200, 25899], "cut in three by the column and the bar on its right"


def test_regions_with_holes_and_arches_merge_across_chunks():
    mask = np.zeros((120, 160), np.uint8)
    mask[10:110, 10:150] = 1
    mask[40:70, 50:100] = 0  # a hole spanning four 32² chunks
    mask[80:100, 20:30] = 2
    mask[80:90, 20:140] = 2
    mask[80:100, 130:140] = 2  # an arch: its legs meet only through the top bar, chunks away
    regions = {r.value: r for r in polygonize(mask, chunk=32, exclude=[0])}
    one = regions[1].geometry
    assert len(one.interiors) == 2 and one.area == regions[1].pixels == (mask == 1).sum()
    assert regions[2].pixels == (mask == 2).sum() and regions[2].geometry.geom_type == "Polygon"


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([16, 24, 33]), st.integers(2, 4))
def test_any_chunking_gives_the_same_regions(seed, chunk, classes):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, classes, (12, 10)).astype(np.uint8)
    mask = np.kron(coarse, np.ones((6, 7), np.uint8))[: 70, : 65]  # blocks of 6×7 px: regions span chunks
    whole = {(r.value, r.pixels, _key(r.geometry)) for r in polygonize(mask, chunk=100)}
    assert {(r.value, r.pixels, _key(r.geometry)) for r in polygonize(mask, chunk=chunk)} == whole
    assert sum(p for _, p, _ in whole) == mask.size
    assert all(shapely.from_wkb(k).is_valid for _, _, k in whole)


def _output(tmp_path, mask: np.ndarray, spatial: Spatial, nodata_label=None, chunk=64):
    """A finished one-image output holding ``mask`` (as ``gigaseg run`` writes it)."""
    out = image_output(str(tmp_path / "out"), "scene", {})
    arrays = create_outputs(out, label_name="segmentation", shapes=[mask.shape], class_names=["bg", "a", "b", "c"],
                            class_colors=[(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)], chunk=chunk, extras=[],
                            labels_dtype="uint8", spatial=spatial, nodata_label=nodata_label)
    arrays.labels[0][:] = mask
    mark(out, complete=True)
    return out


def test_polygons_in_the_crs_as_geopackage_and_geoparquet(tmp_path):
    import pyarrow.parquet as pq
    import pyogrio
    from rasterio.crs import CRS

    spatial = Spatial((0.5, 0.5), "meter", CRS.from_epsg(32633).to_wkt(), GEO_TRANSFORM)
    _output(tmp_path, rectangles_mask(), spatial)
    [mask] = list_masks(str(tmp_path / "out"))
    n = export_polygons(mask, str(tmp_path / "scene.gpkg"), fmt="gpkg", tolerance=0.5, chunk=64, exclude=[0])
    meta, table = pyogrio.read_info(str(tmp_path / "scene.gpkg")), pyogrio.raw.read(str(tmp_path / "scene.gpkg"))
    assert meta["crs"] == "EPSG:32633" and meta["geometry_type"] == "Polygon" and n == len(RECTANGLES)
    class_id, class_name, pixels = table[3]
    assert [mask.class_names[v] for v in class_id] == list(class_name)
    got = {(int(v), int(p), _key(g)) for v, p, g in zip(class_id, pixels, shapely.from_wkb(table[2]), strict=True)}
    assert got == _boxes(GEO_TRANSFORM)

    m = export_polygons(mask, str(tmp_path / "scene.parquet"), fmt="parquet", tolerance=0.5, chunk=48, exclude=[0])
    parquet = pq.read_table(str(tmp_path / "scene.parquet"))
    geo = json.loads(parquet.schema.metadata[b"geo"])
    crs = CRS.from_user_input(json.dumps(geo["columns"]["geometry"]["crs"]))
    assert geo["primary_column"] == "geometry" and crs == CRS.from_epsg(32633) and m == n
    rows = parquet.to_pylist()
    assert {(r["class_id"], r["pixels"], _key(shapely.from_wkb(r["geometry"]))) for r in rows} == got


def test_polygons_without_crs_are_in_pixels_and_say_so(tmp_path):
    import pyarrow.parquet as pq

    _output(tmp_path, rectangles_mask(), Spatial((0.25, 0.25), "micrometer"), nodata_label=255)
    [mask] = list_masks(str(tmp_path / "out"))
    export_polygons(mask, str(tmp_path / "s.parquet"), fmt="parquet", exclude=[0])
    table = pq.read_table(str(tmp_path / "s.parquet"))
    assert json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]["crs"] is None
    assert {(r["class_id"], r["pixels"], _key(shapely.from_wkb(r["geometry"]))) for r in table.to_pylist()} == _boxes()


def test_cog_validates_and_keeps_crs_colours_and_nodata(tmp_path):
    import rasterio
    from rasterio.crs import CRS
    from rio_cogeo.cogeo import cog_validate

    mask = np.kron(rectangles_mask(), np.ones((6, 6), np.uint8))  # 1200 × 1800: overviews below 512² tiles
    mask[:64, :64] = 255
    spatial = Spatial((0.5, 0.5), "meter", CRS.from_epsg(32633).to_wkt(), GEO_TRANSFORM, nodata=0)
    out = _output(tmp_path, mask, spatial, nodata_label=255, chunk=256)
    info = read_mask(out.group_url)
    assert info.class_names == ("bg", "a", "b", "c") and info.nodata_label == 255
    path = export_cog(info, str(tmp_path / "scene.tif"))
    valid, errors, _ = cog_validate(path)
    assert valid, errors
    with rasterio.open(path) as cog:
        assert cog.crs == CRS.from_epsg(32633) and tuple(cog.transform)[:6] == GEO_TRANSFORM
        assert cog.overviews(1) == [2, 4] and cog.nodata == 255
        assert cog.colormap(1)[2] == (0, 255, 0, 255) and cog.colormap(1)[255][3] == 0
        assert cog.tags(1)["class_3"] == "c"
        np.testing.assert_array_equal(cog.read(1), mask)
        assert np.isin(np.unique(cog.read(1, out_shape=(300, 450))), [0, 1, 2, 3, 255]).all(), "classes, no blends"


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_cog_without_crs_keeps_the_pixel_size(tmp_path):
    import rasterio

    out = _output(tmp_path, rectangles_mask(), Spatial((0.25, 0.25), "micrometer"))
    with rasterio.open(export_cog(read_mask(out.group_url), str(tmp_path / "slide.tif"))) as cog:
        assert cog.crs is None and float(cog.tags()["TIFFTAG_XRESOLUTION"]) == pytest.approx(40000)


def test_list_masks_names_what_is_there(tmp_path):
    _output(tmp_path, rectangles_mask(), Spatial())
    with pytest.raises(FileNotFoundError, match=r"complete ones: \['scene'\]"):
        list_masks(str(tmp_path / "out"), names=["other"])
    unfinished = image_output(str(tmp_path / "out"), "half", {})
    zarr.open_group(unfinished.group_url, mode="w").attrs["gigaseg"] = {"complete": False}
    assert [m.name for m in list_masks(str(tmp_path / "out"))] == ["scene"]
