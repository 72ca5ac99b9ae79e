"""``gigaseg`` command line: validate, run, status, demo, train, import-pairs, eval, submit, logs, job-status.

Exit codes: 0 every image succeeded (or was already done), 1 some image failed, 2 the spec or the
command line is wrong. Problems print one line each; ``--debug`` adds tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.spec import SpecError, load_spec

log = logging.getLogger("gigaseg")

EXIT_OK, EXIT_FAILED, EXIT_SPEC = 0, 1, 2


def _setup_logging(debug: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "distributed", "botocore", "s3fs", "aiobotocore", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.INFO)


def _print_problems(err: SpecError) -> None:
    for line in err.problems:
        print(f"error: {err.source}: {line}" if not line.startswith(err.source) else f"error: {line}", file=sys.stderr)


def cmd_validate(args) -> int:
    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as err:
        _print_problems(err)
        return EXIT_SPEC
    print(f"{args.spec}: ok")
    if args.echo:
        print(spec.echo(), end="")
    return EXIT_OK


def print_table(results) -> None:
    rows = [("image", "status", "shape", "tiles", "seconds", "MP/s", "error")]
    for r in results:
        shape = "×".join(map(str, r.shape)) if r.shape else "-"
        rows.append((r.name, r.status, shape, str(r.tiles), f"{r.seconds:.1f}",
                     f"{r.megapixels_per_s:.2f}", (r.error or "")[:100]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


def cmd_run(args) -> int:
    from jobs.runner import run_spec
    from pipeline.errors import GigasegError

    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as err:
        _print_problems(err)
        return EXIT_SPEC
    try:
        results = run_spec(spec, audit_dir=args.audit_writes)
    except SpecError as err:
        _print_problems(err)
        return EXIT_SPEC
    except GigasegError as err:
        print(f"error: {err}", file=sys.stderr)
        if args.debug:
            raise
        return EXIT_SPEC if isinstance(err, FileNotFoundError) else EXIT_FAILED
    print_table(results)
    print(f"masks: {spec.output.url}/<name>.zarr/labels/{spec.output.label_name}  report: {spec.output.url}/report.json")
    return EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK


def cmd_status(args) -> int:
    from jobs.report import status

    options = json.loads(args.storage_options) if args.storage_options else {}
    try:
        st = status(args.output, options)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SPEC
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        for row in st["images"]:
            extra = f"  {row['error']}" if row["error"] else ""
            print(f"{row['name']:<32} {row['status']:<12} {row['tiles_done']}/{row['tiles']} tiles{extra}")
        c = st["counts"]
        print(f"done {c['done']}, failed {c['failed']}, in progress {c['in progress']}, left {c['left']}")
    return EXIT_FAILED if st["counts"]["failed"] else EXIT_OK


def cmd_demo(args) -> int:
    from jobs.demo import run_demo

    return run_demo(args.output, large=args.large)


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
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="what is done, what failed, what is left in an output")
    s.add_argument("output")
    s.add_argument("--storage-options", default=None, help="fsspec storage options as JSON")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    d = sub.add_parser("demo", help="generate a small archive and run the main job on it")
    d.add_argument("--output", default="demo-output", help="directory for the archive, spec and masks")
    d.add_argument("--large", type=int, default=8192, help="side of the largest demo image (default 8192)")
    d.set_defaults(func=cmd_demo)

    from jobs.evaluate import add_eval_parser
    from jobs.submit import add_submit_parsers
    from jobs.train import add_import_parser, add_train_parser

    add_train_parser(sub)
    add_import_parser(sub)
    add_eval_parser(sub)
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
        print(f"error: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
