"""The data path's errors: inputs, images, outputs. They derive from ``models.errors.GigasegError``, the root
of the hierarchy, which lives with the lowest layer that raises errors (``CheckpointError`` lives there too).

Each class is also a builtin (``ValueError``, ``FileNotFoundError``, ``OSError``) so callers that know nothing
of gigaseg still catch it sensibly. Messages say what is wrong, where (url, array, window, field), why it
matters and how to fix it.
"""

from __future__ import annotations

from models.errors import GigasegError


class InputNotFoundError(GigasegError, FileNotFoundError):
    """An input URL, bucket or prefix does not exist or matched no image."""


class UnsupportedImageError(GigasegError, ValueError):
    """An image exists but its format, dtype, axes or channel count cannot be converted to RGB."""


class ImageReadError(GigasegError, OSError):
    """An image could not be read or decoded (corrupt file, truncated chunk, permission)."""


class OutputConflictError(GigasegError, FileExistsError):
    """The output already holds results that the current spec cannot resume."""


class SpecError(GigasegError, ValueError):
    """A spec that cannot run; ``problems`` holds one ``"field.path: message"`` line per problem. Raised where the
    problem is found: validating the YAML (``jobs.spec``), or planning the job against its inputs and weights
    (``jobs.plan``, the frameworks in ``pipeline.frameworks``)."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class MissingDependencyError(GigasegError, ImportError):
    """An optional dependency is needed for this input or output (a GeoTIFF, a whole-slide image, an export) and
    is not installed; the message names the extra that installs it (``pip install 'gigaseg[geo]'``)."""


class StorageError(GigasegError, OSError):
    """A store (a bucket, a disk) refused a read or a write, or kept failing after every retry. The message names
    the URL and the cause: a bucket that is gone, access denied, a disk full or read-only. Never a
    ``FileNotFoundError``: a reader must not take a bucket that is gone for a chunk never written."""


class LeaseHeldError(GigasegError, FileExistsError):
    """Another live driver holds the output (``pipeline.output.lease``); the message names it."""


class LeaseLostError(GigasegError, RuntimeError):
    """Another driver took this driver's output over while it ran (``gigaseg run --force`` elsewhere)."""


class OutputUnwritableError(GigasegError, PermissionError):
    """The output cannot be written at all (read-only, full, access denied, bucket gone): the job stops before any
    work, naming the URL and the cause."""
