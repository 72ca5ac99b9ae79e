"""What every ``gigaseg`` command prints and returns: exit codes, one line per problem, tables.

The one rule for exit codes, whatever the command:

- ``EXIT_OK`` (0): everything asked for was done (or was already done).
- ``EXIT_FAILED`` (1): the command ran, and something in it failed (an image, a training run, a job).
- ``EXIT_USAGE`` (2): the command could not run as asked: a bad spec, argument, path, checkpoint, or an output
  it may not touch (``exit_code`` maps an exception to 0/1/2).

Problems are printed as ``error: <where>: <what>`` lines on stderr, one per problem, never a traceback
(``--debug`` re-raises instead).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from pipeline.errors import OutputUnwritableError, SpecError
from pipeline.redact import redact

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Exceptions that mean the command could not run as asked (an input that is not there, an output holding
#: something else or held by another driver, an output that cannot be written, a value the command cannot take:
#: ``CheckpointError`` and ``SpecError`` are ValueErrors).
USAGE_ERRORS: tuple[type[BaseException], ...] = (SpecError, FileNotFoundError, FileExistsError, ValueError,
                                                 OutputUnwritableError)


def exit_code(err: BaseException) -> int:
    """``EXIT_USAGE`` for ``USAGE_ERRORS``, ``EXIT_FAILED`` for anything else that went wrong."""
    return EXIT_USAGE if isinstance(err, USAGE_ERRORS) else EXIT_FAILED


def error(message: str) -> None:
    """One problem line on stderr (only its first line: a message never spills a traceback), redacted
    (``pipeline.redact``: no credential or presigned-URL signature is printed)."""
    print(redact(f"error: {message}".splitlines()[0]), file=sys.stderr)


def warning(message: str) -> None:
    print(redact(f"warning: {message}".splitlines()[0]), file=sys.stderr)


def print_problems(err: SpecError) -> None:
    """Each of a ``SpecError``'s problems on its own line, prefixed by the spec it came from."""
    for line in err.problems:
        error(line if line.startswith(err.source) else f"{err.source}: {line}")


def report_error(err: BaseException, debug: bool = False) -> int:
    """Print ``err`` as problem lines (a ``SpecError``'s each on its own) and return its exit code; with
    ``debug`` re-raise it so the traceback shows."""
    if debug:
        raise err
    if isinstance(err, SpecError):
        print_problems(err)
    else:
        error(str(err))
    return exit_code(err)


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]], stream=None) -> None:
    """Columns padded to their widest cell; the last column is left unpadded (it may be long)."""
    rows = [tuple(header), *(tuple(redact(c) for c in r) for r in rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1], file=stream or sys.stdout)


def print_results(results) -> None:
    """The per-image table of ``gigaseg run`` and ``gigaseg demo`` (``pipeline.engine.ImageResult`` rows)."""
    print_table(("image", "status", "shape", "tiles", "seconds", "MP/s", "error"), (
        (r.name, r.status, "×".join(map(str, r.shape)) if r.shape else "-", str(r.tiles), f"{r.seconds:.1f}",
         f"{r.megapixels_per_s:.2f}", (r.error or "")[:100]) for r in results))


__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "error", "exit_code", "print_problems", "print_results",
           "print_table", "report_error", "warning"]
