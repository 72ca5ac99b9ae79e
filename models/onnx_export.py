"""A gigaseg segmenter as an ONNX model that carries its model card: ``gigaseg export MODEL.safetensors OUT.onnx``.

The graph is the network as gigaseg runs it: input ``image`` ``(N, K, H, W)`` float32, the pixels already
normalised as the card says (``(v/255 − mean) / std`` per band), output ``logits`` ``(N, C, H, W)`` float32.
``N`` is dynamic, and so are ``H`` and ``W`` as multiples of the network's size multiple (its coarsest stride,
32 for most heads): ``H = 32·h`` with ``h ≥ 1`` free. The card (``models.card``: classes and colours, bands,
normalisation, size multiple, logits) is stored in the model's ``metadata_props`` under ``CARD_KEY`` as JSON,
where ``gigaseg inspect`` / ``gigaseg run`` and other tools (QGIS Deepness reads ``metadata_props`` too) find it.

Traced with ``torch.onnx.export(dynamo=True)`` (``torch.export`` then onnxscript's translation). Not exported:
FCtL (a second input, its context windows) and PointRend (tried with torch 2.13: ``torch.export`` traces its
subdivision, but the ONNX translation fails on ``aten.remainder`` of its top-k point indices by a dynamic size).
"""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import torch

from models.card import CARD_KEY, ModelCard
from models.checkpoint import load_checkpoint, read_info
from models.errors import CheckpointError
from models.fctl_checkpoint import is_fctl_checkpoint
from models.info import CheckpointInfo

log = logging.getLogger(__name__)

#: The ONNX operator set the exporter targets (ONNX Runtime ≥ 1.17 runs it).
OPSET = 18


def export_onnx(checkpoint: bytes, opset: int = OPSET) -> tuple[bytes, ModelCard]:
    """The ONNX model (serialised) of a gigaseg segmenter checkpoint and the card stored in it. Raises
    ``CheckpointError`` for what cannot be exported (an FCtL or PointRend checkpoint, a failed trace)."""
    info = _segmenter_info(checkpoint)
    model, _ = load_checkpoint(checkpoint)
    model = model.eval()
    card = ModelCard.from_info(info)
    multiple = int(getattr(model, "input_multiple", card.size_multiple))
    card = ModelCard(card.class_names, card.class_colors, card.bands, card.normalization, multiple, "logits")
    from torch.export import Dim

    k = info.config.in_channels
    sample = torch.zeros(2, k, 2 * multiple, 3 * multiple)
    dims = ({0: Dim("batch", min=1), 2: multiple * Dim("h", min=1), 3: multiple * Dim("w", min=1)},)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (sample,), None, dynamo=True, input_names=["image"],
                                        output_names=["logits"], dynamic_shapes=dims, opset_version=opset,
                                        optimize=True, verbose=False)
    except Exception as err:  # the exporter's own error types: say which network failed and why
        raise CheckpointError(f"torch.onnx.export failed for {info.config.name}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
    proto = program.model_proto
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card.to_dict())
    proto.producer_name = "gigaseg"
    return proto.SerializeToString(), card


def _segmenter_info(checkpoint: bytes) -> CheckpointInfo:
    if is_fctl_checkpoint(checkpoint):
        raise CheckpointError("an FCtL checkpoint takes its context windows as a second input, which other tools "
                              "do not feed; export its local segmenter (gigaseg train task segmenter) instead")
    info = read_info(checkpoint)
    if info.config.refine is not None:
        raise CheckpointError(f"the checkpoint's {info.config.refine} refinement does not export: torch.onnx.export "
                              f"(torch {torch.__version__.split('+')[0]}) fails to translate the index arithmetic on "
                              "its top-k points at dynamic sizes; export a plain segmenter (model.refine unset)")
    return info


def compare_outputs(checkpoint: bytes, onnx_bytes: bytes, shape: tuple[int, int, int, int],
                    seed: int = 0) -> tuple[float, float]:
    """``(max |ONNX − torch|, max |torch|)`` of the logits of one random normalised batch of ``shape``, ONNX run
    by ONNX Runtime on the CPU (fp32 both)."""
    import onnxruntime as ort

    model, _ = load_checkpoint(checkpoint)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        want = model.eval()(x).float().numpy()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - want).max()), float(np.abs(want).max())


__all__ = ["OPSET", "compare_outputs", "export_onnx"]
