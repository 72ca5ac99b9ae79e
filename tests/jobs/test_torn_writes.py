"""Torn writes: a job killed (SIGKILL) in the middle of writing a weights copy, a mask chunk, a block marker, the
report or the completion mark leaves nothing a rerun takes for finished work. Each run resumes the last one's
output and is killed at the next point (``tests/jobs/torn_run.py``: half the bytes written, then the kill); the
run that finishes gives masks bit-identical to a run never killed, the damaged pieces recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.output.layout import image_output
from pipeline.output.state import blocks_done
from pipeline.synth.land_cover import land_cover
from tests.archive import spec_dict
from tests.jobs.torn_run import run, run_in_child

pytestmark = pytest.mark.integration

#: (what is written, path pattern of its temp file, the n-th such write, bytes it holds), in the order a job
#: writes them. Zarr's LocalStore writes ``<key>.<uuid>.partial`` then renames it, ``write_bytes`` ``.<name>.*.tmp``.
KILLS = [
    ("a weights copy", r"_work/\.model-", 1, None),
    ("a mask chunk", r"a\.zarr/labels/segmentation/0/c/", 2, None),
    ("a block marker", r"_work/a/stage-0/blocks/", 1, None),
    ("the report", r"/\.report\.json\.", 1, None),
    ("the completion mark", r"b\.zarr/zarr\.[0-9a-f]+\.partial$", 1, '"complete": true'),
]


def _spec(inputs: Path, output: Path) -> dict:
    # 128 px mask chunks, one chunk a block: blocks finish (and are marked) one by one
    return spec_dict(str(inputs), str(output), output__extras=["confidence"], tiling__chunk=128,
                     tiling__tiles_per_call=1, resources__workers=1)


def _arrays(output: Path) -> list[Path]:
    """The Zarr arrays under ``output`` (relative paths)."""
    return sorted(p.parent.relative_to(output) for p in output.rglob("zarr.json")
                  if json.loads(p.read_bytes()).get("node_type") == "array")


def _whole(output: Path) -> None:
    """Everything under its final name is whole: JSON parses, every array decodes."""
    for path in output.rglob("*.json"):
        if not path.name.startswith("."):
            json.loads(path.read_bytes())
    for path in _arrays(output):
        zarr.open_array(str(output / path), mode="r")[:]


def test_kills_mid_write_leave_nothing_a_rerun_takes_for_finished(tmp_path):
    (tmp_path / "in").mkdir()
    for i, (name, shape) in enumerate({"a": (320, 384), "b": (256, 256)}.items()):
        arr = zarr.create_array(store=str(tmp_path / "in" / f"{name}.zarr"), shape=(*shape, 3), chunks=(128, 128, 3),
                                dtype="uint8")
        arr[:] = land_cover(0, 0, *shape, seed=40 + i)
    clean = run(_spec(tmp_path / "in", tmp_path / "clean"))
    assert [r.status for r in clean] == ["ok", "ok"]

    out = tmp_path / "out"
    spec = _spec(tmp_path / "in", out)
    total_blocks = 3 * 3  # a: 320 × 384 in 128 px chunks
    for what, pattern, n, content in KILLS:
        code, _ = run_in_child(spec, (pattern, n, content))
        assert code == -9, f"not killed while writing {what} (exit code {code})"
        _whole(out)
        if what == "a mask chunk":  # its block was never marked done: the rerun computes it again
            assert len(blocks_done(image_output(str(out), "a", {}), 0)) < total_blocks
            assert list((out / "a.zarr" / "labels" / "segmentation" / "0" / "c").rglob("*.partial")), \
                "the kill landed in a chunk's temp file"
        if what == "the completion mark":
            assert zarr.open_group(str(out / "b.zarr"), mode="r").attrs["gigaseg"]["complete"] is False

    code, final = run_in_child(spec)
    assert code == 0
    assert [(r["name"], r["status"]) for r in final] == [("a", "skipped"), ("b", "ok")], [r["error"] for r in final]
    arrays = _arrays(tmp_path / "clean")
    assert len(arrays) >= 5 and _arrays(out) == arrays
    for path in arrays:
        got = zarr.open_array(str(out / path), mode="r")[:]
        want = zarr.open_array(str(tmp_path / "clean" / path), mode="r")[:]
        assert np.array_equal(got, want), f"{path} differs from a run never killed"
    assert json.loads((out / "report.json").read_bytes())["totals"]["ok"] == 1  # this run's: b (a was skipped)
