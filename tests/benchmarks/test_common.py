"""The benchmarks' shared helpers that decide what a figure means: the archive a job reads and the clock
that times its tile phase."""

from __future__ import annotations

import os

import numpy as np
import zarr

from benchmarks._inputs import archive, archive_path
from benchmarks._timing import TileClock
from pipeline.sources.discover import discover


def _scene(path):
    arr = zarr.create_array(store=str(path), shape=(64, 64, 3), chunks=(32, 32, 3), dtype="uint8")
    arr[:] = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    return path


def test_archive_is_n_images_of_hard_links(tmp_path):
    scene = _scene(tmp_path / "inputs" / "scene.zarr")
    folder = archive(scene, archive_path(tmp_path, 64, 3), 3)
    (folder / ".partial-003").mkdir()  # an interrupted copy: hidden, so never an image

    refs = discover(str(folder))
    assert [r.name for r in refs] == ["scene-000", "scene-001", "scene-002"]
    chunk = "c/0/0/0"
    assert all(os.path.samefile(scene / chunk, folder / f"scene-{i:03d}.zarr" / chunk) for i in range(3))
    np.testing.assert_array_equal(zarr.open_array(str(folder / "scene-002.zarr"), mode="r")[:],
                                  zarr.open_array(str(scene), mode="r")[:])

    again = archive(scene, folder, 4)  # reused: only the missing copy is made
    assert [r.name for r in discover(str(again))] == ["scene-000", "scene-001", "scene-002", "scene-003"]


def test_tile_clock_spans_every_image():
    clock = TileClock()
    clock.start_image("a", 4, 0)
    t_start = clock.t_start
    clock.advance(4, 1.0)
    clock.start_image("b", 4, 0)
    clock.advance(2, 0.5)
    clock.advance(2, 0.5)
    assert clock.t_start == t_start and clock.t_last >= clock.t_first >= t_start
    assert clock.tile_seconds == clock.t_last - t_start
    assert (clock.tiles, clock.first_tiles, clock.megapixels) == (8, 4, 2.0)
