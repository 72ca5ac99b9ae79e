import numpy as np
import pytest

from pipeline.errors import UnsupportedImageError
from pipeline.sources.convert import check_convertible, to_rgb8, to_uint8


def _px(values, dtype):
    return np.asarray(values, dtype=dtype).reshape(1, 1, -1)


def test_gray_is_replicated_to_three_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    out = to_rgb8(gray)
    assert out.shape == (3, 3, 4) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert all((out[i] == gray[0]).all() for i in range(3))


def test_gray_alpha_drops_alpha():
    block = np.stack([np.full((2, 2), 10, np.uint8), np.full((2, 2), 200, np.uint8)])
    assert (to_rgb8(block) == 10).all()


def test_rgb_is_kept_and_rgba_alpha_dropped_not_composited():
    rgba = np.stack([np.full((2, 2), v, np.uint8) for v in (1, 2, 3, 0)])  # fully transparent
    out = to_rgb8(rgba)
    assert out[:, 0, 0].tolist() == [1, 2, 3]
    assert (to_rgb8(rgba[:3]) == out).all()


@pytest.mark.parametrize("channels", [0, 5, 8])
def test_bad_channel_count_is_rejected(channels):
    with pytest.raises(UnsupportedImageError, match=f"{channels} channels"):
        to_rgb8(np.zeros((channels, 2, 2), np.uint8))


def test_uint16_full_range_rounds_v_over_257():
    values = [0, 128, 129, 257, 385, 386, 32896, 65535]
    out = to_rgb8(_px(values, np.uint16))[0, 0]
    assert out.tolist() == [round(v / 257) for v in values] == [0, 0, 1, 1, 1, 2, 128, 255]


def test_big_endian_uint16_is_converted_like_native():
    values = [0, 300, 65535]
    assert (to_rgb8(_px(values, ">u2")) == to_rgb8(_px(values, "<u2"))).all()


def test_float_is_assumed_zero_to_one_clipped_nan_to_zero():
    out = to_rgb8(_px([0.0, 0.5, 1.0, -1.0, 2.0, np.nan, 0.25], np.float32))[0, 0]
    assert out.tolist() == [0, 128, 255, 0, 255, 0, 64]


def test_value_range_maps_lo_to_0_and_hi_to_255_clipped():
    out = to_rgb8(_px([-100, 0, 100, 200, -200], np.int16), value_range=(-100, 100))[0, 0]
    assert out.tolist() == [0, 128, 255, 255, 0]
    # value_range also overrides the implied uint16 range
    assert to_rgb8(_px([0, 4095], np.uint16), value_range=(0, 4095))[0, 0].tolist() == [0, 255]


@pytest.mark.parametrize("dtype", ["int8", "int16", "uint32", "int32", "int64"])
def test_integer_types_without_range_need_value_range(dtype):
    with pytest.raises(UnsupportedImageError, match="inputs.value_range"):
        check_convertible(dtype, 3, None, where="s3://b/x.zarr")
    check_convertible(dtype, 3, (0, 10))


@pytest.mark.parametrize("dtype", ["bool", "complex64"])
def test_bool_and_complex_are_rejected(dtype):
    with pytest.raises(UnsupportedImageError, match=f"img.tif: dtype {np.dtype(dtype)}"):
        check_convertible(dtype, 1, None, where="img.tif")
    with pytest.raises(UnsupportedImageError):
        check_convertible(dtype, 1, (0, 1))


@pytest.mark.parametrize("bad", [(5, 5), (10, 0), (0, float("inf")), (1,), "ab"])
def test_bad_value_range_is_rejected(bad):
    with pytest.raises(UnsupportedImageError, match="value_range"):
        check_convertible("uint16", 1, bad)


def test_check_convertible_names_the_image():
    with pytest.raises(UnsupportedImageError, match=r"^file:///data/a\.zarr: 5 channels"):
        check_convertible("uint8", 5, where="file:///data/a.zarr")


def test_the_band_path_selects_orders_and_scales_each_band():
    block = np.arange(6 * 2 * 3, dtype=np.uint16).reshape(6, 2, 3) * 100
    out = to_uint8(block, ((0, 1000), (0, 5000), (100, 200)), bands=(5, 0, 2))
    assert out.shape == (3, 2, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    for i, (band, vr) in enumerate(zip((5, 0, 2), ((0, 1000), (0, 5000), (100, 200)))):
        assert (out[i] == to_rgb8(block[band][None], vr)[0]).all()
    one = to_uint8(block, (0, 7000), bands=(1, 1))  # one pair for every band
    assert (one == to_rgb8(block[[1]], (0, 7000))[:1]).all()
    u8 = np.random.default_rng(0).integers(0, 256, (7, 4, 4), dtype=np.uint8)
    assert (to_uint8(u8, bands=(6, 3)) == u8[[6, 3]]).all()  # uint8 bands as they are
    rgb = u8[:3]
    assert (to_uint8(rgb) == to_rgb8(rgb)).all()  # no bands: the RGB rule, bit for bit


def test_the_band_path_names_what_is_wrong():
    block = np.zeros((4, 2, 2), np.int16)
    with pytest.raises(UnsupportedImageError, match=r"inputs\.bands \[1, 4\] asks for channel\(s\) \[4\].* 4 channel"):
        to_uint8(block, (0, 1), bands=(1, 4))
    with pytest.raises(UnsupportedImageError, match=r"band 2.*dtype int16 has no implied display range"):
        to_uint8(block, bands=(2,))
    with pytest.raises(UnsupportedImageError, match=r"3 ranges for 2 bands"):
        to_uint8(block, ((0, 1),) * 3, bands=(0, 1))
    with pytest.raises(UnsupportedImageError, match=r"2 ranges, one per band, but inputs\.bands is not set"):
        check_convertible(np.int16, 4, ((0, 1), (0, 2)))
