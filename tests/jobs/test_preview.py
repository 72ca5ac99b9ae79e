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


def test_the_preview_shows_three_of_the_selected_bands(tmp_path):
    """An image of 6 samples, 4 of them selected: the preview is the 3 of those ``preview_bands`` names, each as
    the model saw it (uint16 → v/257), every ``step``-th pixel."""
    import numpy as np
    import tifffile

    from jobs.preview import image_preview, preview_rgb
    from pipeline.sources.discover import ImageRef
    from pipeline.sources.formats import open_source

    data = np.random.default_rng(1).integers(0, 65535, (90, 70, 6), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "six.tif", data, photometric="minisblack", planarconfig="contig")
    source = open_source(ImageRef(str(tmp_path / "six.tif"), "six", "tiff"), bands=(5, 3, 1, 0))
    shown = image_preview(source, 4, (3, 0, 2))  # source channels 0, 5, 1
    want = ((data[::4, ::4][..., [0, 5, 1]].astype(np.uint32) + 128) // 257).astype(np.uint8)
    assert shown.shape == (23, 18, 3) and (shown == want).all()
    gray = preview_rgb(np.full((1, 2, 2), 7, np.uint8))
    assert gray.shape == (2, 2, 3) and (gray == 7).all()
    with pytest.raises(ValueError, match="three positions"):
        preview_rgb(np.zeros((2, 2, 2), np.uint8), (0, 1, 2))
