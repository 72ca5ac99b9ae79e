"""Models users bring, run on a worker's device: an ONNX model (ONNX Runtime), a torch.export program, or their
own ``nn.Module`` with safetensors weights. Each is a tile predictor like ``predictor.TilePredictor``:
``probabilities(tiles uint8 (B, K, T, T))`` (K: the card's bands) → ``(B, C, T, T)`` float32 on the device, fed as
its model card says (``models.card``: normalisation, logits or probabilities).

How each is read, and what is never done: nothing is unpickled. ONNX is a protobuf graph; safetensors is raw
tensors; a torch.export archive is checked first (``check_export_archive``) for every way
``torch.export.load`` could unpickle or run compiled code, and refused if it has any.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import zipfile
from collections.abc import Callable

import numpy as np
import torch

from models.card import ModelCard
from models.errors import CheckpointError
from pipeline.workers.predictor import DeviceConfig, DeviceRunner

log = logging.getLogger(__name__)


class _Predictor:
    """What the predictors share: the device runner (normalisation from the card), the output's check and
    softmax, and a fixed batch honoured by padding."""

    def __init__(self, card: ModelCard, config: DeviceConfig, device, fixed_batch: int | None = None) -> None:
        self.card, self.fixed_batch = card, fixed_batch
        self.runner = DeviceRunner(config, card.normalization, device)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def probabilities(self, tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = self.runner.input(tiles)
        b = x.shape[0]
        if self.fixed_batch is None or b == self.fixed_batch:
            out = self._forward(x)
        else:  # the model takes exactly fixed_batch tiles: run full batches, the last padded with zeros
            n = self.fixed_batch
            parts = []
            for i in range(0, b, n):
                part = x[i : i + n]
                if part.shape[0] < n:
                    part = torch.cat([part, part.new_zeros((n - part.shape[0], *part.shape[1:]))])
                parts.append(self._forward(part))
            out = torch.cat(parts)[:b]
        want = (b, self.num_classes, *x.shape[2:])
        if tuple(out.shape) != want:
            raise CheckpointError(f"the model returned {tuple(out.shape)} for {tuple(x.shape)} tiles; expected "
                                  f"{want} (one channel per class of its card: {', '.join(self.card.class_names)})")
        out = out.float()
        return torch.softmax(out, dim=1) if self.card.output == "logits" else out


class ModulePredictor(_Predictor):
    """An ``nn.Module`` (a user's factory with its weights, or a torch.export program's module). A user's module
    runs under the worker's autocast (``model.precision``); an exported program at the precision it was exported
    in, as an ONNX model: its graph checks every tensor's dtype, so autocast's bf16 would fail it."""

    def __init__(self, module: torch.nn.Module, card: ModelCard, config: DeviceConfig = DeviceConfig(), device=None,
                 exported: bool = False) -> None:
        super().__init__(card, config, device)
        module = module.to(self.device)
        if not exported:  # an exported program is traced in its mode already (and refuses .eval())
            module = module.eval()
        self.exported = exported
        self.model = module.to(memory_format=self.runner.memory_format)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with contextlib.nullcontext() if self.exported else self.runner.autocast():
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):  # torchvision-style {"out": …}
            out = out.get("out", next(iter(out.values())))
        return out


class OnnxPredictor(_Predictor):
    """An ONNX model in an ONNX Runtime session: CUDA's execution provider when the worker has CUDA and the
    installed ONNX Runtime offers it (``onnxruntime-gpu``), else the CPU's, with the worker's torch threads. On
    CUDA the tiles stay on the device (I/O binding to the torch tensors); on the CPU they are passed without a
    copy. The model runs at its own precision (autocast does not apply)."""

    def __init__(self, data: bytes, card: ModelCard, config: DeviceConfig = DeviceConfig(), device=None) -> None:
        session, info = open_onnx(data, config.torch_threads, cuda=_wants_cuda(device, config))
        super().__init__(card, config, device, info["batch"])
        self.runner.memory_format = torch.contiguous_format  # ONNX takes NCHW
        self.session, self.input_name, self.output_name = session, info["input"], info["output"]
        self._cuda = "CUDAExecutionProvider" in session.get_providers() and self.device.type == "cuda"
        log.info("ONNX model on %s", session.get_providers()[0])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        if not self._cuda:
            out = self.session.run([self.output_name], {self.input_name: x.cpu().numpy()})[0]
            return torch.from_numpy(out).to(self.device)
        out = torch.empty((x.shape[0], self.num_classes, *x.shape[2:]), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        idx = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", idx, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the input is written before ONNX Runtime reads it
        self.session.run_with_iobinding(binding)
        return out


def _wants_cuda(device, config: DeviceConfig) -> bool:
    if device is not None:
        return torch.device(device).type == "cuda"
    return (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def open_onnx(data: bytes, threads: int = 1, cuda: bool = False):
    """``(session, facts)`` of an ONNX model: its input and output names, the fixed batch, size and channels of
    its input (None where dynamic), its output channels (None if dynamic) and ``metadata_props``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, threads), 1
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(data, opts, providers=providers)
    except Exception as err:  # ONNX Runtime raises its own exception types for a bad file
        raise CheckpointError(f"not a model ONNX Runtime can load: {str(err).splitlines()[0]}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise CheckpointError(f"the ONNX model takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                              "gigaseg feeds one image tensor (N, C, H, W)")
    shape = list(inputs[0].shape)
    if len(shape) != 4:
        raise CheckpointError(f"the ONNX model's input {inputs[0].name} has shape {shape}; expected (N, C, H, W)")

    def fixed(v):
        return v if isinstance(v, int) and v > 0 else None

    out_shape = list(outputs[0].shape)
    size = fixed(shape[2]), fixed(shape[3])
    facts = {"input": inputs[0].name, "output": outputs[0].name, "batch": fixed(shape[0]), "channels": fixed(shape[1]),
             "size": size if all(size) else None, "classes": fixed(out_shape[1]) if len(out_shape) == 4 else None,
             "metadata": dict(session.get_modelmeta().custom_metadata_map)}
    if len(out_shape) != 4:
        raise CheckpointError(f"the ONNX model's output {outputs[0].name} has shape {out_shape}; expected "
                              "(N, classes, H, W)")
    return session, facts


# ----------------------------------------------------------------------------------------------- torch.export

_REFUSED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")


def check_export_archive(data: bytes) -> list[str]:
    """The model names in a ``torch.export.save`` archive, after checking it holds nothing ``torch.export.load``
    would unpickle or run: weights and constants must be raw tensors (``use_pickle: false``, tensor constants
    only, no legacy ``.pt`` payloads), sample inputs must load with ``torch.load(weights_only=True)`` (the loader
    falls back to full unpickling otherwise), and no compiled code (AOTInductor, ExecuTorch) may be inside.
    Raises ``CheckpointError`` naming what it found."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise CheckpointError("not a torch.export archive (.pt2 is a zip file; this is not one)") from None
    names = archive.namelist()
    root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
    rel = {n[len(root):]: n for n in names if n.startswith(root)}
    if rel.get("archive_format") is None or archive.read(rel["archive_format"]).decode().strip() != "pt2":
        raise CheckpointError("not a torch.export archive: no archive_format 'pt2' (write it with torch.export.save)")
    refused = sorted(n for n in rel if n.startswith(_REFUSED_DIRS))
    if refused:
        raise CheckpointError(f"the archive carries compiled code ({refused[0]}, …): gigaseg loads only exported "
                              "programs (torch.export.save), not AOTInductor or ExecuTorch packages")
    models = [n[len("models/"):-len(".json")] for n in rel if n.startswith("models/") and n.endswith(".json")]
    if not models:
        raise CheckpointError("the torch.export archive holds no exported program (models/*.json)")
    for model in models:
        for legacy in (f"data/weights/{model}.pt", f"data/constants/{model}.pt"):
            if legacy in rel:
                raise CheckpointError(f"the archive stores {legacy}, a pickle of the legacy format; re-save the "
                                      "program with a current torch.export.save")
        for kind in ("weights", "constants"):
            config = rel.get(f"data/{kind}/{model}_{kind}_config.json")
            if config is None:
                continue
            entries = json.loads(archive.read(config)).get("config", {})
            for fqn, meta in entries.items():
                if meta.get("use_pickle"):
                    raise CheckpointError(f"the archive's {kind} {fqn!r} is a pickle (use_pickle: true), which "
                                          "gigaseg never loads; export plain tensors (no tensor subclasses)")
                if kind == "constants" and not str(meta.get("path_name", "")).startswith("tensor_"):
                    raise CheckpointError(f"the archive's constant {fqn!r} is a custom object "
                                          f"({meta.get('path_name')}), loaded by unpickling; gigaseg refuses it")
        sample = rel.get(f"data/sample_inputs/{model}.pt")
        if sample is not None and archive.getinfo(sample).file_size:
            try:
                torch.load(io.BytesIO(archive.read(sample)), weights_only=True)
            except Exception:
                raise CheckpointError(f"the archive's sample inputs ({sample}) hold more than tensors; "
                                      "torch.export.load would unpickle them, so gigaseg refuses the file") from None
    return models


def load_exported(data: bytes) -> torch.nn.Module:
    """The module of a checked ``torch.export`` archive (``check_export_archive``)."""
    check_export_archive(data)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as err:
        raise CheckpointError(f"torch.export.load failed: {str(err).splitlines()[0]}") from None
    return program.module()


# --------------------------------------------------------------------------------------------------- factory

def import_factory(path: str) -> Callable[[], torch.nn.Module]:
    """``"package.module:function"`` imported (the package must be importable on the driver and every worker)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise CheckpointError(f"model.factory {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(f"model.factory {path!r}: cannot import {module_name} ({err}); install the package "
                              "where the job runs (see the README, 'Models you bring')") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CheckpointError(f"model.factory {path!r}: {module_name} has no function {attr}")
    return fn


def build_factory_model(path: str, weights: bytes) -> torch.nn.Module:
    """The user's module from ``factory()`` with the safetensors ``weights`` loaded strictly (every tensor of
    the module given, no other): an error lists what is missing and what is unexpected."""
    from safetensors.torch import load

    module = import_factory(path)()
    if not isinstance(module, torch.nn.Module):
        raise CheckpointError(f"model.factory {path!r} returned {type(module).__name__}, not a torch.nn.Module")
    try:
        state = load(weights)
    except Exception as err:
        raise CheckpointError(f"model.checkpoint is not a safetensors file: {err}") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"
                         f"{' …' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append("wrong shape: " + ", ".join(
                f"{k} {tuple(state[k].shape)} (the module has {tuple(expected[k].shape)})" for k in wrong[:4]))
        raise CheckpointError(f"the weights do not fit model.factory {path!r}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
    return module


__all__ = ["ModulePredictor", "OnnxPredictor", "build_factory_model", "check_export_archive", "import_factory",
           "load_exported", "open_onnx"]
