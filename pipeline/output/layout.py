"""The output layout users rely on: every path a job writes, named in this one module.

    <output>/report.json                       per-image status, totals, cluster, spec (``jobs.report``)
    <output>/<name>.zarr/                      OME-Zarr (NGFF 0.5) image group, one per input image
        0, 1, …                                image pyramid (3, H_l, W_l) uint8 — absent when the
                                               source OME-Zarr was used in place (attrs name it)
        labels/<label>/0, 1, …                 class ids (H_l, W_l), same levels as the image
        confidence                             optional: max blended probability (H, W) float32
        probabilities                          optional: blended probabilities (C, H, W) float16
    <output>/_work/plan.json                   the images of the job, in order (``gigaseg status``)
    <output>/_work/lease.json                  the driver writing this output now (``pipeline.output.lease``)
    <output>/_work/<kind>-<sha256[:16]>.safetensors   the weights the workers load (copied once per content)
    <output>/_work/<name>/stage-<s>/blocks/<by>-<bx>.json   a block of stage s done (its chunks written)
    <output>/_work/<name>/stage-<s>/done.json  stage s done (its result stored)
    <output>/_work/<name>/stage-<s>/maps/…     a stage's map (and MagNet's intermediate maps) for the next
    (``_work/<name>`` is removed once the image is complete)

``<name>`` is the image's name (``pipeline.sources.discover``). The per-image state (fingerprint, ``complete``)
is in ``pipeline.output.state``; the arrays are created by ``pipeline.output.arrays``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import filesystem, fs_path, join

WORK_DIR = "_work"
REPORT_NAME = "report.json"
PLAN_NAME = "plan.json"
LEASE_NAME = "lease.json"
_STAGE = re.compile(r"^stage-(\d+)$")


@dataclass(frozen=True)
class JobLayout:
    """The paths of one job's output root ``url``."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def report_url(self) -> str:
        return join(self.url, REPORT_NAME)

    @property
    def work_url(self) -> str:
        return join(self.url, WORK_DIR)

    @property
    def plan_url(self) -> str:
        return join(self.work_url, PLAN_NAME)

    @property
    def lease_url(self) -> str:
        return join(self.work_url, LEASE_NAME)

    def weights_url(self, kind: str, sha256: str) -> str:
        """Where the workers' copy of a weights file lives: one per content (``kind``: model, refiner, …)."""
        return join(self.work_url, f"{kind}-{sha256[:16]}.safetensors")

    def image(self, name: str) -> ImageOutput:
        return ImageOutput(name, join(self.url, f"{name}.zarr"), join(self.work_url, name),
                           dict(self.storage_options))


@dataclass(frozen=True)
class ImageOutput:
    """The paths of one image's output: its OME-Zarr group and its work area."""

    name: str
    group_url: str
    work_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def stage_url(self, stage: int) -> str:
        return join(self.work_url, f"stage-{stage}")

    def blocks_url(self, stage: int) -> str:
        """Where stage ``stage`` marks its blocks done, one small file each."""
        return join(self.stage_url(stage), "blocks")

    def block_url(self, stage: int, block: str) -> str:
        return join(self.blocks_url(stage), f"{block}.json")

    def stage_done_url(self, stage: int) -> str:
        return join(self.stage_url(stage), "done.json")

    def maps_url(self, stage: int) -> str:
        """The group of stage ``stage``'s maps: ``map`` (what the next stage reads) and MagNet's intermediates."""
        return join(self.stage_url(stage), "maps")

    def stages_started(self) -> list[int]:
        """The stages that have a work directory (listed, not inferred: valid while a job runs or after a kill)."""
        fs = filesystem(self.work_url, self.storage_options)
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(fs_path(self.work_url), detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _STAGE.match(n)))


def image_output(output_url: str, name: str, storage_options: dict[str, Any]) -> ImageOutput:
    """``JobLayout(output_url, storage_options).image(name)``."""
    return JobLayout(output_url, dict(storage_options)).image(name)


__all__ = ["LEASE_NAME", "PLAN_NAME", "REPORT_NAME", "WORK_DIR", "ImageOutput", "JobLayout", "image_output"]
