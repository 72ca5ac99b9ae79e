"""A local output that cannot be written: read-only stops the job before any work; a disk that fills up fails the
image being written, with the file and the cause, and leaves the finished image whole and marked complete.

The disks are real: a size-limited tmpfs (full: ENOSPC) or a read-only one mounted on the test's output
directory, where this process may mount (root with CAP_SYS_ADMIN, as on the CI machine); without that, the
read-only case uses ``chmod`` (real for a user that is not root) and the full-disk case is skipped."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import zarr

from jobs.runner import run_spec
from jobs.spec import parse_spec
from pipeline.errors import OutputUnwritableError
from pipeline.synth.land_cover import land_cover
from tests.archive import spec_dict

pytestmark = pytest.mark.integration


def _mount(path, options: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "gigaseg-test", str(path)], capture_output=True,
                          check=False)
    return done.returncode == 0


@pytest.fixture
def mounts():
    """Mount tmpfs on paths (``mount(path, options) -> bool``); all unmounted at the end."""
    mounted = []

    def mount(path, options: str) -> bool:
        ok = _mount(path, options)
        if ok:
            mounted.append(path)
        return ok

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _inputs(root, sizes: dict[str, int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, side) in enumerate(sizes.items()):
        arr = zarr.create_array(store=str(root / f"{name}.zarr"), shape=(side, side, 3), chunks=(256, 256, 3),
                                dtype="uint8")
        arr[:] = land_cover(0, 0, side, side, seed=30 + i)


def test_a_read_only_output_stops_the_job_before_any_work(tmp_path, mounts):
    _inputs(tmp_path / "in", {"a": 128})
    out = tmp_path / "out"
    if not mounts(out, "ro,size=1m"):
        if os.geteuid() == 0:
            pytest.skip("root without permission to mount: a read-only directory cannot be made here")
        out.mkdir()
        out.chmod(0o555)
    with pytest.raises(OutputUnwritableError) as err:
        run_spec(parse_spec(spec_dict(str(tmp_path / "in"), str(out))))
    message = str(err.value)
    assert str(out) in message and ("Read-only file system" in message or "Permission denied" in message), message
    assert not (out / "report.json").exists()


def test_a_full_disk_fails_the_image_and_keeps_the_finished_one(tmp_path, mounts, ray_cluster):
    out = tmp_path / "out"
    if not mounts(out, "size=1200k"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root with CAP_SYS_ADMIN)")
    _inputs(tmp_path / "in", {"a": 192, "b": 512})  # a fits beside the weights copy (0.8 MB); b does not
    spec = parse_spec(spec_dict(str(tmp_path / "in"), str(out), output__extras=["confidence"],
                                failure__mode="fail_fast"))
    results = run_spec(spec)
    assert [(r.name, r.status) for r in results] == [("a", "ok"), ("b", "failed")], [r.error for r in results]
    error = results[1].error
    assert str(out / "b.zarr") in error and "No space left on device" in error, error
    # a is whole and marked complete, so the next run skips it (tests/jobs/test_storage_faults.py reruns so)
    group = zarr.open_group(str(out / "a.zarr"), mode="r")
    assert group.attrs["gigaseg"]["complete"] is True
    labels = zarr.open_array(str(out / "a.zarr" / "labels" / "segmentation" / "0"), mode="r")[:]
    assert labels.shape == (192, 192)
