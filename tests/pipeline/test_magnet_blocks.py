"""MagNet's block work: the median as rows come equals the whole map's; a job's masks do not depend on how the
image is cut into blocks (the halo carries the median across block edges)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from models import magnet as mg
from pipeline.frameworks.magnet_blocks import MedianRows
from pipeline.tiling import Window
from pipeline.workers.median import median_rows


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize(("own", "cuts"), [(Window(0, 0, 40, 30), [0, 7, 8, 25, 42]),
                                           (Window(16, 10, 16, 12), [0, 3, 20, 42]),
                                           (Window(32, 15, 10, 15), [0, 42])])
def test_median_rows_equal_the_whole_maps_median(k, own, cuts):
    h, w = 42, 30
    e = np.random.default_rng(k).random((h, w)).astype(np.float16).astype(np.float32)
    e[10:20] = 0.5  # runs of equal values, as E has
    want = mg.median_filter(e, k)[own.y0 : own.y1, own.x0 : own.x1]
    r = k // 2
    blend = Window(own.y0 - r, own.x0 - r, own.h + 2 * r, own.w + 2 * r).clip(h, w)
    rows = MedianRows(k, blend, own, torch.device("cpu"), strip=4)
    got = np.full(want.shape, np.nan, np.float32)
    for a, b in zip(cuts, cuts[1:]):
        a, b = max(a, blend.y0), min(b, blend.y1)
        if a >= b:
            continue
        for y0, med in rows.add(a, torch.from_numpy(e[a:b, blend.x0 : blend.x1]).half()):
            got[y0 - own.y0 : y0 - own.y0 + med.shape[0]] = med.float().numpy()
    rows.finish()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_the_selection_networks_give_the_median(k):
    x = torch.from_numpy(np.random.default_rng(k).integers(0, 9 if k < 7 else 1000, (30, 41)).astype(np.int16))
    want = x.unfold(0, k, 1).unfold(1, k, 1).reshape(31 - k, 42 - k, -1).median(dim=-1).values
    assert torch.equal(median_rows(x, k), want)


@pytest.mark.integration
def test_masks_do_not_depend_on_the_blocks(tmp_path, ray_cluster):
    """One block per level against blocks of one chunk (the median's halo and MagNet-Fast's choice cross block
    edges): the same labels, confidence and probabilities, bit for bit."""
    from jobs.runner import run_spec
    from jobs.spec import parse_spec
    from pipeline.synth.land_cover import land_cover
    from tests.archive import spec_dict

    (tmp_path / "in").mkdir()
    zarr.create_array(store=str(tmp_path / "in" / "scene.zarr"), shape=(600, 520, 3), chunks=(128, 128, 3),
                      dtype="uint8")[:] = land_cover(0, 0, 600, 520, seed=8)
    outs = {}
    for name, per_call in (("one", None), ("many", 1)):
        spec = parse_spec(spec_dict(
            str(tmp_path / "in"), str(tmp_path / name), model__framework="magnet",
            model__magnet={"scales": 3, "median": 5, "patches": 0.6},
            tiling__tile=128, tiling__overlap=32, tiling__chunk=128, tiling__tiles_per_call=per_call or "auto",
            output__extras=["confidence", "probabilities"]))
        [result] = run_spec(spec)
        assert result.status == "ok", result.error
        outs[name] = zarr.open_group(str(tmp_path / name / "scene.zarr"), mode="r")
    for path in ("labels/segmentation/0", "labels/segmentation/1", "confidence", "probabilities"):
        np.testing.assert_array_equal(outs["one"][path][:], outs["many"][path][:], err_msg=path)
    assert len(np.unique(outs["one"]["labels/segmentation/0"][:])) >= 2
