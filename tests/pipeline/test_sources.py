import pickle

import dask
import numpy as np
import pytest
import tifffile
import zarr

from pipeline.errors import ImageReadError, InputNotFoundError, UnsupportedImageError
from pipeline.sources import formats as sources
from pipeline.sources.convert import to_rgb8
from pipeline.sources.discover import ImageRef, discover
from pipeline.sources.formats import open_source
from pipeline.sources.pixels import read_chunks_yx, source_to_dask
from tests.pipeline.fixtures_images import (
    pixels,
    write_image,
    write_ome_zarr,
    write_pyramidal_tiff,
    write_tiff,
    write_zarr,
)


@pytest.fixture
def archive(tmp_path):
    """Mixed archive: every format, nested dirs, a name collision, clutter that is not an image."""
    root = tmp_path / "archive"
    rgb = pixels((40, 50, 3))
    write_tiff(root / "a.tif", rgb)
    write_image(root / "a.png", rgb)  # same stem as a.tif → "a-2"
    write_image(root / "nested" / "deep" / "photo.JPG", rgb)
    write_tiff(root / "nested" / "scan 1.ome.tiff", rgb[..., 0])
    write_zarr(root / "v2.zarr", rgb[..., 0], zarr_format=2)
    write_zarr(root / "nested" / "v3.zarr", rgb, chunks=(16, 16, 3))
    write_ome_zarr(root / "tiles" / "x" / "pyr.ome.zarr", [np.moveaxis(rgb, -1, 0), np.moveaxis(rgb[::2, ::2], -1, 0)])
    write_ome_zarr(root / "tiles" / "old.zarr", [rgb[..., 0]], axes="yx", version="0.4")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.tif").write_bytes(b"junk")
    return root


def test_discover_mixed_archive(archive):
    refs = discover(str(archive))
    got = {(r.url[len(str(archive)) + 1 :], r.name, r.format) for r in refs}
    assert got == {
        ("a.png", "a", "png"),
        ("a.tif", "a-2", "tiff"),
        ("nested/deep/photo.JPG", "nested__deep__photo", "jpeg"),
        ("nested/scan 1.ome.tiff", "nested__scan_1", "tiff"),
        ("nested/v3.zarr", "nested__v3", "zarr"),
        ("tiles/old.zarr", "tiles__old", "ome-zarr"),
        ("tiles/x/pyr.ome.zarr", "tiles__x__pyr", "ome-zarr"),
        ("v2.zarr", "v2", "zarr"),
    }
    assert [r.url for r in refs] == sorted(r.url for r in refs)
    assert not any("/0" in r.url.rsplit(".zarr", 1)[-1] for r in refs)  # never descends into a Zarr


def test_discover_patterns(archive):
    names = lambda pats: [r.name for r in discover(str(archive), pats)]  # noqa: E731
    assert names(["*.tif", "*.tiff"]) == ["a", "nested__scan_1"]  # no '/': any depth
    assert names(["tiles/**/*.zarr"]) == ["tiles__old", "tiles__x__pyr"]  # '**' spans zero or more dirs
    assert names(["nested/*"]) == ["nested__scan_1", "nested__v3"]  # '*' stays in one directory
    assert names(["[av]*.zarr"]) == ["nested__v3", "v2"]


def test_discover_nothing_matched_lists_patterns_and_findings(archive):
    with pytest.raises(InputNotFoundError) as info:
        discover(str(archive), ["*.bmp"])
    msg = str(info.value)
    assert str(archive) in msg and "['*.bmp']" in msg and "8 other image(s)" in msg and "notes.txt" in msg


def test_discover_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputNotFoundError, match=f"{missing}: input does not exist"):
        discover(str(missing))
    with pytest.raises(FileNotFoundError):  # also a builtin
        discover(f"file://{missing}")


def test_discover_single_file_and_single_zarr(archive):
    (ref,) = discover(str(archive / "a.tif"))
    assert ref == ImageRef(str(archive / "a.tif"), "a", "tiff")
    (ref,) = discover(str(archive / "tiles" / "x" / "pyr.ome.zarr"))
    assert ref.format == "ome-zarr" and ref.name == "pyr"
    with pytest.raises(UnsupportedImageError, match="notes.txt: not an image"):
        discover(str(archive / "notes.txt"))


def test_file_url_form(archive):
    url = f"file://{archive}"
    refs = discover(url, ["*.png"])
    assert [r.url for r in refs] == [f"{url}/a.png"]
    src = open_source(refs[0])
    assert (source_to_dask(src).compute() == np.moveaxis(pixels((40, 50, 3)), -1, 0)).all()


# ---------------------------------------------------------------- open_source


def _ref(path, fmt):
    return ImageRef(str(path), path.stem, fmt)


@pytest.mark.parametrize(
    ("shape", "axes", "channels"),
    [((30, 20), "yx", 1), ((30, 20, 3), "yxc", 3), ((4, 30, 20), "cyx", 4), ((30, 20, 2), "yxc", 2)],
)
def test_plain_zarr_axes(tmp_path, shape, axes, channels):
    data = pixels(shape)
    src = open_source(_ref(write_zarr(tmp_path / "z.zarr", data), "zarr"))
    assert (src.axes, src.channels, src.shape_yx) == (axes, channels, (30, 20))
    assert src.group_url is None and not src.has_pyramid
    expected = data[None] if axes == "yx" else np.moveaxis(data, -1, 0) if axes == "yxc" else data
    assert (source_to_dask(src).compute() == to_rgb8(expected)).all()


@pytest.mark.parametrize("shape", [(2, 3, 30, 20), (30, 30, 30)])
def test_plain_zarr_bad_layout(tmp_path, shape):
    path = write_zarr(tmp_path / "z.zarr", pixels(shape))
    with pytest.raises(UnsupportedImageError, match=r"z\.zarr: array of shape .* \(y, x\), \(y, x, c\) or \(c, y, x\)"):
        open_source(_ref(path, "zarr"))


@pytest.mark.parametrize(("shape", "axes"), [((30, 20, 6), "yxc"), ((6, 30, 20), "cyx")])
def test_plain_zarr_of_n_bands_needs_and_takes_a_band_selection(tmp_path, shape, axes):
    data = pixels(shape, "uint16")
    ref = _ref(write_zarr(tmp_path / "z.zarr", data), "zarr")
    with pytest.raises(UnsupportedImageError, match=r"z\.zarr: 6 channels cannot be converted to RGB.*inputs\.bands"):
        open_source(ref)
    with pytest.raises(UnsupportedImageError, match=r"z\.zarr: inputs\.bands \[5, 6\] asks for channel\(s\) \[6\]"):
        open_source(ref, bands=(5, 6))
    with pytest.raises(UnsupportedImageError, match=r"2 ranges for 3 bands"):
        open_source(ref, value_range=((0, 1), (0, 2)), bands=(5, 2, 0))
    src = open_source(ref, value_range=((0, 1000), (0, 4095), (100, 200)), bands=(5, 2, 0))
    assert (src.axes, src.channels, src.out_channels) == (axes, 6, 3)
    cyx = data if axes == "cyx" else np.moveaxis(data, -1, 0)
    got = source_to_dask(src, chunk=16).compute()
    assert got.shape == (3, 30, 20) and got.dtype == np.uint8
    for i, (band, vr) in enumerate(zip((5, 2, 0), ((0, 1000), (0, 4095), (100, 200)))):
        assert (got[i] == to_rgb8(cyx[band][None], vr)[0]).all()  # each band by its own range, RGB's value rule
    plain = open_source(ref, bands=(1, 3))  # no range: uint16 → v / 257, band by band
    assert (source_to_dask(plain).compute() == to_rgb8(cyx[[1, 3, 3]])[:2]).all()


def test_zarr_v2_big_endian_uint16(tmp_path):
    data = pixels((30, 20), "uint16").astype(">u2")
    src = open_source(_ref(write_zarr(tmp_path / "z.zarr", data, chunks=(8, 8), zarr_format=2), "zarr"))
    assert src.dtype == "uint16"
    assert (source_to_dask(src, chunk=16).compute() == to_rgb8(data[None].astype("<u2"))).all()


def test_float_zarr_and_value_range(tmp_path):
    data = pixels((30, 20, 3), "float32")
    src = open_source(_ref(write_zarr(tmp_path / "f.zarr", data), "zarr"))
    assert src.dtype == "float32"
    assert (source_to_dask(src).compute() == to_rgb8(np.moveaxis(data, -1, 0))).all()
    ints = pixels((30, 20), "int16")
    ref = _ref(write_zarr(tmp_path / "i.zarr", ints), "zarr")
    with pytest.raises(UnsupportedImageError, match=r"i\.zarr: dtype int16 .* set inputs.value_range"):
        open_source(ref)
    src = open_source(ref, value_range=(-1000, 1000))
    assert src.value_range == (-1000.0, 1000.0)
    assert (source_to_dask(src).compute() == to_rgb8(ints[None], (-1000, 1000))).all()


def test_ome_zarr_pyramid(tmp_path):
    l0 = pixels((3, 64, 48))
    path = write_ome_zarr(tmp_path / "p.zarr", [l0, l0[:, ::2, ::2], l0[:, ::4, ::4]])
    src = open_source(_ref(path, "ome-zarr"))
    assert src.axes == "cyx" and src.has_pyramid and src.group_url == str(path)
    assert [(lv.path, lv.shape_yx, lv.scale) for lv in src.levels] == [
        ("0", (64, 48), (1.0, 1.0)), ("1", (32, 24), (2.0, 2.0)), ("2", (16, 12), (4.0, 4.0))
    ]
    assert (source_to_dask(src, level=1).compute() == l0[:, ::2, ::2]).all()


def test_ome_zarr_04_tczyx_singletons_are_dropped(tmp_path):
    data = pixels((1, 2, 1, 30, 20), "uint16")  # gray + alpha
    src = open_source(_ref(write_ome_zarr(tmp_path / "t.zarr", [data], axes="tczyx", version="0.4"), "ome-zarr"))
    assert (src.axes, src.channels, src.has_pyramid) == ("tczyx", 2, False)
    assert (source_to_dask(src).compute() == to_rgb8(data[0, :, 0])).all()


def test_ome_zarr_rejects_z_stack_and_five_channels(tmp_path):
    stack = write_ome_zarr(tmp_path / "z.zarr", [pixels((3, 4, 16, 16))], axes="czyx")
    with pytest.raises(UnsupportedImageError, match="axis 'z' has size 4"):
        open_source(_ref(stack, "ome-zarr"))
    five = write_ome_zarr(tmp_path / "c5.zarr", [pixels((5, 16, 16))])
    with pytest.raises(UnsupportedImageError, match=r"c5\.zarr: 5 channels"):
        open_source(_ref(five, "ome-zarr"))


def test_plain_group_with_one_array(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("img", shape=(20, 10), dtype="uint8")[...] = 7
    src = open_source(_ref(tmp_path / "g.zarr", "zarr"))
    assert src.group_url == str(tmp_path / "g.zarr") and src.levels[0].path == "img"
    assert (source_to_dask(src).compute() == 7).all()
    group.create_array("other", shape=(2, 2), dtype="uint8")
    with pytest.raises(UnsupportedImageError, match="2 arrays"):
        open_source(_ref(tmp_path / "g.zarr", "zarr"))


@pytest.mark.parametrize(
    ("mode", "shape", "channels"),
    [("L", (30, 20), 1), ("LA", (30, 20, 2), 2), ("RGB", (30, 20, 3), 3), ("RGBA", (30, 20, 4), 4)],
)
def test_png_modes(tmp_path, mode, shape, channels):
    data = pixels(shape)
    src = open_source(_ref(write_image(tmp_path / "i.png", data), "png"))
    assert (src.axes, src.channels, src.dtype, src.shape_yx) == ("cyx", channels, "uint8", (30, 20))
    expected = to_rgb8(data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0))
    assert (source_to_dask(src, chunk=8).compute() == expected).all()


def test_png_16_bit_and_jpeg(tmp_path):
    data = pixels((30, 20), "uint16")
    src = open_source(_ref(write_image(tmp_path / "g16.png", data), "png"))
    assert (src.channels, src.dtype) == (1, "uint16")
    assert (source_to_dask(src).compute() == to_rgb8(data[None])).all()
    src = open_source(_ref(write_image(tmp_path / "j.jpg", pixels((30, 20, 3))), "jpeg"))
    assert (src.channels, src.dtype, src.shape_yx) == (3, "uint8", (30, 20))
    assert source_to_dask(src).compute().shape == (3, 30, 20)


def test_png_over_decode_limit_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_DECODE_PIXELS", 100)
    with pytest.raises(UnsupportedImageError, match="decode limit.*tiled BigTIFF or Zarr"):
        open_source(_ref(write_image(tmp_path / "big.png", pixels((30, 20))), "png"))


def test_unreadable_file_is_image_read_error(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + bytes(range(200)))
    with pytest.raises(ImageReadError, match=rf"{bad}: cannot read tiff metadata \(") as info:
        open_source(_ref(bad, "tiff"))
    assert "\n" not in str(info.value)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ImageReadError, match="bad.png"):
        open_source(_ref(tmp_path / "bad.png", "png"))
    with pytest.raises(InputNotFoundError):
        open_source(_ref(tmp_path / "gone.tif", "tiff"))


# ---------------------------------------------------------------- TIFF


def test_tiled_bigtiff_reads_lazily_and_exactly(tmp_path):
    data = pixels((700, 600, 3), seed=3)
    src = open_source(_ref(write_tiff(tmp_path / "t.tif", data, bigtiff=True, tile=(256, 256)), "tiff"))
    assert (src.axes, src.channels, src.shape_yx, src.has_pyramid) == ("yxc", 3, (700, 600), False)
    arr = source_to_dask(src, chunk=256)
    assert arr.chunks == ((3,), (256, 256, 188), (256, 256, 88))
    assert (arr.compute(scheduler="threads") == np.moveaxis(data, -1, 0)).all()
    clone = pickle.loads(pickle.dumps(arr))  # the graph carries a URL, not an open file
    assert (clone[:, 300:310, 500:].compute() == np.moveaxis(data[300:310, 500:], -1, 0)).all()


def test_pyramidal_tiff_levels_recorded_but_ingested(tmp_path):
    data = pixels((512, 384, 3), seed=4)
    src = open_source(_ref(write_pyramidal_tiff(tmp_path / "p.tif", data, levels=3), "tiff"))
    assert [(lv.path, lv.shape_yx, lv.scale) for lv in src.levels] == [
        ("0", (512, 384), (1.0, 1.0)), ("1", (256, 192), (2.0, 2.0)), ("2", (128, 96), (4.0, 4.0))
    ]
    assert not src.has_pyramid
    assert (source_to_dask(src, chunk=128).compute() == np.moveaxis(data, -1, 0)).all()
    assert (source_to_dask(src, level=1).compute() == np.moveaxis(data[::2, ::2], -1, 0)).all()


def test_tiff_layouts(tmp_path):
    gray16 = pixels((300, 200), "uint16")
    src = open_source(_ref(write_tiff(tmp_path / "g.tif", gray16, rowsperstrip=16), "tiff"))
    assert (src.axes, src.channels, src.dtype) == ("yx", 1, "uint16")
    assert (source_to_dask(src, chunk=64).compute() == to_rgb8(gray16[None])).all()
    planar = pixels((3, 60, 70))
    src = open_source(_ref(write_tiff(tmp_path / "s.tif", planar, photometric="rgb", planarconfig="separate"), "tiff"))
    assert (src.axes, src.channels) == ("cyx", 3)
    assert (source_to_dask(src).compute() == planar).all()
    stack = write_tiff(tmp_path / "stack.tif", pixels((5, 30, 20)))
    with pytest.raises(UnsupportedImageError, match="axis 'Q' .*one file per image"):
        open_source(_ref(stack, "tiff"))


# ---------------------------------------------------------------- laziness and read blocks


def test_huge_zarr_stays_lazy(tmp_path):
    """8192² RGB: chunks are declared but never written, so building the graph must read nothing."""
    zarr.create_array(str(tmp_path / "huge.zarr"), shape=(8192, 8192, 3), chunks=(1024, 1024, 3), dtype="uint8")
    src = open_source(_ref(tmp_path / "huge.zarr", "zarr"))
    arr = source_to_dask(src)
    assert arr.shape == (3, 8192, 8192) and arr.dtype == np.uint8
    assert arr.numblocks == (1, 16, 16) and set(arr.chunks[1]) == {512}
    assert len(dict(arr.__dask_graph__())) > 256
    assert (arr[:, 8000:, :5].compute(scheduler="sync") == 0).all()  # fill value of unwritten chunks


def test_read_chunks_align_to_storage():
    assert read_chunks_yx((256, 256), (8192, 8192), 512, 3) == (512, 512)  # two storage chunks per axis
    assert read_chunks_yx((1024, 1024), (8192, 8192), 512, 3) == (1024, 1024)  # decoded once, split later
    assert read_chunks_yx((300, 300), (8192, 8192), 512, 1) == (300, 300)
    assert read_chunks_yx((512, 512), (100, 90), 512, 1) == (100, 90)
    # 16-row strips of a 100 000 px wide uint16 image: whole strips, thinned to fit 64 MiB
    ry, rx = read_chunks_yx((16, 100_000), (50_000, 100_000), 512, 2)
    assert rx == 100_000 and ry % 16 == 0 and ry * rx * 2 <= 64 * 2**20
    # one strip holding the whole image: no aligned block fits, fall back to the target chunk
    assert read_chunks_yx((50_000, 100_000), (50_000, 100_000), 512, 3) == (512, 512)


def test_descriptors_pickle_without_handles(tmp_path):
    src = open_source(_ref(write_tiff(tmp_path / "t.tif", pixels((40, 30, 3)), tile=(16, 16)), "tiff"))
    assert pickle.loads(pickle.dumps(src)) == src
    with dask.config.set(scheduler="sync"):
        assert source_to_dask(src).compute().shape == (3, 40, 30)


def test_corrupt_tile_fails_with_the_window(tmp_path):
    path = write_tiff(tmp_path / "c.tif", pixels((256, 256, 3)), tile=(128, 128), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = bytes(count)
    path.write_bytes(raw)
    src = open_source(_ref(path, "tiff"))  # metadata is intact
    with pytest.raises(ImageReadError, match=r"c\.tif: reading window \[128:256, 128:256, 0:3\] failed"):
        source_to_dask(src, chunk=128).compute(scheduler="sync")
