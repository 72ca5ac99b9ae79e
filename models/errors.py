"""The root of gigaseg's error hierarchy, at the lowest layer that raises errors (``models/`` imports nothing
from ``pipeline/`` or ``jobs/``; the data path's errors in ``pipeline.errors`` derive from ``GigasegError``).

Each class is also a builtin (``ValueError``, ``FileNotFoundError``, …) so callers that know nothing of
gigaseg still catch it sensibly, as zarr-python's ``errors.py`` does. Messages say what is wrong, where (url,
array, window, field), why it matters and how to fix it.
"""

from __future__ import annotations


class GigasegError(Exception):
    """Base class of every error gigaseg raises on purpose."""


class CheckpointError(GigasegError, ValueError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""
