"""``gigaseg export-masks OUTPUT --to cog|polygons``: each finished mask of a job as a file GIS and slide tools open.

- ``--to cog``: ``<DEST>/<name>.tif``, a Cloud-Optimized GeoTIFF with the image's CRS and transform, overviews and
  a colour table (``pipeline.export.cog``).
- ``--to polygons``: ``<DEST>/<name>.gpkg`` (GeoPackage) or ``.parquet`` (GeoParquet), one polygon per connected
  region of a class, simplified by ``--simplify`` pixels (``pipeline.export.polygons``).

Both read the mask chunk by chunk, so memory stays flat whatever the image size. ``DEST`` defaults to
``OUTPUT/export``; a remote ``DEST`` (``s3://…``) is written locally first, then uploaded. Exit 0 every mask
exported, 1 some failed (the others are still written), 2 bad arguments or a missing extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from jobs.console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error, print_table
from models.errors import GigasegError
from pipeline.errors import MissingDependencyError
from pipeline.export.cog import export_cog
from pipeline.export.masks import list_masks
from pipeline.export.vector import WRITERS, export_polygons
from pipeline.optional import require
from pipeline.storage import filesystem, fs_path, is_local, join, local_path


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    x = subparsers.add_parser(
        "export-masks", help="write a job's masks as Cloud-Optimized GeoTIFFs or polygons (exit 0 ok, 1 some mask "
        "failed, 2 bad arguments)", description=__doc__.split("\n\n")[0])
    x.add_argument("output", metavar="OUTPUT", help="a job's output.url")
    x.add_argument("--to", required=True, choices=["cog", "polygons"], help="what to write")
    x.add_argument("--dest", default=None, metavar="DIR", help="where the files go (default OUTPUT/export)")
    x.add_argument("--format", default="gpkg", choices=sorted(WRITERS),
                   help="polygons: GeoPackage (gpkg, default) or GeoParquet (parquet)")
    x.add_argument("--simplify", type=float, default=0.5, metavar="PX",
                   help="polygons: Douglas-Peucker tolerance in level-0 pixels, topology kept (default %(default)s; "
                   "0 keeps every pixel edge, dropping only collinear vertices)")
    x.add_argument("--chunk", type=int, default=1024, metavar="PX", help="polygons: side of the chunks read")
    x.add_argument("--exclude", action="append", default=[], metavar="ID[,ID...]",
                   help="polygons: class ids left out (repeatable), e.g. --exclude 0 for a background")
    x.add_argument("--label", default="segmentation", help="label name of the masks (output.label_name)")
    x.add_argument("--images", nargs="*", default=None, metavar="NAME", help="only these images (default all)")
    x.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec storage options as JSON")
    x.set_defaults(func=cmd_export)
    return x


def cmd_export(args: argparse.Namespace) -> int:
    try:
        options = json.loads(args.storage_options) if args.storage_options else {}
        exclude = [int(v) for item in args.exclude for v in str(item).split(",") if v.strip()]
        if args.chunk < 1:
            raise ValueError(f"--chunk must be ≥ 1 px, got {args.chunk}")
        require("rasterio", f"gigaseg export-masks --to {args.to}")
        if args.to == "polygons":
            require("shapely", "gigaseg export-masks --to polygons")
        masks = list_masks(args.output, options, args.label, args.images)
    except (GigasegError, FileNotFoundError, ValueError) as err:
        if getattr(args, "debug", False):
            raise
        error(str(err))
        return EXIT_USAGE
    dest = args.dest or join(args.output, "export")
    remote = not is_local(dest)
    local_dir = tempfile.mkdtemp(prefix="gigaseg-export-") if remote else local_path(dest)
    try:
        rows, failed = _export_all(args, masks, local_dir, dest if remote else None, exclude, options)
    except MissingDependencyError as err:
        error(str(err))
        return EXIT_USAGE
    finally:
        if remote:
            shutil.rmtree(local_dir, ignore_errors=True)
    print_table(("image", "status", "exported", "seconds", "file"), rows)
    return EXIT_FAILED if failed else EXIT_OK


def _export_all(args, masks, local_dir: str, remote: str | None, exclude: list[int], options: dict):
    """Each mask exported in turn; one failing never stops the others (a missing extra stops them all)."""
    rows, failed = [], 0
    for mask in masks:
        t0 = time.perf_counter()
        try:
            if args.to == "cog":
                path = export_cog(mask, os.path.join(local_dir, f"{mask.name}.tif"))
                what = f"{mask.shape[0]}×{mask.shape[1]} px"
            else:
                path = os.path.join(local_dir, f"{mask.name}{WRITERS[args.format].suffix}")
                n = export_polygons(mask, path, fmt=args.format, tolerance=args.simplify, chunk=args.chunk,
                                    exclude=exclude)
                what = f"{n} polygons"
            target = _upload(path, remote, options) if remote else path
            rows.append((mask.name, "ok", what, f"{time.perf_counter() - t0:.1f}", target))
        except MissingDependencyError:
            raise
        except Exception as err:  # noqa: BLE001 - one mask failing never stops the others
            if getattr(args, "debug", False):
                raise
            failed += 1
            error(f"{mask.name}: {err}")
            rows.append((mask.name, "failed", "-", f"{time.perf_counter() - t0:.1f}", str(err)[:100]))
    return rows, failed


def _upload(path: str, dest: str, options: dict) -> str:
    target = join(dest, os.path.basename(path))
    filesystem(target, options).put_file(path, fs_path(target))
    os.remove(path)
    return target


__all__ = ["add_export_parser", "cmd_export"]
