"""report.json and ``gigaseg status``: what is done, what failed, what is left."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict
from typing import Any

from pipeline.conditional import read_versioned
from pipeline.engine import ImageResult
from pipeline.output.layout import PLAN_NAME, WORK_DIR, JobLayout
from pipeline.output.lease import Holder
from pipeline.output.state import blocks_done, read_state
from pipeline.redact import redact
from pipeline.storage import read_json, write_bytes, write_json

log = logging.getLogger(__name__)


def image_entry(r: ImageResult) -> dict[str, Any]:
    d = asdict(r)
    d["shape"] = list(r.shape) if r.shape else None
    d["seconds"] = round(r.seconds, 3)
    d["megapixels_per_s"] = round(r.megapixels_per_s, 4)
    return d


def totals(results: list[ImageResult], planned: int, job_retries: int = 0) -> dict[str, Any]:
    """Counts over the images; ``retries`` adds the job's own (``job_retries``: its report, plan, lease, weights)."""
    count = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped")}
    run_mp = sum(r.tiles_run for r in results)
    return {
        "images": planned,
        **count,
        "not_run": planned - len(results),
        "tiles": sum(r.tiles for r in results),
        "tiles_run": run_mp,
        "tiles_retried": sum(r.tiles_retried for r in results),
        "retries": sum(r.retries for r in results) + job_retries,
        "seconds": round(sum(r.seconds for r in results), 3),
    }


class Report:
    """Keeps report.json current after every image, so a killed driver leaves a truthful report. What it writes is
    redacted (``pipeline.redact``): no credential or presigned-URL signature reaches the file."""

    def __init__(self, output_url: str, storage_options: dict[str, Any], names: list[str], spec_echo: dict):
        layout = JobLayout(output_url, storage_options)
        self.url = layout.report_url
        self.storage_options = storage_options
        self.names = names
        self.spec = spec_echo
        self.results: list[ImageResult] = []
        self.cluster: dict[str, Any] = {}  # where the work ran: "workers" (each actor), "dask" (the blend)
        self.job_retries = 0  # storage retries of no image (report, plan, lease, weights)
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(layout.plan_url, {"images": names}, storage_options)

    def add(self, result: ImageResult) -> None:
        self.results.append(result)
        self.write()

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": [image_entry(r) for r in self.results],
            "totals": totals(self.results, len(self.names), self.job_retries),
            "started": self.started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            **self.cluster,
            "spec": self.spec,
        }

    def set_cluster(self, **sections: Any) -> None:
        self.cluster.update(sections)
        self.write()

    def write(self) -> None:
        """Rewrite report.json; a store that refuses it (bucket gone, disk full) is logged, never raised: the
        images' own results decide the job's outcome, and the next write may succeed."""
        try:
            write_bytes(self.url, redact(json.dumps(self.as_dict(), indent=2)).encode(), self.storage_options)
        except OSError as err:
            log.error("could not write the report: %s", err)


def status(output_url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Done, failed and left, from the output itself (valid while a job runs or after it was killed), and the
    driver writing it now (``lease``: None when none holds it). Tiles
    done count the tiles of every stage's blocks done, as ``tiles`` counts every stage's tiles (MagNet runs one
    stage per scale)."""
    layout = JobLayout(output_url, storage_options)
    plan = read_json(layout.plan_url, storage_options)
    report = read_json(layout.report_url, storage_options) or {"images": []}
    lease = read_versioned(layout.lease_url, storage_options)
    if plan is None and not report["images"] and lease is None:
        raise FileNotFoundError(
            f"{output_url} holds no gigaseg output (no report.json or {WORK_DIR}/{PLAN_NAME}); "
            "check the path, or run a job with output.url set to it"
        )
    names = plan["images"] if plan else [e["name"] for e in report["images"]]
    reported = {e["name"]: e for e in report["images"]}
    rows = []
    for name in names:
        out = layout.image(name)
        state = read_state(out) or {}
        entry = reported.get(name, {})
        if state.get("complete"):
            st = "done"
        elif entry.get("status") == "failed":
            st = "failed"
        else:
            st = "in progress" if state else "left"
        total = int(state.get("tiles", 0))
        done = total if st == "done" else sum(int(b.get("owned", 0)) for s in out.stages_started()
                                                  for b in blocks_done(out, s).values())
        error = entry.get("error")
        rows.append({"name": name, "status": st, "tiles_done": done, "tiles": total,
                     "error": redact(error) if error else error})
    holder = Holder.parse(lease[0]) if lease else None
    return {"images": rows, "counts": {s: sum(r["status"] == s for r in rows)
                                       for s in ("done", "failed", "in progress", "left")},
            "lease": None if holder is None else holder.describe() + (f" (stale: {why})" if (why := holder.stale())
                                                                      else "")}
