"""OME-NGFF 0.5 metadata as plain dicts (writers) and a tolerant 0.4/0.5 reader.

NGFF 0.5 puts everything under the ``"ome"`` key of a Zarr v3 group's attributes, with ``"version": "0.5"``
there and nowhere else. NGFF 0.4 (Zarr v2) puts ``"multiscales"`` (each with its own ``"version"``) at the top
level of ``.zattrs``. Layout written by gigaseg::

    image.zarr/                 attrs["ome"] = image_multiscales(...)      arrays "0".."n-1", (c, y, x)
    image.zarr/labels/          attrs = labels_group_attrs(["mask", ...])
    image.zarr/labels/mask/     attrs["ome"] = {**label_multiscales(...), "image-label": image_label(...)}

Level ``l`` is a 2^l downsampling in y and x; its ``scale`` transform is ``pixel_size · 2^l`` on y and x and
1 on every other axis, in ``unit`` (an NGFF space unit, e.g. ``"micrometer"``, ``"meter"``; written on the y and
x axes; none when the input stated none). ``pixel_size`` is one number or (y, x). No translation is written
(pixel ``i`` of level ``l`` is placed at ``i · 2^l``), which is how most writers describe power-of-two pyramids;
where a georeferenced image sits on the map is in its CF grid mapping (``pipeline.spatial``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

NGFF_VERSION = "0.5"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _axes(axes: Sequence[str], unit: str | None) -> list[dict[str, str]]:
    out = []
    for name in axes:
        if name not in _AXIS_TYPES:
            raise ValueError(f"OME axis {name!r} is not one of {sorted(_AXIS_TYPES)}.")
        entry = {"name": name, "type": _AXIS_TYPES[name]}
        if unit is not None and name in "yx":
            entry["unit"] = unit
        out.append(entry)
    return out


PixelSize = float | tuple[float, float]


def _multiscales(
    name: str, n_levels: int, axes: Sequence[str], pixel_size: PixelSize, unit: str | None, method: str | None
) -> dict[str, Any]:
    if n_levels < 1:
        raise ValueError(f"a multiscale image needs at least 1 level, got n_levels={n_levels}.")
    if isinstance(pixel_size, (int, float)):
        pixel_size = (pixel_size, pixel_size)
    size = dict(zip("yx", pixel_size, strict=True))
    datasets = []
    for level in range(n_levels):
        scale = [float(size[a] * 2**level) if a in "yx" else 1.0 for a in axes]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    ms: dict[str, Any] = {"name": name, "axes": _axes(axes, unit), "datasets": datasets}
    if method is not None:
        ms["type"] = method
    return {"version": NGFF_VERSION, "multiscales": [ms]}


def image_multiscales(
    name: str,
    n_levels: int,
    axes: Sequence[str] = ("c", "y", "x"),
    pixel_size: PixelSize = 1.0,
    *,
    unit: str | None = None,
    method: str | None = "mean",
) -> dict[str, Any]:
    """The value of ``group.attrs["ome"]`` for an image pyramid: ``{"version": "0.5", "multiscales": [...]}``.

    Datasets are ``"0".."n_levels-1"``; ``method`` is the downsampling recorded as the multiscale ``type``.
    """
    return _multiscales(name, n_levels, tuple(axes), pixel_size, unit, method)


def label_multiscales(
    name: str, n_levels: int, pixel_size: PixelSize = 1.0, *, unit: str | None = None, method: str | None = None
) -> dict[str, Any]:
    """The ``"ome"`` value for a ``(y, x)`` label pyramid; add ``"image-label": image_label(...)`` to it."""
    return _multiscales(name, n_levels, ("y", "x"), pixel_size, unit, method)


def image_label(
    colors: Sequence[tuple[int, Sequence[int]]],
    properties: Sequence[tuple[int, str]] = (),
    source: str = "../../",
) -> dict[str, Any]:
    """The NGFF 0.5 ``image-label`` dict: ``colors`` as ``(label_value, (r, g, b, a))`` with 0–255 ints,
    ``properties`` as ``(label_value, class_name)``, ``source`` the path from the label group to its image."""
    out: dict[str, Any] = {
        "colors": [{"label-value": int(v), "rgba": [int(c) for c in rgba]} for v, rgba in colors],
        "source": {"image": source},
    }
    for _, rgba in colors:
        if len(rgba) != 4 or not all(0 <= int(c) <= 255 for c in rgba):
            raise ValueError(f"image-label colour {tuple(rgba)} must be 4 integers in 0..255 (r, g, b, a).")
    if properties:
        out["properties"] = [{"label-value": int(v), "name": str(n)} for v, n in properties]
    return out


def labels_group_attrs(names: Sequence[str]) -> dict[str, Any]:
    """Attributes of the ``labels/`` group listing its label images."""
    return {"ome": {"version": NGFF_VERSION, "labels": list(names)}}


def _first_multiscale(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and ome.get("multiscales"):
        return ome["multiscales"][0]  # 0.5
    if attrs.get("multiscales"):
        return attrs["multiscales"][0]  # 0.4 (and 0.1–0.3)
    return None


def is_multiscales(attrs: Mapping[str, Any]) -> bool:
    """True when group ``attrs`` describe an OME-NGFF multiscale image (0.4 or 0.5 layout)."""
    return _first_multiscale(attrs) is not None


def read_axes(attrs: Mapping[str, Any]) -> str:
    """Axis names of the first multiscale image in array order, e.g. ``"tczyx"``; ``""`` if none are given.

    Accepts 0.4+/0.5 axis objects (``{"name": "y", ...}``) and 0.3 plain strings.
    """
    ms = _first_multiscale(attrs)
    if ms is None:
        raise ValueError("attributes hold no OME multiscales (neither 'ome'→'multiscales' nor 'multiscales').")
    return "".join(str(a["name"] if isinstance(a, Mapping) else a).lower() for a in ms.get("axes", ()))


def read_multiscales(attrs: Mapping[str, Any]) -> list[tuple[str, tuple[float, ...]]]:
    """``(path, scale)`` per dataset of the first multiscale image, finest first as listed.

    ``scale`` has one entry per axis: the dataset's ``scale`` transform times the multiscale-level one if
    present; datasets without a scale transform (0.1–0.3) get all ones.
    """
    ms = _first_multiscale(attrs)
    if ms is None:
        raise ValueError("attributes hold no OME multiscales (neither 'ome'→'multiscales' nor 'multiscales').")
    outer = _scale_of(ms.get("coordinateTransformations", ()))
    out = []
    for ds in ms.get("datasets", ()):
        scale = _scale_of(ds.get("coordinateTransformations", ()))
        if outer is not None and scale is not None:
            scale = tuple(a * b for a, b in zip(scale, outer, strict=True))
        if scale is None:
            scale = outer if outer is not None else ()
        out.append((str(ds["path"]), scale))
    if not out:
        raise ValueError("OME multiscales lists no datasets.")
    return out


def _scale_of(transforms: Sequence[Mapping[str, Any]]) -> tuple[float, ...] | None:
    for t in transforms:
        if t.get("type") == "scale" and "scale" in t:
            return tuple(float(s) for s in t["scale"])
    return None
