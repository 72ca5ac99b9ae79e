"""The ``gigaseg eval`` command: arguments, the run, the exit code (scoring itself: ``jobs.evaluate``)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from typing import Any

from jobs.console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error
from jobs.eval_report import format_table
from jobs.evaluate import __doc__ as EVAL_DOC
from jobs.evaluate import evaluate_job
from models.errors import GigasegError
from pipeline.evaluation.masks import _ZARR_MARKERS
from pipeline.storage import filesystem, fs_path, join

log = logging.getLogger(__name__)




def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``gigaseg eval PRED GT`` to an argparse subparsers object; it sets ``func=cmd_eval``."""
    e = subparsers.add_parser(
        "eval", help="score a job's masks against ground truth (exit 0 ok, 1 some image not scored, 2 bad arguments)",
        description=EVAL_DOC.split("\n\n")[0],
    )
    e.add_argument("pred", metavar="PRED", help="a job's output.url, or one Zarr mask")
    e.add_argument("gt", metavar="GT", help="folder/bucket of masks named like the images (<name>.zarr, "
                   "<name>.png, <name>.tif, <name>_mask.png), or one mask")
    e.add_argument("--label-name", default="segmentation", help="label group of the predictions (default segmentation)")
    e.add_argument("--exclude", action="append", default=[], metavar="ID[,ID...]",
                   help="class ids left out of the mIoU (repeatable), e.g. --exclude 0 for DeepGlobe")
    e.add_argument("--ignore-index", default="255", metavar="ID|none",
                   help="ground-truth id that is not scored (default 255; also palette colours that match no class)")
    e.add_argument("--boundary-tol", type=int, default=3, metavar="PX",
                   help="boundary F1 tolerance in pixels (default 3)")
    e.add_argument("--palette", choices=["none", "deepglobe"], default="none",
                   help="decode colour-coded ground truth with this palette (default none: class ids)")
    e.add_argument("--classes", default=None, metavar="N|NAME,NAME,...",
                   help="number or names of the classes (default: from the palette or the predictions)")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="where eval.json and confusion.png go (default PRED/eval, or PRED.eval for one Zarr mask)")
    e.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec storage options as JSON")
    e.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    e.set_defaults(func=cmd_eval)
    return e


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``gigaseg eval``: 0 every image with ground truth scored, 1 some image could not be scored,
    2 bad arguments or paths (or no image had ground truth). Problems print one line each on stderr."""
    try:
        options = _parse_options(args.storage_options)
        exclude = [_int(v, "--exclude") for item in args.exclude for v in str(item).split(",") if v.strip()]
        ignore = None if str(args.ignore_index).lower() == "none" else _int(args.ignore_index, "--ignore-index")
        num_classes, names = _parse_classes(args.classes)
        if args.boundary_tol < 0:
            raise ValueError(f"--boundary-tol must be ≥ 0 pixels, got {args.boundary_tol}")
        out = args.out or _default_out(args.pred, options)
        result = evaluate_job(
            args.pred, args.gt, label_name=args.label_name, num_classes=num_classes, class_names=names,
            ignore_index=ignore, exclude=exclude, boundary_tol=args.boundary_tol, palette=args.palette,
            storage_options=options, out=out,
        )
    except (GigasegError, FileNotFoundError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        if getattr(args, "debug", False):
            raise
        error(str(err))
        return EXIT_USAGE
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    for row in result["images"]:
        if row["status"] == "error":
            error(f"{row['name']}: {row['error']}")
    if result["counts"]["error"]:
        return EXIT_FAILED
    if not result["counts"]["ok"]:
        error(f"no ground truth under {args.gt} for any of the {len(result['images'])} image(s) (looked for "
              "<name>.zarr|.png|.tif and <name>_mask.*); check GT")
        return EXIT_USAGE
    if not args.json:
        print(f"report: {result['outputs']['json']}  confusion matrix: {result['outputs']['confusion_png']}")
    return EXIT_OK


def _parse_options(text: str | None) -> dict[str, Any]:
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        example = '{"endpoint_url": "http://minio:9000"}'
        raise ValueError(f"--storage-options is not valid JSON ({err}); e.g. '{example}'") from None
    if not isinstance(options, dict):
        raise ValueError(f"--storage-options must be a JSON object, got {text!r}")
    return options


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} takes integer class ids, got {text!r}") from None


def _parse_classes(text: str | None) -> tuple[int | None, list[str] | None]:
    if not text:
        return None, None
    if text.strip().isdigit():
        return int(text), None
    names = [s.strip() for s in text.split(",")]
    if not all(names):
        raise ValueError(f"--classes {text!r}: empty class name; give N or name0,name1,...")
    return None, names


def _default_out(pred: str, so: Mapping[str, Any]) -> str:
    fs = filesystem(pred, so)
    root = fs_path(pred).rstrip("/")
    if any(fs.exists(f"{root}/{m}") for m in _ZARR_MARKERS):
        return pred.rstrip("/").removesuffix(".zarr") + ".eval"
    return join(pred, "eval")
