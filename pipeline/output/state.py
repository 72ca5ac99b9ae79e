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
from pipeline.storage import filesystem, fs_path, open_group, read_json, remove, write_json, zarr_store

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


def mark_block(out: ImageOutput, stage: int, block, **info: Any) -> None:
    """Block ``block`` of stage ``stage`` is done: every chunk it owns is written (called after its writes)."""
    write_json(out.block_url(stage, block.name), info, out.storage_options)


def blocks_done(out: ImageOutput, stage: int) -> dict[str, dict[str, Any]]:
    """The blocks of stage ``stage`` marked done, by name, with what their markers say (one listing)."""
    fs = filesystem(out.blocks_url(stage), out.storage_options)
    try:
        paths = fs.ls(fs_path(out.blocks_url(stage)), detail=False)
    except FileNotFoundError:
        return {}
    done = {}
    for path in paths:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".json") and not name.startswith("."):
            info = read_json(out.block_url(stage, name[:-5]), out.storage_options)
            if info is not None:
                done[name[:-5]] = info
    return done


def mark_stage(out: ImageOutput, stage: int) -> None:
    write_json(out.stage_done_url(stage), {"done": True}, out.storage_options)


def stage_done(out: ImageOutput, stage: int) -> bool:
    return bool((read_json(out.stage_done_url(stage), out.storage_options) or {}).get("done"))


__all__ = ["blocks_done", "check_resumable", "fingerprint", "mark", "mark_block", "mark_stage", "read_state",
           "safe_remove_work", "stage_done"]
