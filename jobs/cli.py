"""``gigaseg`` command line: validate, run, status, inspect, export, demo, synth, train, import-pairs,
import-checkpoint, eval, export-masks, submit, logs, job-status.

Exit codes (``jobs.console``, the same for every command): 0 every image succeeded (or was already done), 1 some
image failed, 2 the spec or the command line is wrong. Problems print one line each; ``--debug`` adds tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error, print_problems, print_results, report_error
from jobs.spec import load_spec
from models.errors import GigasegError
from pipeline.errors import SpecError
from pipeline.redact import RedactingFilter, redact

# Each command's own module is imported when that command runs (the function-local imports below): the
# runner, training, evaluation and submission pull in Ray, Dask and their clients, about a second of start-up
# that `gigaseg validate`, `status` and `--help` do not need.

log = logging.getLogger("gigaseg")


def _setup_logging(debug: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:  # no credential or presigned-URL signature in the log
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for noisy in ("ray", "distributed", "botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "rasterio", "pyogrio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.INFO)


def cmd_validate(args) -> int:
    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as err:
        print_problems(err)
        return EXIT_USAGE
    print(f"{args.spec}: ok")
    if args.echo:
        print(spec.echo(), end="")
    return EXIT_OK


def cmd_run(args) -> int:
    from jobs.runner import run_spec

    try:
        spec = load_spec(args.spec, args.set)
        results = run_spec(spec, audit_dir=args.audit_writes, force=args.force)
    except GigasegError as err:  # anything else is a bug: main's last line of defence
        return report_error(err, args.debug)
    print_results(results)
    print(redact(f"masks: {spec.output.url}/<name>.zarr/labels/{spec.output.label_name}  "
                 f"report: {spec.output.url}/report.json"))
    return EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK


def cmd_status(args) -> int:
    from jobs.report import status

    options = json.loads(args.storage_options) if args.storage_options else {}
    try:
        st = status(args.output, options)
    except FileNotFoundError as err:
        return report_error(err, args.debug)
    if args.json:
        print(redact(json.dumps(st, indent=2)))
    else:
        if st.get("lease"):
            print(f"being written by {st['lease']}")
        for row in st["images"]:
            extra = f"  {row['error']}" if row["error"] else ""
            print(f"{row['name']:<32} {row['status']:<12} {row['tiles_done']}/{row['tiles']} tiles{extra}")
        c = st["counts"]
        print(f"done {c['done']}, failed {c['failed']}, in progress {c['in progress']}, left {c['left']}")
    return EXIT_FAILED if st["counts"]["failed"] else EXIT_OK


def _model_bytes(url: str, options: dict) -> bytes | None:
    """The bytes of the model file ``url`` (``inspect``, ``export``); None, said on stderr, when it is not there."""
    from pipeline.storage import read_bytes

    try:
        return read_bytes(url, options)
    except FileNotFoundError:
        error(f"{url}: no such file")
        return None


def cmd_inspect(args) -> int:
    """Print a model's card and what gigaseg found when it ran one tile through it."""
    from pipeline.frameworks.base import ModelSource
    from pipeline.frameworks.segmenters import check_segmenter, resolve_segmenter

    options = json.loads(args.storage_options) if args.storage_options else {}
    data = _model_bytes(args.model, options)
    if data is None:
        return EXIT_USAGE
    source = ModelSource(data, args.model, "fpn_resnet18", (), storage_options=options, factory=args.factory,
                         any_bands=True)
    try:
        resolution = resolve_segmenter(source, "segment")
        check_segmenter(resolution, args.tile)
    except SpecError as err:
        print_problems(err)
        return EXIT_USAGE
    runtime = resolution.details["segmenter"]
    card = runtime.card
    facts = {"model": args.model, "kind": runtime.kind, "card": card.to_dict(),
             "input size": list(runtime.fixed_size) if runtime.fixed_size else "any (a multiple of "
             f"{card.size_multiple})", "batch": runtime.fixed_batch or "any",
             "checked": f"a {args.tile}×{args.tile} tile gives {card.num_classes} class channels"
             if runtime.kind != "gigaseg" else "a gigaseg checkpoint: its weights fit its architecture"}
    if args.json:
        print(json.dumps(facts, indent=2))
        return EXIT_OK
    print(f"{args.model}: {runtime.kind} model")
    print(f"  classes      {', '.join(card.class_names)}")
    print(f"  bands        {', '.join(card.bands)}")
    norm = card.normalization
    print(f"  normalize    mean {list(norm.mean)}, std {list(norm.std)} (pixel values in 0..1)")
    print(f"  output       {card.output}; input size {facts['input size']}; batch {facts['batch']}")
    print(f"  checked      {facts['checked']}")
    return EXIT_OK


def cmd_export(args) -> int:
    """A gigaseg segmenter checkpoint as ONNX, its card in the metadata; checked against torch on one batch."""
    from models.errors import CheckpointError
    from models.onnx_export import compare_outputs, export_onnx
    from pipeline.storage import write_bytes

    options = json.loads(args.storage_options) if args.storage_options else {}
    data = _model_bytes(args.model, options)
    if data is None:
        return EXIT_USAGE
    try:
        onnx_bytes, card = export_onnx(data, opset=args.opset)
    except CheckpointError as err:
        error(f"{args.model}: {err}")
        return EXIT_USAGE
    write_bytes(args.out, onnx_bytes, options)
    m = card.size_multiple
    diff, scale = compare_outputs(data, onnx_bytes, (2, len(card.bands), 4 * m, 3 * m))  # not the traced shape
    print(f"{args.out}: ONNX (opset {args.opset}), {len(onnx_bytes) / 2**20:.1f} MiB; input image (N, "
          f"{len(card.bands)}, H, W) normalised float32, H and W multiples of {card.size_multiple}; output logits "
          f"(N, {card.num_classes}, H, W)")
    print(f"  card         metadata_props[{json.dumps('gigaseg.card')}]: classes {', '.join(card.class_names)}")
    print(f"  checked      max |ONNX Runtime − torch| = {diff:.2e} on logits up to {scale:.2f} (fp32)")
    return EXIT_OK


def cmd_demo(args) -> int:
    from jobs.demo import run_demo

    return run_demo(args.output, large=args.large)


def _parse_size(text: str) -> tuple[int, int]:
    """``"2448"`` → (2448, 2448); ``"2000x3000"`` → (2000, 3000) as height × width."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--size {text!r} must be N or HxW in px, e.g. 2448 or 2000x3000")
    return int(parts[0]), int(parts[-1])


def cmd_synth(args) -> int:
    from pipeline.synth import SynthConfig
    from pipeline.synth.write import write_split

    try:
        h, w = _parse_size(args.size)
        cfg = SynthConfig(height=h, width=w, seed=args.seed, chunk=args.chunk, region_size=args.region_size)
        so = json.loads(args.storage_options) if args.storage_options else None
        split = write_split(args.output, cfg, train=args.train, val=args.val, png=args.png,
                            dataset=not args.no_dataset, storage_options=so)
    except ValueError as err:  # a bad size, count, seed or option (GigasegErrors from writing go further up)
        if args.debug:
            raise
        error(f"synth: {err}")
        return EXIT_USAGE
    out = args.output.rstrip("/")
    print(f"{out}: {len(split.train)} train + {len(split.val)} val images of {h}×{w} px (base seed {args.seed})")
    print(f"  images (`gigaseg run` inputs.url): {out}/train/images  {out}/val/images")
    print(f"  masks (`gigaseg eval` ground truth): {out}/train/masks  {out}/val/masks")
    if args.png:
        print(f"  png: {out}/train/png  {out}/val/png  (<name>_sat.png, <name>_mask.png)")
    if split.dataset_url:
        names = ", ".join(s.name for s in split.val)
        print(f"  training dataset: {split.dataset_url}  (spec: dataset.url {split.dataset_url}, "
              f"dataset.validation.names [{names}])")
    print(f"  description: {out}/synth.json")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gigaseg", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a job spec (exit 0 ok, 2 bad spec)")
    v.add_argument("spec")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    v.add_argument("--echo", action="store_true", help="print the spec with defaults filled in")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run a job spec (exit 0 all ok, 1 some image failed, 2 bad spec)")
    r.add_argument("spec")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set resources.workers=4 (repeatable)")
    r.add_argument("--audit-writes", metavar="DIR", default=None,
                   help="log every chunk key each worker writes under DIR (to check single-writer chunks)")
    r.add_argument("--force", action="store_true",
                   help="take the output over from another driver's lease at once (only when that driver is dead)")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="what is done, what failed, what is left in an output")
    s.add_argument("output")
    s.add_argument("--storage-options", default=None, help="fsspec storage options as JSON")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    i = sub.add_parser("inspect", help="print a model's card (classes, bands, normalisation, output) and check it "
                       "against the model (exit 0 ok, 2 it does not fit)")
    i.add_argument("model", help="a gigaseg checkpoint, an ONNX model, a torch.export archive, or factory weights")
    i.add_argument("--factory", default=None, metavar="PKG.MODULE:FN", help="the module the weights are for")
    i.add_argument("--tile", type=int, default=512, help="tile side to check the model with (default %(default)s)")
    i.add_argument("--storage-options", default=None, help="fsspec storage options as JSON")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("export", help="write a gigaseg segmenter checkpoint as an ONNX model with its card in the "
                       "metadata (exit 0 ok, 2 it cannot be exported)")
    x.add_argument("model", help="a gigaseg segmenter checkpoint (.safetensors)")
    x.add_argument("out", help="the ONNX file to write (.onnx)")
    x.add_argument("--opset", type=int, default=18, help="ONNX operator set (default %(default)s)")
    x.add_argument("--storage-options", default=None, help="fsspec storage options as JSON")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="generate a small archive and run the main job on it")
    d.add_argument("--output", default="demo-output", help="directory for the archive, spec and masks")
    d.add_argument("--large", type=int, default=8192, help="side of the largest demo image (default 8192; > 1024)")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("synth", help="write a seeded synthetic land-cover archive with ground truth and a "
                       "training dataset (exit 0 ok, 2 bad arguments)")
    g.add_argument("output", help="folder (URL) to write")
    g.add_argument("--size", default="2448", metavar="N|HxW", help="image size in px (default %(default)s)")
    g.add_argument("--train", type=int, default=4, help="training images (default %(default)s)")
    g.add_argument("--val", type=int, default=1, help="validation images, from other seeds (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="base seed; each image's seed is derived from it")
    g.add_argument("--chunk", type=int, default=512, help="Zarr/dask chunk side in px (default %(default)s)")
    g.add_argument("--region-size", type=int, default=2048,
                   help="grid of the land-cover regions in px: the context scale (default %(default)s)")
    g.add_argument("--png", action="store_true", help="also write PNG copies (sides up to 8192 px)")
    g.add_argument("--no-dataset", action="store_true", help="write images and masks only, no training dataset")
    g.add_argument("--storage-options", default=None, help="fsspec storage options of the output as JSON")
    g.set_defaults(func=cmd_synth)

    from jobs.eval_cli import add_eval_parser
    from jobs.export_cli import add_export_parser
    from jobs.import_checkpoint import add_parser as add_import_checkpoint_parser
    from jobs.submit import add_submit_parsers
    from jobs.train.cli import add_import_parser, add_train_parser

    add_train_parser(sub)
    add_import_parser(sub)
    add_import_checkpoint_parser(sub)
    add_eval_parser(sub)
    add_export_parser(sub)
    add_submit_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.debug)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:  # the last line of defence: one line, traceback only with --debug
        if args.debug:
            raise
        error(f"{type(err).__name__}: {err}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
