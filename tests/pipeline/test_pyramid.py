import json
import pickle

import numpy as np
import pytest
import zarr

from pipeline.errors import ImageReadError, OutputConflictError, UnsupportedImageError
from pipeline.pyramid import Pyramid, downsample_mean2, ingest, level_shapes, open_pyramid, pyramid_in_place
from pipeline.sources.convert import to_rgb8
from pipeline.sources.formats import ImageRef, open_source
from pipeline.sources.pixels import source_to_dask
from tests.pipeline.fixtures_images import mean2_reference, pixels, write_image, write_ome_zarr, write_tiff, write_zarr


def test_level_shapes_halve_with_ceil_until_min_size():
    assert level_shapes((1000, 770), 256) == [(1000, 770), (500, 385), (250, 193)]
    assert level_shapes((100, 90), 256) == [(100, 90)]
    assert level_shapes((257, 3), 256) == [(257, 3), (129, 2)]
    with pytest.raises(ValueError, match="min_size"):
        level_shapes((10, 10), 0)


@pytest.mark.parametrize("shape", [(3, 4, 6), (3, 5, 7), (1, 1, 1), (2, 9, 2)])
def test_downsample_mean2_matches_formula(shape):
    block = pixels(shape, seed=sum(shape))
    assert (downsample_mean2(block) == mean2_reference(block)).all()


def test_downsample_mean2_rounds_half_up():
    block = np.array([[[0, 1], [0, 1]], [[1, 1], [1, 2]]], np.uint8)  # sums 2 (mean 0.5) and 5 (mean 1.25)
    assert downsample_mean2(block)[:, 0, 0].tolist() == [1, 1]
    assert downsample_mean2(np.array([[[1, 2]]], np.uint8)).tolist() == [[[2]]]  # n = 2 on an odd edge


@pytest.fixture
def rgb_tiff(tmp_path):
    data = pixels((1000, 770, 3), seed=7)
    path = write_tiff(tmp_path / "in" / "scene.tif", data, bigtiff=True, tile=(256, 256))
    return open_source(ImageRef(str(path), "scene", "tiff")), np.moveaxis(data, -1, 0)


def test_ingest_writes_exact_pyramid(tmp_path, rgb_tiff):
    source, expected = rgb_tiff
    url = str(tmp_path / "out" / "scene.zarr")
    pyr = ingest(source, url, chunk=256, min_size=256)
    assert pyr == Pyramid(url, ("0", "1", "2"), ((1000, 770), (500, 385), (250, 193)), "cyx", False, {})
    assert not pyr.needs_conversion and pyr.level_url(1) == f"{url}/1"
    group = zarr.open_group(url, mode="r")
    level0, level1, level2 = (group[p] for p in pyr.paths)
    assert level0.shape == (3, 1000, 770) and level0.chunks == (3, 256, 256) and level0.dtype == np.uint8
    assert (level0[...] == expected).all()
    assert (level1[...] == mean2_reference(expected)).all()
    assert (level2[...] == mean2_reference(level1[...])).all()
    meta = json.loads((tmp_path / "out" / "scene.zarr" / "0" / "zarr.json").read_text())
    assert meta["dimension_names"] == ["c", "y", "x"]
    assert any(c["name"] == "zstd" and c["configuration"]["level"] == 3 for c in meta["codecs"])
    ome_meta = group.attrs["ome"]
    assert ome_meta["version"] == "0.5"
    ms = ome_meta["multiscales"][0]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]] == [
        [1.0, 1.0, 1.0], [1.0, 2.0, 2.0], [1.0, 4.0, 4.0]
    ]
    assert group.attrs["gigaseg"]["ingest_complete"] is True
    assert open_pyramid(url) == pyr
    assert pickle.loads(pickle.dumps(pyr)) == pyr


def test_ingest_converts_unaligned_uint16_source(tmp_path):
    data = pixels((300, 170), "uint16", seed=9)
    ref = ImageRef(str(write_zarr(tmp_path / "g.zarr", data, chunks=(70, 70))), "g", "zarr")
    pyr = ingest(open_source(ref), str(tmp_path / "o.zarr"), chunk=64, min_size=64, scheduler="sync")
    assert pyr.shapes == ((300, 170), (150, 85), (75, 43), (38, 22))
    level0 = zarr.open_array(str(tmp_path / "o.zarr" / "0"), mode="r")
    assert level0.chunks == (3, 64, 64) and (level0[...] == to_rgb8(data[None])).all()


def test_small_image_has_one_level(tmp_path):
    ref = ImageRef(str(write_image(tmp_path / "s.png", pixels((50, 40, 3)))), "s", "png")
    pyr = ingest(open_source(ref), str(tmp_path / "s.zarr"))
    assert pyr.paths == ("0",) and pyr.shapes == ((50, 40),)


def test_reingest_reuses_complete_pyramid(tmp_path, rgb_tiff):
    source, _ = rgb_tiff
    url = str(tmp_path / "scene.zarr")
    first = ingest(source, url, chunk=256)
    zarr.open_array(f"{url}/0", mode="r+")[0, 0, 0] = 1  # a sentinel a rewrite would erase
    zarr.open_group(url, mode="r+").attrs["gigaseg"] = {**zarr.open_group(url).attrs["gigaseg"], "fingerprint": "f"}
    assert ingest(source, url, chunk=256) == first
    assert zarr.open_array(f"{url}/0", mode="r")[0, 0, 0] == 1
    assert zarr.open_group(url).attrs["gigaseg"]["fingerprint"] == "f"  # other keys of the job state kept
    ingest(source, url, chunk=256, overwrite=True)
    assert zarr.open_array(f"{url}/0", mode="r")[0, 0, 0] == source_to_dask(source)[0, 0, 0].compute()


def test_interrupted_ingest_is_redone(tmp_path, rgb_tiff):
    source, expected = rgb_tiff
    url = str(tmp_path / "scene.zarr")
    ingest(source, url, chunk=256, min_size=100)  # 4 levels
    group = zarr.open_group(url, mode="r+")
    group.attrs["gigaseg"] = {"ingest_complete": False}
    zarr.open_array(f"{url}/0", mode="r+")[:, :10, :10] = 0
    with pytest.raises(ImageReadError, match="interrupted"):
        open_pyramid(url)
    pyr = ingest(source, url, chunk=256, min_size=256)  # 3 levels this time
    assert pyr.paths == ("0", "1", "2")
    group = zarr.open_group(url, mode="r")
    assert sorted(group.array_keys()) == ["0", "1", "2"]  # stale level "3" removed
    assert group.attrs["gigaseg"]["ingest_complete"] is True
    assert (group["0"][...] == expected).all()


def test_ingest_refuses_foreign_or_mismatched_output(tmp_path, rgb_tiff):
    source, _ = rgb_tiff
    foreign = write_ome_zarr(tmp_path / "foreign.zarr", [pixels((3, 16, 16))])
    with pytest.raises(OutputConflictError, match="not written by gigaseg"):
        ingest(source, str(foreign))
    other = ImageRef(str(write_image(tmp_path / "o.png", pixels((20, 20, 3)))), "o", "png")
    url = str(tmp_path / "x.zarr")
    ingest(open_source(other), url)
    with pytest.raises(OutputConflictError, match=r"\(20, 20\) px .* \(1000, 770\) px"):
        ingest(source, url)


def test_in_place_ome_zarr_pyramid_is_not_copied(tmp_path):
    l0 = pixels((1, 1, 3, 64, 48), "uint16")
    path = write_ome_zarr(tmp_path / "p.ome.zarr", [l0, l0[..., ::2, ::2]], axes="tzcyx")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    source = open_source(ImageRef(str(path), "p", "ome-zarr"), value_range=(0, 4095))
    pyr = pyramid_in_place(source)
    assert pyr == Pyramid(
        str(path), ("0", "1"), ((64, 48), (32, 24)), "tzcyx", True, {}, dtype="uint16", channels=3,
        value_range=(0.0, 4095.0),
    )
    assert pyr.needs_conversion
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    reopened = open_pyramid(str(path))
    assert reopened.in_place and reopened.paths == pyr.paths and reopened.shapes == pyr.shapes
    flat = open_source(ImageRef(str(write_zarr(tmp_path / "flat.zarr", pixels((8, 8)))), "flat", "zarr"))
    with pytest.raises(UnsupportedImageError, match="ingest it instead"):
        pyramid_in_place(flat)


def test_a_pyramid_keeps_the_selected_bands(tmp_path):
    """A 6-sample TIFF, bands [4, 0, 2, 5] picked: every level is (4, H, W) uint8, level 0 the selected bands as
    they are (uint8), read back through ``level_ref`` unchanged; ingesting other bands into the group redoes it."""
    data = pixels((300, 170, 6), seed=5)
    path = write_tiff(tmp_path / "six.tif", data, photometric="minisblack", planarconfig="contig", tile=(64, 64))
    source = open_source(ImageRef(str(path), "six", "tiff"), bands=(4, 0, 2, 5))
    assert (source.channels, source.out_channels) == (6, 4)
    url = str(tmp_path / "six.zarr")
    pyr = ingest(source, url, chunk=64, min_size=64, scheduler="sync")
    want = np.moveaxis(data, -1, 0)[[4, 0, 2, 5]]
    level0, level1 = (zarr.open_array(f"{url}/{lv}", mode="r") for lv in (0, 1))
    assert level0.shape == (4, 300, 170) and level0.chunks == (4, 64, 64) and (level0[...] == want).all()
    assert (level1[...] == mean2_reference(want)).all()
    ref = pyr.level_ref(1)
    assert ref.bands == (0, 1, 2, 3) and ref.value_range is None and pyr.channels == 4
    assert ingest(source, url, chunk=64, min_size=64) == pyr  # reused
    other = open_source(ImageRef(str(path), "six", "tiff"), bands=(1,))
    again = ingest(other, url, chunk=64, min_size=64, scheduler="sync")
    assert again.channels == 1 and zarr.open_array(f"{url}/0", mode="r").shape == (1, 300, 170)
