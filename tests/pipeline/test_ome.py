import pytest

from pipeline import ome


def test_image_multiscales_is_ngff_05():
    meta = ome.image_multiscales("scene", 3, pixel_size=0.5)
    assert meta["version"] == "0.5"
    (ms,) = meta["multiscales"]
    assert "version" not in ms  # 0.5 keeps the version in "ome" only
    assert ms["name"] == "scene" and ms["type"] == "mean"
    assert ms["axes"] == [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space"},
        {"name": "x", "type": "space"},
    ]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    scales = [d["coordinateTransformations"] for d in ms["datasets"]]
    assert scales == [[{"type": "scale", "scale": [1.0, 0.5 * f, 0.5 * f]}] for f in (1, 2, 4)]


def test_units_are_written_on_space_axes_only():
    ms = ome.image_multiscales("a", 1, unit="micrometer")["multiscales"][0]
    assert [a.get("unit") for a in ms["axes"]] == [None, "micrometer", "micrometer"]


def test_label_multiscales_and_image_label():
    meta = ome.label_multiscales("mask", 2)
    ms = meta["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [2.0, 2.0]
    label = ome.image_label([(0, (0, 0, 0, 0)), (1, (255, 0, 0, 255))], [(0, "background"), (1, "road")])
    assert label == {
        "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}, {"label-value": 1, "rgba": [255, 0, 0, 255]}],
        "properties": [{"label-value": 0, "name": "background"}, {"label-value": 1, "name": "road"}],
        "source": {"image": "../../"},
    }
    with pytest.raises(ValueError, match="0..255"):
        ome.image_label([(1, (300, 0, 0, 255))])


def test_labels_group_attrs():
    assert ome.labels_group_attrs(["mask"]) == {"ome": {"version": "0.5", "labels": ["mask"]}}


def test_read_multiscales_05_roundtrip():
    attrs = {"ome": ome.image_multiscales("a", 3)}
    assert ome.is_multiscales(attrs)
    assert ome.read_axes(attrs) == "cyx"
    assert ome.read_multiscales(attrs) == [("0", (1.0, 1.0, 1.0)), ("1", (1.0, 2.0, 2.0)), ("2", (1.0, 4.0, 4.0))]


def test_read_multiscales_04_with_outer_transform():
    attrs = {
        "multiscales": [
            {
                "version": "0.4",
                "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                         {"name": "z"}, {"name": "y"}, {"name": "x"}],
                "datasets": [
                    {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 1, 1]}]},
                    {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 2, 2]},
                                                                 {"type": "translation", "translation": [0] * 5}]},
                ],
                "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 0.25, 0.25]}],
            }
        ]
    }
    assert ome.read_axes(attrs) == "tczyx"
    assert ome.read_multiscales(attrs) == [("s0", (1, 1, 1, 0.25, 0.25)), ("s1", (1, 1, 1, 0.5, 0.5))]


def test_read_multiscales_03_string_axes_and_no_transforms():
    attrs = {"multiscales": [{"axes": ["y", "x"], "datasets": [{"path": "0"}, {"path": "1"}]}]}
    assert ome.read_axes(attrs) == "yx"
    assert ome.read_multiscales(attrs) == [("0", ()), ("1", ())]


def test_not_multiscales():
    assert not ome.is_multiscales({"ome": {"version": "0.5", "labels": ["a"]}})
    with pytest.raises(ValueError, match="no OME multiscales"):
        ome.read_multiscales({})


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 1 level"):
        ome.image_multiscales("a", 0)
    with pytest.raises(ValueError, match="axis 'q'"):
        ome.image_multiscales("a", 1, axes=("q", "y", "x"))
