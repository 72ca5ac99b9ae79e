"""The arrays of an image's output: the label pyramid and extras with their NGFF metadata, and the maps a stage
leaves for the next (paths: ``pipeline.output.layout``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import zarr

from pipeline import ome
from pipeline.output.layout import ImageOutput
from pipeline.output.nodata import Nodata
from pipeline.output.spatial import write_grid_mappings
from pipeline.plan import ArrayRef
from pipeline.spatial import Spatial
from pipeline.storage import zarr_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputArrays:
    """An image's masks: the label pyramid (level 0 first) and the extras asked for; ``block_levels``: how many
    levels above 0 the blocks that write level 0 make themselves (``workers.label_pyramid``), the rest being
    built from the last of them after the blocks; ``nodata`` where the input states no data (the blocks writing the
    labels put the reserved label there)."""

    labels: list[zarr.Array]
    confidence: zarr.Array | None = None
    probabilities: zarr.Array | None = None
    block_levels: int = 0
    nodata: Nodata | None = None  # where the input states no data, for the blocks writing the labels

    def ref(self, array: zarr.Array | None, out: ImageOutput) -> ArrayRef | None:
        """``array`` as workers open it (an array of ``out``'s group)."""
        if array is None:
            return None
        shape = tuple(array.shape[-2:])
        return ArrayRef(out.group_url, array.path, "cyx"[-array.ndim:], shape, dict(out.storage_options))


def create_outputs(
    out: ImageOutput,
    *,
    label_name: str,
    shapes: list[tuple[int, int]],
    class_names: list[str],
    class_colors: list[tuple[int, int, int]],
    chunk: int,
    extras: list[str],
    labels_dtype,
    spatial: Spatial = Spatial(),
    nodata_label: int | None = None,
) -> OutputArrays:
    """Create (or recreate, so an interrupted run leaves no stale chunk behind) the label pyramid and the extra
    arrays, with their NGFF metadata: the scale and units of ``spatial`` on every level, its CF grid mappings when
    it is georeferenced (``pipeline.output.spatial``), and ``nodata_label`` (``pipeline.output.nodata``) listed as
    class ``nodata`` with a transparent colour when the input states nodata."""
    root = zarr.open_group(store=zarr_store(out.group_url, out.storage_options), mode="a")
    labels = root.require_group("labels")
    labels.attrs["ome"] = ome.labels_group_attrs([label_name])["ome"]
    group = labels.require_group(label_name)
    levels = [
        group.create_array(
            str(level), shape=shape, chunks=(min(chunk, shape[0]), min(chunk, shape[1])),
            dtype=labels_dtype, fill_value=0, overwrite=True, compressors=_codec("labels"),
            dimension_names=("y", "x"),
        )
        for level, shape in enumerate(shapes)
    ]
    size, unit = spatial.ngff_scale(0)
    meta = ome.label_multiscales(label_name, len(shapes), size, unit=unit)
    colors = [(i, (*c, 255)) for i, c in enumerate(class_colors)]
    properties = [(i, name) for i, name in enumerate(class_names)]
    if nodata_label is not None:
        colors.append((nodata_label, (0, 0, 0, 0)))
        properties.append((nodata_label, "nodata"))
    meta["image-label"] = ome.image_label(colors=colors, properties=properties)
    group.attrs["ome"] = meta
    group.attrs["gigaseg"] = {"spatial": spatial.to_json(), "nodata_label": nodata_label}
    write_grid_mappings(group, spatial, {str(level): level for level in range(len(shapes))})
    h, w = shapes[0]
    c = min(chunk, h), min(chunk, w)
    confidence = probabilities = None
    if "confidence" in extras:
        confidence = root.create_array(
            "confidence", shape=(h, w), chunks=c, dtype="float32", fill_value=0.0, overwrite=True,
            compressors=_codec("confidence"), dimension_names=("y", "x"),
        )
    if "probabilities" in extras:
        n = len(class_names)
        probabilities = root.create_array(
            "probabilities", shape=(n, h, w), chunks=(n, *c), dtype="float16", fill_value=0.0,
            overwrite=True, compressors=_codec("probabilities"), dimension_names=("c", "y", "x"),
        )
        probabilities.attrs["classes"] = class_names
    write_grid_mappings(root, spatial, {a.basename: 0 for a in (confidence, probabilities) if a is not None})
    return OutputArrays(levels, confidence, probabilities)


def open_outputs(out: ImageOutput, *, label_name: str, shapes: list[tuple[int, int]], extras: list[str]) -> OutputArrays:
    """The arrays ``create_outputs`` made, as they are (resuming an image whose blocks wrote some of them)."""
    root = zarr.open_group(store=zarr_store(out.group_url, out.storage_options), mode="r+")
    labels = [root[f"labels/{label_name}/{level}"] for level in range(len(shapes))]
    return OutputArrays(labels, root["confidence"] if "confidence" in extras else None,
                        root["probabilities"] if "probabilities" in extras else None)


def _codec(kind: str):
    """Labels: zstd (runs of one class compress far); floats (the masks' extras): LZ4 on shuffled bytes (Blosc)."""
    if kind == "labels":
        return zarr.codecs.ZstdCodec(level=3)
    return zarr.codecs.BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")


def create_map(group_url: str, name: str, shape: tuple[int, ...], chunk: int, storage_options,
               fresh: bool = True, dtype: str = "float16", chunks: tuple[int, ...] | None = None) -> zarr.Array:
    """A stage map ``name`` ((C, H, W) or (H, W), float16 unless ``dtype``) in the group at ``group_url``, chunked
    like the masks (each chunk one writer's) unless ``chunks`` says otherwise. ``fresh``: created anew; else the
    one there is opened (resuming a stage whose blocks wrote some of it), or created if there is none.

    Maps are stored raw: each is written once, read once and deleted with the image's work area, and the
    probabilities' noisy low bits leave LZ4 little to find (a 7-class float16 map: 0.66 of its size for 5× the
    CPU of a raw write, 31 against 6 ms per MP, on this project's CPU machine)."""
    group = zarr.open_group(store=zarr_store(group_url, storage_options), mode="a")
    if not fresh and name in group:
        existing = group[name]
        if tuple(existing.shape) == tuple(shape):
            return existing
    chunks = chunks or (*shape[:-2], min(chunk, shape[-2]), min(chunk, shape[-1]))
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=True,
                              compressors=None)


def map_ref(array: zarr.Array, group_url: str, storage_options) -> ArrayRef:
    """A stage map as workers open it."""
    return ArrayRef(group_url, array.path, "cyx"[-array.ndim:], tuple(array.shape[-2:]), dict(storage_options))


__all__ = ["OutputArrays", "create_map", "create_outputs", "map_ref", "open_outputs"]
