"""Masks out of a job's output in the formats GIS and pathology tools open: Cloud-Optimized GeoTIFF (``cog``) and
polygons (``polygons``: GeoPackage or GeoParquet), one file per image, read chunk by chunk (``masks``)."""
