"""Colour-coded masks → class ids: DeepGlobe's binarise-at-128 rule, exact matching, unknown colours."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.palette import DEEPGLOBE_CLASSES, PALETTES, decode_palette, get_palette

COLORS = [c for _, c in DEEPGLOBE_CLASSES]


def test_deepglobe_classes_in_id_order():
    assert [n for n, _ in DEEPGLOBE_CLASSES] == [
        "unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren"]
    assert get_palette("deepglobe") is DEEPGLOBE_CLASSES and PALETTES["deepglobe"] is DEEPGLOBE_CLASSES


def test_exact_deepglobe_colours_decode_to_their_ids():
    ids = np.random.default_rng(0).integers(0, 7, (31, 17))
    rgb = np.asarray(COLORS, np.uint8)[ids]
    out = decode_palette(rgb, COLORS)
    assert out.dtype == np.uint8 and out.shape == (31, 17)
    np.testing.assert_array_equal(out, ids)


def test_binary_palette_binarises_each_channel_at_the_threshold():
    rgb = np.array([[[127, 128, 255], [12, 250, 240], [200, 190, 3], [0, 0, 130], [255, 0, 0], [60, 70, 80]]],
                   np.uint8)
    # (0,1,1) urban; (0,1,1) urban; (1,1,0) agriculture; (0,0,1) water; (1,0,0) no class; (0,0,0) unknown
    np.testing.assert_array_equal(decode_palette(rgb, COLORS), [[1, 1, 2, 5, 255, 0]])
    np.testing.assert_array_equal(decode_palette(rgb, COLORS, threshold=100)[0, :1], [6])  # (1,1,1) barren


def test_non_binary_palette_matches_exactly_and_marks_the_rest_unknown():
    colors = [(0, 0, 0), (0, 90, 255), (34, 139, 34)]
    rgb = np.array([[[0, 90, 255], [34, 139, 34], [0, 0, 0], [0, 91, 255], [34, 139, 35]]], np.uint8)
    np.testing.assert_array_equal(decode_palette(rgb, colors, unknown=9), [[1, 2, 0, 9, 9]])


def test_alpha_channel_is_dropped():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 1:3] = 255
    np.testing.assert_array_equal(decode_palette(rgba, COLORS), np.ones((2, 2)))


@pytest.mark.parametrize(
    "rgb, colors, unknown, match",
    [
        (np.zeros((4, 4), np.uint8), COLORS, 255, r"\(h, w, 3\)"),
        (np.zeros((4, 4, 3), np.uint16), COLORS, 255, "uint8"),
        (np.zeros((4, 4, 3), np.uint8), [(0, 0, 0), (0, 0, 0)], 255, "more than one class"),
        (np.zeros((4, 4, 3), np.uint8), [(0, 0, 300)], 255, "0..255"),
        (np.zeros((4, 4, 3), np.uint8), COLORS, 3, "also the id of class 3"),
        (np.zeros((4, 4, 3), np.uint8), [], 255, "1..255"),
    ],
)
def test_bad_inputs_say_what_is_wrong(rgb, colors, unknown, match):
    with pytest.raises(ValueError, match=match):
        decode_palette(rgb, colors, unknown=unknown)


def test_unknown_palette_lists_the_valid_ones():
    with pytest.raises(ValueError, match="deepglobe"):
        get_palette("cityscapes")
