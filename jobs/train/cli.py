"""The ``gigaseg train`` and ``gigaseg import-pairs`` commands: arguments, one line per problem, exit codes."""

from __future__ import annotations

import json

from jobs.console import EXIT_FAILED, EXIT_OK, error, report_error
from jobs.train.driver import train
from jobs.train.spec import load_train_spec
from jobs.train.store import CURVES
from models.errors import GigasegError
from pipeline.evaluation.palette import get_palette
from pipeline.training.dataset_import import import_pairs


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on a Zarr training dataset (exit 0 ok, 1 failed, 2 bad spec)")
    p.add_argument("spec", help="training spec (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set workers.num_workers=4 (repeatable)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    debug = getattr(args, "debug", False)
    try:
        spec = load_train_spec(args.spec, args.set)
        result = train(spec)
    except GigasegError as err:
        return report_error(err, debug)
    except Exception as err:  # noqa: BLE001 - a failed worker (ray.train.TrainingFailedError) and the like
        if debug:
            raise
        error(f"training failed: {type(err).__name__}: {err}")
        return EXIT_FAILED
    losses = result.history.get("train_loss") or [float("nan")]
    print(f"trained epochs {result.start_epoch}..{result.last_epoch} (last train_loss {losses[-1]:.4f}) in "
          f"{result.seconds:.0f} s\nmodel: {result.model_url}  curves: {result.output_url}/{CURVES}")
    return EXIT_OK


def add_import_parser(subparsers) -> None:
    p = subparsers.add_parser("import-pairs", help="build a Zarr training dataset from image/mask file pairs")
    p.add_argument("images", help="folder (URL) of the images")
    p.add_argument("out", help="dataset folder (URL) to create or add to")
    p.add_argument("--masks", default=None, help="folder of the masks (default: the images' folder)")
    p.add_argument("--image-pattern", default="{id}_sat.jpg", help="image file name with {id} (default %(default)s)")
    p.add_argument("--mask-pattern", default="{id}_mask.png", help="mask file name with {id} (default %(default)s)")
    p.add_argument("--palette", default=None, help="named class table of colour-coded masks, e.g. deepglobe")
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME[:R,G,B]",
                   help="a class, in id order (repeatable); colours needed for colour-coded masks")
    p.add_argument("--mask-kind", choices=["palette", "index"], default="palette",
                   help="colour-coded RGB masks, or masks of class ids")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--storage-options", default=None, help="fsspec options of the inputs, as JSON")
    p.add_argument("--out-storage-options", default=None, help="fsspec options of the output, as JSON")
    p.add_argument("--overwrite", action="store_true", help="re-import samples already there")
    p.set_defaults(func=cmd_import)


def _parse_classes(args) -> list:
    if args.palette and args.classes:
        raise ValueError("give --palette or --class, not both")
    if args.palette:
        return list(get_palette(args.palette))
    if not args.classes:
        raise ValueError("name the classes: --palette NAME or --class NAME[:R,G,B] (repeated, in id order)")
    out = []
    for item in args.classes:
        name, _, rgb = item.partition(":")
        color = tuple(int(v) for v in rgb.split(",")) if rgb else None
        if color is not None and len(color) != 3:
            raise ValueError(f"--class {item!r}: the colour must be R,G,B")
        out.append((name, color))
    return out


def cmd_import(args) -> int:
    try:
        classes = _parse_classes(args)
        so = json.loads(args.storage_options) if args.storage_options else None
        out_so = json.loads(args.out_storage_options) if args.out_storage_options else None
        info = import_pairs(args.images, args.out, masks_url=args.masks, image_pattern=args.image_pattern,
                            mask_pattern=args.mask_pattern, classes=classes, mask_kind=args.mask_kind,
                            ignore_index=args.ignore_index, chunk=args.chunk, storage_options=so,
                            out_storage_options=out_so, overwrite=args.overwrite)
    except (GigasegError, ValueError, FileNotFoundError, FileExistsError) as err:  # a bad argument, path or file
        return report_error(err, getattr(args, "debug", False))
    pixels = sum(info.class_pixels) or 1
    print(f"{args.out}: {len(info.images)} image(s), classes "
          + ", ".join(f"{n} {p / pixels:.1%}" for n, p in zip(info.class_names, info.class_pixels)))
    return EXIT_OK


__all__ = ["add_import_parser", "add_train_parser", "cmd_import", "cmd_train"]
