"""The per-image state that makes runs resumable: ``attrs["gigaseg"]`` of each image group.

It holds the run fingerprint (the model and tiling that produced the output) and ``complete``, set last, so an
interrupted image is recognised and resumed and a finished one skipped (paths: ``pipeline.output.layout``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import zarr

from pipeline.errors import OutputConflictError
from pipeline.output.layout import ImageOutput
from pipeline.storage import open_group, remove, zarr_store

log = logging.getLogger(__name__)


def fingerprint(**parts: Any) -> str:
    """A short stable hash of everything that determines an image's output."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_state(out: ImageOutput) -> dict[str, Any] | None:
    """``attrs["gigaseg"]`` of the image group, or None when the group does not exist yet."""
    try:
        group = open_group(out.group_url, out.storage_options, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None
    return dict(group.attrs.get("gigaseg", {}))


def check_resumable(out: ImageOutput, run_fingerprint: str, if_exists: str) -> str:
    """Decide what to do with an image's existing output: ``"new"``, ``"resume"`` or ``"complete"``.

    ``overwrite`` removes the image group and its work area; ``resume`` refuses output written by a
    different model or tiling, since mixing them would silently corrupt the mask.
    """
    if if_exists == "overwrite":
        remove(out.group_url, out.storage_options)
        remove(out.work_url, out.storage_options)
        return "new"
    state = read_state(out)
    if state is None or "fingerprint" not in state:
        return "new" if state is None else "resume"
    if state["fingerprint"] != run_fingerprint:
        raise OutputConflictError(
            f"{out.group_url} was written by a different model or tiling (fingerprint {state['fingerprint']}, "
            f"this run {run_fingerprint}); resuming would mix two results. Set output.if_exists=overwrite "
            "to replace it, or choose another output.url"
        )
    return "complete" if state.get("complete") else "resume"


def mark(out: ImageOutput, **values: Any) -> None:
    """Merge ``values`` into the image group's ``attrs["gigaseg"]`` (creating the group if needed)."""
    group = zarr.open_group(store=zarr_store(out.group_url, out.storage_options), mode="a")
    state = dict(group.attrs.get("gigaseg", {}))
    state.update(values)
    group.attrs["gigaseg"] = state


def safe_remove_work(out: ImageOutput) -> None:
    try:
        remove(out.work_url, out.storage_options)
    except OSError as err:  # leftover scratch space is harmless; say so and go on
        log.warning("could not remove work area %s: %s", out.work_url, err)


__all__ = ["check_resumable", "fingerprint", "mark", "read_state", "safe_remove_work"]
