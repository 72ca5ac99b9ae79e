"""The preview's scale bar and CRS line (``jobs.preview``)."""

from __future__ import annotations

import pytest

from jobs.preview import nice_length, scale_bar, spatial_html
from pipeline.spatial import Spatial


def test_nice_length():
    assert [nice_length(v) for v in (370, 1, 0.0049, 999.9, 5000)] == [200, 1, 0.002, 500, 5000]
    with pytest.raises(ValueError):
        nice_length(0)


def test_scale_bar_matches_the_picture():
    # 0.5 m pixels shown at 1 px per 4: a quarter of 512 shown px is 256 m → 200 m, i.e. 100 shown px
    assert scale_bar(Spatial((0.5, 0.5), "meter"), 4, 512) == (100, "200 m")
    assert scale_bar(Spatial((0.25, 0.25), "micrometer"), 64, 512) == (125, "2 mm")
    assert scale_bar(Spatial(), 8, 400) == (62, "500 px"), "no pixel size: a bar of level-0 pixels"


def test_spatial_html_names_the_crs():
    from rasterio.crs import CRS

    wkt = CRS.from_epsg(32633).to_wkt()
    page = spatial_html(Spatial((0.5, 0.5), "meter", wkt, (0.5, 0, 5e5, 0, -0.5, 5e6), "WGS 84 / UTM zone 33N",
                                32633), 4, 512)
    assert "CRS: WGS 84 / UTM zone 33N (EPSG:32633)" in page and "width:100px" in page and "200 m" in page
    assert "no physical pixel size" in spatial_html(Spatial(), 1, 300)
