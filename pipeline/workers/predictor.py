"""The tile predictor: one network loaded once, callable on a batch of RGB tiles, testable without Ray.

Following Ray's predictor pattern, the expensive part (building the network, loading weights, choosing
the device and precision) happens once in ``__init__``; a call maps a uint8 batch to class probabilities.
Frameworks (``pipeline.frameworks``) build their tile models from it; unit tests and benchmarks call it directly.

A gigaseg segmenter checkpoint gives a network of one input, an FCtL checkpoint one that also takes its context
windows: ``predictor(tiles)`` or ``predictor(tiles, contexts)``, as ``predictor.contexts`` (the factors it was
trained with; empty for a plain segmenter) says.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from models.fctl_checkpoint import is_fctl_checkpoint, load_fctl
from pipeline.plan import Precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceConfig:
    """How a worker runs its model: precision (``auto``: bf16 on GPUs and bf16-capable CPUs), torch threads, and
    the device (None: CUDA when present, else the CPU; ``"cpu"`` keeps a worker on the CPU of a GPU node)."""

    precision: str = "auto"
    torch_threads: int = 1
    channels_last: bool = True
    device: str | None = None



#: The predictor's configuration is the worker's device configuration.
PredictorConfig = DeviceConfig


def resolve_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (avx512_bf16 or AMX): the probe ``auto`` asks."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32.

    auto: bf16 on GPUs that support it (fp16 otherwise); on CPU bf16 only where oneDNN has native bf16
    kernels (avx512_bf16/AMX), where it is ~2× faster and agrees with fp32 on ~99.9 % of argmax pixels;
    plain fp32 elsewhere, where emulated bf16 is slower than fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


class Uploader:
    """Host → device copies of the arrays a worker feeds its model. On CUDA each goes through one of two pinned
    host buffers (reused, grown as needed) with an asynchronous copy, so the next batch is staged while the
    device works on this one; on a CPU device the array is used where it is (``torch.from_numpy``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # two buffers per dtype (image rows are uint8, maps float16): a buffer is refilled only once the copy
        # before last of that dtype has left it
        self._slots: dict[torch.dtype, list] = {}
        self._next: dict[torch.dtype, int] = {}

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if self.device.type != "cuda":
            return torch.from_numpy(array)
        flat = torch.from_numpy(array).reshape(-1)
        slots = self._slots.setdefault(flat.dtype, [(None, None), (None, None)])
        k = self._next.get(flat.dtype, 0)
        buf, event = slots[k]
        if event is not None:
            event.synchronize()  # the copy that last used this buffer has finished
        if buf is None or buf.numel() < flat.numel():
            buf = torch.empty(max(flat.numel(), 1), dtype=flat.dtype, pin_memory=True)
        staged = buf[: flat.numel()]
        staged.copy_(flat)
        out = staged.view(array.shape).to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        slots[k] = (buf, event)
        self._next[flat.dtype] = 1 - k
        return out


class DeviceRunner:
    """What every model on a worker shares: its device, autocast dtype, memory format and input normalisation
    (``(pixel − 255·mean) / (255·std)`` with the checkpoint's ``normalization``). On CUDA, cuDNN picks its
    fastest convolution algorithms for the tile size (``cudnn.benchmark``: every tile of a job has one shape)."""

    def __init__(self, config: DeviceConfig, normalization, device=None) -> None:
        torch.set_num_threads(config.torch_threads)
        device = device if device is not None else config.device
        self.device = torch.device(device) if device is not None else resolve_device()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        self.mean = torch.tensor(normalization.mean, device=self.device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(normalization.std, device=self.device).view(1, -1, 1, 1) * 255.0
        self.upload = Uploader(self.device)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device).eval().to(memory_format=self.memory_format)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def input(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, T, T)`` (host array, or a tensor on the device) → normalised float on the device."""
        x = self.upload(tiles) if isinstance(tiles, np.ndarray) else tiles
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def tensor(self, values: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Float values (probabilities, maps) ``(B, C, T, T)`` on the device, float32."""
        x = self.upload(np.asarray(values, dtype=np.float32)) if isinstance(values, np.ndarray) else values
        return x.float().contiguous(memory_format=self.memory_format)


class TilePredictor:
    """``predictor(tiles uint8 (B, 3, T, T)[, contexts uint8 (B, n, 3, T, T)]) → probabilities float16 (B, C, T, T)``."""

    def __init__(self, checkpoint: bytes, config: DeviceConfig = DeviceConfig(), device=None):
        self.contexts: tuple[float, ...] = ()  # FCtL: the context factors the model was trained with
        if is_fctl_checkpoint(checkpoint):
            model, self.info, fctl_config = load_fctl(checkpoint)
            self.contexts = fctl_config.contexts
        else:
            model, self.info = load_checkpoint(checkpoint)
        self.runner = DeviceRunner(config, self.info.normalization, device)
        self.model = self.runner.prepare(model)
        log.info("predictor on %s, autocast %s, %d torch threads", self.device, self.autocast_dtype,
                 torch.get_num_threads())

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.runner.autocast_dtype

    @property
    def num_classes(self) -> int:
        return self.info.config.num_classes

    def logits(self, x: torch.Tensor, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits of normalised tiles ``x`` (and contexts ``(B, n, 3, T, T)``, normalised) under autocast."""
        if bool(self.contexts) != (contexts is not None):
            raise ValueError(
                f"this model takes {'its context windows' if self.contexts else 'no context windows'}; "
                f"{'pass' if self.contexts else 'do not pass'} contexts ({len(self.contexts)} factors: "
                f"{list(self.contexts)})")
        with self.runner.autocast():
            out = self.model(x) if contexts is None else self.model(x, contexts)
        return out.float()

    @torch.inference_mode()
    def probabilities(self, tiles: np.ndarray | torch.Tensor,
                      contexts: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Softmax probabilities ``(B, C, T, T)`` float32 on the device, of uint8 tiles (and contexts ``(B, n, 3, T,
        T)``, normalised like the tiles: zero padding past the image becomes ``−mean/std``, as in training, which
        normalises the zero-padded crops the same way)."""
        ctx = None
        if contexts is not None:
            b, n = contexts.shape[:2]
            ctx = self.runner.input(contexts.reshape(b * n, *contexts.shape[2:]))
            ctx = ctx.reshape(b, n, *ctx.shape[1:])
        return torch.softmax(self.logits(self.runner.input(tiles), ctx), dim=1)

    def __call__(self, tiles: np.ndarray, contexts: np.ndarray | None = None) -> np.ndarray:
        """``probabilities`` as a float16 host array."""
        return self.probabilities(tiles, contexts).to(torch.float16).cpu().numpy()


__all__ = ["DeviceConfig", "DeviceRunner", "Uploader", "PredictorConfig", "TilePredictor", "cpu_has_bf16", "resolve_device", "resolve_precision"]
