"""``gigaseg import-checkpoint --from {magnet,fctl,torchvision-resnet} SRC... OUT``: a reference implementation's
published weights as gigaseg checkpoints (``models.reference``).

- ``--from magnet SEGMENTER [REFINER ...] OUT``: OUT is a folder: ``segmenter.safetensors`` (``model.checkpoint``,
  ``magnet_fpn_resnet50``) and ``refiner.safetensors`` (``model.magnet.refiner``), or ``refiner-1…n`` for one per
  refinement stage (Cityscapes). Refiners alone are accepted (the Cityscapes HRNet segmenter is not).
- ``--from fctl FILE... OUT``: OUT is one checkpoint: the local FCN-8s (mode-1 file), a one-context FCtL (mode-2
  file) or the fused FCtL (the mode-3 file, then its medium and large context files); ``--contexts`` the factors
  (default the reference scripts': 2 and 3).
- ``--from torchvision-resnet FILE OUT``: OUT is an encoder checkpoint for ``model.init`` of a training spec.

Classes: ``--palette NAME`` or ``--class NAME[:R,G,B]`` (repeated, in id order); without either, the published
checkpoints' datasets: 7 classes → DeepGlobe's palette, 2 → Inria's (background, building). Exit codes as every
command: 0 written, 2 a file not found or not recognised (one line naming the unexpected and missing keys).
"""

from __future__ import annotations

import json

from jobs.console import EXIT_OK, EXIT_USAGE, error, report_error
from models.errors import GigasegError
from models.reference import SOURCES
from models.reference.imports import IMPORTERS, Imported
from pipeline.evaluation.palette import get_palette
from pipeline.storage import join, read_bytes, write_bytes

#: The class tables of the published checkpoints' datasets, by class count.
DEFAULT_CLASSES = {
    7: ("deepglobe", list(get_palette("deepglobe"))),
    2: ("inria", [("background", (0, 0, 0)), ("building", (255, 255, 255))]),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "import-checkpoint", help="convert a reference implementation's published weights (MagNet, FCtL, "
        "torchvision ResNets) into gigaseg checkpoints (exit 0 ok, 2 not recognised)")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="whose checkpoint format")
    p.add_argument("paths", nargs="+", metavar="PATH", help="the reference's file(s), in order, then OUT")
    p.add_argument("--palette", default=None, help="named class table, e.g. deepglobe")
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME[:R,G,B]",
                   help="a class, in id order (repeatable)")
    p.add_argument("--contexts", type=_factors, default=None, metavar="F[,F]",
                   help="fctl: the context factors, e.g. 2,3 (one for a one-context model, two for the fused one; "
                        "default: the reference scripts' 2 and 3)")
    p.add_argument("--storage-options", default=None, help="fsspec options of the files, as JSON")
    p.set_defaults(func=cmd_import_checkpoint)


def _factors(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--contexts {text!r}: factors separated by commas, e.g. 2,3") from None


def class_table(palette: str | None, given: list[str]):
    """``classes(n)`` for the importers: the named palette, the ``--class`` list, or the default for ``n``."""
    if palette and given:
        raise ValueError("give --palette or --class, not both")
    table = None
    if palette:
        table = list(get_palette(palette))
    elif given:
        table = []
        for item in given:
            name, _, rgb = item.partition(":")
            color = tuple(int(v) for v in rgb.split(",")) if rgb else None
            if color is not None and len(color) != 3:
                raise ValueError(f"--class {item!r}: the colour must be R,G,B")
            table.append((name, color))

    def classes(n: int):
        chosen = table
        if chosen is None:
            if n not in DEFAULT_CLASSES:
                raise ValueError(f"the weights predict {n} classes: name them with --class NAME[:R,G,B] (repeated, in "
                                 "id order) or --palette")
            chosen = DEFAULT_CLASSES[n][1]
        if len(chosen) != n:
            raise ValueError(f"the weights predict {n} classes but {len(chosen)} are named "
                             f"({', '.join(c[0] for c in chosen)}); name {n}")
        colors = [c[1] for c in chosen]
        return [c[0] for c in chosen], None if any(c is None for c in colors) else colors

    return classes


def cmd_import_checkpoint(args) -> int:
    debug = getattr(args, "debug", False)
    if len(args.paths) < 2:
        error("import-checkpoint: give the reference's file(s) and then OUT")
        return EXIT_USAGE
    *srcs, out = args.paths
    options = json.loads(args.storage_options) if args.storage_options else {}
    try:
        sources = [(src, read_bytes(src, options)) for src in srcs]
        classes = class_table(args.palette, args.classes)
        if args.source == "fctl":
            imported = IMPORTERS["fctl"](sources, classes, args.contexts)
        elif args.source == "magnet":
            imported = IMPORTERS["magnet"](sources, classes)
        else:
            imported = IMPORTERS[args.source](sources)
        targets = _targets(args.source, imported, out)
        for name, url in targets.items():
            write_bytes(url, imported.files[name], options)
    except (GigasegError, ValueError, FileNotFoundError) as err:
        return report_error(err, debug)
    _report(args.source, imported, targets)
    return EXIT_OK


def _targets(source: str, imported: Imported, out: str) -> dict[str, str]:
    """Where each file goes: a MagNet import fills the folder OUT; the others are the one file OUT."""
    if source == "magnet":
        return {name: join(out, name) for name in imported.files}
    (name,) = imported.files
    return {name: out}


def _report(source: str, imported: Imported, targets: dict[str, str]) -> None:
    for keys in imported.records:
        reasons: dict[str, int] = {}
        for why in keys.ignored.values():
            reasons[why] = reasons.get(why, 0) + 1
        print(f"{keys.where}: {len(keys.taken)} tensors converted")
        for why, n in reasons.items():
            print(f"  {n} set aside: {why}")
    for name, url in targets.items():
        print(f"wrote {url} ({imported.kinds[name]})")
    for note in imported.notes:
        print(f"note: {note}")
    kinds = {imported.kinds[n]: u for n, u in targets.items()}
    if source == "magnet":
        refiners = [u for n, u in targets.items() if imported.kinds[n] == "refiner"]
        lines = ["model:"]
        if "segmenter" in kinds:
            lines.append(f"  checkpoint: {kinds['segmenter']}")
        lines += ["  framework: magnet", "  magnet:"]
        if refiners:
            ref = refiners[0] if len(refiners) == 1 else "[" + ", ".join(refiners) + "]"
            lines.append(f"    refiner: {ref}")
        lines.append("    procedure: reference     # the reference's test procedure (README: Reference checkpoints)")
        print("use it in a job spec:\n" + "\n".join(lines))
    elif "fctl" in kinds:
        print(f"use it in a job spec:\nmodel:\n  checkpoint: {kinds['fctl']}\n  framework: fctl\n  fctl:\n"
              "    procedure: reference     # test-time flips and rotations, as the reference's test")
    elif "segmenter" in kinds:
        print(f"use it in a job spec: model.checkpoint: {kinds['segmenter']}")
    else:
        print(f"use it in a training spec: model.init: {kinds['encoder']}")


__all__ = ["DEFAULT_CLASSES", "add_parser", "class_table", "cmd_import_checkpoint"]
