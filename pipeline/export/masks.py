"""The finished masks of a job's output, described from their metadata: what the exports need to know."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zarr

from pipeline.errors import InputNotFoundError
from pipeline.spatial import Spatial
from pipeline.storage import filesystem, fs_path, join, open_group


@dataclass(frozen=True)
class MaskInfo:
    """One image's level-0 mask: ``<group_url>/labels/<label_name>/0``, its classes (id = position), colours, the
    reserved ``nodata_label`` (None when the input stated no nodata) and where its pixels are (``spatial``)."""

    name: str
    group_url: str
    label_name: str
    shape: tuple[int, int]
    chunks: tuple[int, int]
    dtype: str
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    spatial: Spatial = Spatial()
    nodata_label: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def array_url(self) -> str:
        return join(self.group_url, "labels", self.label_name, "0")

    def open(self) -> zarr.Array:
        return open_group(join(self.group_url, "labels", self.label_name), self.storage_options)["0"]


def read_mask(group_url: str, label_name: str = "segmentation", storage_options: Mapping[str, Any] | None = None,
              name: str | None = None) -> MaskInfo:
    """The ``MaskInfo`` of one image group (``<output>/<name>.zarr``)."""
    so = dict(storage_options or {})
    try:
        labels = open_group(join(group_url, "labels", label_name), so)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as exc:
        raise InputNotFoundError(f"{group_url}: no labels/{label_name} group; is it a gigaseg output image "
                                 f"(and the label name right: --label)?") from exc
    meta = labels.attrs["ome"]["image-label"]
    props = {int(p["label-value"]): p["name"] for p in meta.get("properties", ())}
    colors = {int(c["label-value"]): tuple(c["rgba"][:3]) for c in meta.get("colors", ())}
    extra = labels.attrs.get("gigaseg", {})
    nodata = extra.get("nodata_label")
    ids = sorted(v for v in props if v != nodata)
    array = labels["0"]
    return MaskInfo(name or group_url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr"), group_url, label_name,
                    tuple(array.shape), tuple(array.chunks), str(array.dtype), tuple(props[i] for i in ids),
                    tuple(colors.get(i, (0, 0, 0)) for i in ids), Spatial.from_json(extra.get("spatial")), nodata, so)


def list_masks(output_url: str, storage_options: Mapping[str, Any] | None = None, label_name: str = "segmentation",
               names: Sequence[str] | None = None) -> list[MaskInfo]:
    """The complete masks of a job's output (``attrs["gigaseg"]["complete"]``), sorted by name; ``names`` picks
    some (an unknown name is an error listing the ones there)."""
    so = dict(storage_options or {})
    fs = filesystem(output_url, so)
    try:
        entries = fs.ls(fs_path(output_url), detail=False)
    except FileNotFoundError:
        raise InputNotFoundError(f"{output_url}: no such output; give the output.url of a gigaseg run.") from None
    found = {}
    for path in entries:
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if not base.endswith(".zarr"):
            continue
        url = join(output_url, base)
        try:
            state = open_group(url, so).attrs.get("gigaseg", {})
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
            continue
        if state.get("complete"):
            found[base.removesuffix(".zarr")] = url
    if names:
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise InputNotFoundError(f"{output_url}: no complete mask named {unknown}; complete ones: {sorted(found)}.")
        found = {n: found[n] for n in names}
    if not found:
        raise InputNotFoundError(f"{output_url}: no complete mask to export (run the job to completion first).")
    return [read_mask(url, label_name, so, name) for name, url in sorted(found.items())]


__all__ = ["MaskInfo", "list_masks", "read_mask"]
