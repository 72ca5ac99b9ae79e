"""Spatial metadata written beside the arrays of an output group, for tools that read CF conventions.

For a georeferenced image, each group holding its arrays gets one CF grid-mapping array per pyramid level it
holds, ``spatial_ref_<l>`` (0-d, its attributes ``crs_wkt``, ``spatial_ref`` and ``GeoTransform``:
``pipeline.spatial.cf_grid_mapping``), and each array names its level's in ``attrs["grid_mapping"]``. xarray with
``decode_coords="all"`` turns the grid mapping into a coordinate and rioxarray reads the CRS and transform from it.

Why CF and not GeoZarr: rioxarray reads CRS and transform from CF grid mappings (``crs_wkt`` / ``spatial_ref`` and
``GeoTransform``); the GeoZarr draft encodes the CRS the same CF way, but lays out a multiscale pyramid as one
child group per level, which NGFF's arrays-in-one-group layout (``labels/<name>/0, 1, …``) does not allow. One
grid mapping per level, because the levels' transforms differ (``Spatial.transform_at``).
"""

from __future__ import annotations

from collections.abc import Mapping

import zarr

from pipeline.spatial import Spatial, cf_grid_mapping, grid_mapping_name


def write_grid_mappings(group: zarr.Group, spatial: Spatial, arrays: Mapping[str, int]) -> None:
    """Beside ``arrays`` of ``group`` (array name → its pyramid level): a ``spatial_ref_<l>`` per level and the
    arrays' ``grid_mapping`` attributes. Nothing for an image that is not georeferenced."""
    if not spatial.georeferenced:
        return
    for level in sorted(set(arrays.values())):
        name = grid_mapping_name(level)
        ref = group.create_array(name, shape=(), dtype="int32", fill_value=0, overwrite=True, dimension_names=())
        ref.attrs.update(cf_grid_mapping(spatial, level))
    for path, level in arrays.items():
        group[path].attrs["grid_mapping"] = grid_mapping_name(level)


__all__ = ["write_grid_mappings"]
