"""The CUDA path: the device blend, the pinned uploads and autocast against the same code on the CPU. Skipped
where there is no CUDA device (``-m gpu`` selects them on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import seeded_checkpoint
from pipeline.tiling import TileGrid, Window, window_2d
from pipeline.workers.device_blend import BlockBlend
from pipeline.workers.predictor import DeviceConfig, Uploader
from tests.pipeline.blockrun import block_worker, run_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _blend(device: torch.device, grid: TileGrid, data: np.ndarray, chunk: int):
    region = Window(0, 0, grid.height, grid.width)
    blend = BlockBlend(data.shape[2], region, chunk + grid.tile, chunk, device)
    weights = torch.from_numpy(np.array(window_2d("gaussian", grid.tile))).to(device)
    probs, labels = [], []
    for iy in range(grid.ny):
        for ix in range(grid.nx):
            blend.add(grid.window(iy, ix), torch.from_numpy(data[iy, ix]).to(device), weights)
        final = grid.window(iy + 1, 0).y0 if iy + 1 < grid.ny else region.y1
        for band in blend.ready(min(final, region.y1)):
            probs.append(band.probabilities().cpu().numpy())
            labels.append(band.labels("uint8"))
    return np.concatenate(probs, axis=1), np.concatenate(labels, axis=0)


def test_the_device_blend_on_cuda_is_the_cpu_blend():
    grid = TileGrid(300, 260, tile=64, overlap=16)
    data = np.random.default_rng(0).random((grid.ny, grid.nx, 5, 64, 64)).astype(np.float32)
    p_cpu, l_cpu = _blend(torch.device("cpu"), grid, data, 50)
    p_gpu, l_gpu = _blend(torch.device("cuda"), grid, data, 50)
    np.testing.assert_allclose(p_gpu, p_cpu, rtol=1e-5, atol=1e-6)
    top2 = np.sort(p_cpu, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4  # where no two classes tie within float error
    assert (l_gpu[clear] == l_cpu[clear]).all()


def test_pinned_uploads_keep_each_batch_while_the_next_is_staged():
    up = Uploader(torch.device("cuda"))
    host = np.zeros((4, 3, 64, 64), np.uint8)
    outs = []
    for k in range(6):
        host[:] = k  # the host array is reused, as a reader reuses its buffers
        outs.append(up(host))
    torch.cuda.synchronize()
    for k, out in enumerate(outs):
        assert out.device.type == "cuda" and int(out.float().mean().item()) == k


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_a_block_run_on_cuda_matches_the_cpu(tmp_path, precision):
    ckpt = seeded_checkpoint("fpn_resnet18", 4, [f"c{i}" for i in range(4)], seed=0, width=16)
    image = np.random.default_rng(1).integers(0, 256, (3, 640, 576), dtype=np.uint8)
    grid = TileGrid(640, 576, 256, 64, margin=32)
    cpu = block_worker(tmp_path, ckpt, device=DeviceConfig("fp32", 2, device="cpu"))
    gpu = block_worker(tmp_path, ckpt, device=DeviceConfig(precision, 2))
    assert gpu.model.device.type == "cuda" and cpu.model.device.type == "cpu"
    if precision == "auto":
        assert gpu.model.runner.autocast_dtype in (torch.bfloat16, torch.float16)
    l_cpu, p_cpu = run_blocks(cpu, tmp_path, image, grid, side=512, chunk=128, num_classes=4, name="cpu")
    l_gpu, p_gpu = run_blocks(gpu, tmp_path, image, grid, side=512, chunk=128, num_classes=4, name="gpu")
    diff = np.abs(p_gpu.astype(np.float32) - p_cpu.astype(np.float32))
    if precision == "fp32":  # cuDNN convolutions run in TF32 by default (torch.backends.cudnn.allow_tf32)
        assert diff.max() < 2e-2 and (l_gpu == l_cpu).mean() > 0.995
    else:  # bf16/fp16 autocast: the same classes almost everywhere
        assert diff.mean() < 2e-2 and (l_gpu == l_cpu).mean() > 0.97
