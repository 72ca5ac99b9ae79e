"""One error hierarchy for the data path.

Each class is also a builtin (``ValueError``, ``FileNotFoundError``, ``RuntimeError``) so callers that
know nothing of gigaseg still catch it sensibly. Messages say what is wrong, where (url, array, window,
field), why it matters and how to fix it.
"""

from __future__ import annotations


class GigasegError(Exception):
    """Base class of every error gigaseg raises on purpose."""


class InputNotFoundError(GigasegError, FileNotFoundError):
    """An input URL, bucket or prefix does not exist or matched no image."""


class UnsupportedImageError(GigasegError, ValueError):
    """An image exists but its format, dtype, axes or channel count cannot be converted to RGB."""


class ImageReadError(GigasegError, OSError):
    """An image could not be read or decoded (corrupt file, truncated chunk, permission)."""


class OutputConflictError(GigasegError, FileExistsError):
    """The output already holds results that the current spec cannot resume."""


class CheckpointError(GigasegError, ValueError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


class TileFailedError(GigasegError, RuntimeError):
    """A tile failed on every retry; the image it belongs to is reported as failed."""
