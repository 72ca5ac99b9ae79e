"""The one place a validated job spec becomes a ``pipeline.plan.JobPlan``.

``resolve_model`` reads (or seeds) the weights the spec's framework needs and settles the class table, naming the
spec field at fault (``SpecError``); ``job_plan`` copies those weights into the output for the workers (once per
content) and builds the plan, each part validated where it is built. Nothing here starts Ray or Dask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from jobs.spec import JobSpec
from models.card import CardError, parse_card
from models.info import CheckpointInfo
from pipeline.errors import SpecError
from pipeline.evaluation.palette import default_colors
from pipeline.frameworks import FRAMEWORKS
from pipeline.frameworks.base import ModelSource, Resolution
from pipeline.frameworks.segmenters import check_segmenter
from pipeline.output.state import fingerprint
from pipeline.plan import (
    ClassTable,
    FailurePlan,
    InputPlan,
    JobPlan,
    OutputPlan,
    PoolPlan,
    TilingPlan,
    WeightsRef,
)
from pipeline.storage import read_bytes, write_once
from pipeline.workers.dispatch import placement_for


@dataclass(frozen=True)
class ResolvedModel:
    """The framework's weights (kind → bytes; ``"model"`` the main one) and the job's class table."""

    resolution: Resolution
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]

    @property
    def weights(self) -> dict[str, bytes]:
        return self.resolution.weights

    @property
    def checkpoint(self) -> bytes:
        return self.weights["model"]

    @property
    def info(self) -> CheckpointInfo | None:
        """A gigaseg checkpoint's own description (None for a model you bring: see ``resolution.card``)."""
        return self.resolution.info


def resolve_model(spec: JobSpec) -> ResolvedModel:
    """The weights and the class table: from ``model.checkpoint`` (a gigaseg checkpoint, or a model you bring:
    ONNX, torch.export, ``model.factory`` weights; ``pipeline.frameworks.segmenters``), or a seeded init of
    ``model.name``, plus what the framework needs besides (MagNet's refiner). Class names and colours given in
    the spec override the checkpoint's, but their count must match it. A model you bring is run once on a tile
    of zeros here, so a model that does not fit its card fails now, naming the field, not in every worker."""
    m = spec.model
    data = None
    if m.checkpoint:
        try:
            data = read_bytes(m.checkpoint, spec.inputs.storage_options)
        except FileNotFoundError:
            raise SpecError("model.checkpoint", [f"model.checkpoint: {m.checkpoint} does not exist"]) from None
    seeded = tuple(c.name for c in m.classes or ())
    try:
        card = parse_card({**(m.card.fields() if m.card else {}),
                           **({"classes": [c.model_dump(exclude_none=True) for c in m.classes]} if m.classes else {})},
                          "model.card")
    except CardError as err:
        raise SpecError("model.card", [str(err)]) from None
    source = ModelSource(data, m.checkpoint, m.architecture, seeded, m.width, m.seed, dict(spec.inputs.storage_options),
                         factory=m.factory, card=card, bands=None if spec.inputs.bands is None else tuple(spec.inputs.bands))
    resolution = FRAMEWORKS[m.framework].resolve(m.framework_options, source)
    info = resolution.info
    if info is not None and spec.tiling.tile % info.config.size_multiple:
        k = info.config.size_multiple
        raise SpecError("tiling.tile", [
            f"tiling.tile: {spec.tiling.tile} is not a multiple of {k}, the stride of {info.config.name}; use "
            f"{max(k, spec.tiling.tile // k * k)}"])
    if data is None:
        colors = tuple(c.color for c in m.classes) if all(c.color for c in m.classes) else None
        return ResolvedModel(resolution, seeded, tuple(colors or default_colors(len(seeded))))
    if info is None:  # a model you bring: its card, completed by the spec, is the class table
        if m.name is not None:
            raise SpecError("model.name", [f"model.name: {m.name!r} names a gigaseg architecture, but "
                                           f"{m.checkpoint} is a model you bring; remove model.name"])
        check_segmenter(resolution, spec.tiling.tile)
        names, colors = resolution.card.class_names, resolution.card.class_colors
        return ResolvedModel(resolution, tuple(names), tuple(colors or default_colors(len(names))))
    if m.card is not None:
        raise SpecError("model.card", [f"model.card: {m.checkpoint} is a gigaseg checkpoint, which carries its own "
                                       "card; remove model.card (model.classes may rename its classes)"])
    if m.name is not None and info.config.name != m.name:
        raise SpecError("model", [f"model.name: {m.name!r} but {m.checkpoint} holds a {info.config.name!r}; "
                                  f"set model.name: {info.config.name}"])
    names, colors = info.class_names, info.class_colors
    if m.classes:
        if len(m.classes) != len(names):
            raise SpecError("model.classes", [
                f"model.classes: {len(m.classes)} classes listed but {m.checkpoint} predicts "
                f"{len(names)} ({', '.join(names)}); list {len(names)} or omit model.classes"])
        names = tuple(c.name for c in m.classes)
        if all(c.color for c in m.classes):
            colors = tuple(c.color for c in m.classes)
    return ResolvedModel(resolution, tuple(names), tuple(colors or default_colors(len(names))))


def stage_weights(output: OutputPlan, weights: dict[str, bytes]) -> dict[str, WeightsRef]:
    """Each weights file into the output's work area, named by its content (``pipeline.storage.write_once``: a
    torn copy left by a killed driver is replaced, never taken), for the workers to read."""
    refs = {}
    for kind, data in weights.items():
        sha = hashlib.sha256(data).hexdigest()
        url = output.layout.weights_url(kind, sha)
        write_once(url, data, output.storage_options)
        refs[kind] = WeightsRef(url, sha)
    return refs


def job_plan(spec: JobSpec, model: ResolvedModel, audit_dir: str | None = None) -> JobPlan:
    """The plan of ``spec`` with ``model``'s weights staged in its output. ``resources.workers: auto`` is planned
    as one worker; the runner counts the cluster's GPUs once Ray is up and replaces it."""
    i, t, o, r, f = spec.inputs, spec.tiling, spec.output, spec.resources, spec.failure
    inputs = InputPlan(i.url, tuple(i.patterns), dict(i.storage_options), i.value_range,
                       None if i.bands is None else tuple(i.bands))
    output = OutputPlan(o.url, dict(o.storage_options), tuple(o.extras), o.if_exists, o.label_name)
    tiling = TilingPlan(tile=t.tile, overlap=t.overlap, margin=t.margin, offset=tuple(t.offset), batch=t.batch,
                        tiles_per_call=None if t.tiles_per_call == "auto" else t.tiles_per_call, blend=t.blend,
                        sigma_scale=t.sigma_scale, chunk=t.chunk, image_chunk=t.image_chunk)
    pool = PoolPlan(workers=1 if r.workers == "auto" else r.workers, gpus_per_worker=r.gpus_per_worker,
                    cpus_per_worker=r.cpus_per_worker, torch_threads=r.torch_threads,
                    in_flight_per_worker=r.in_flight_per_worker, precision=spec.model.precision,
                    placement=placement_for([i.url, o.url]), audit_dir=audit_dir)
    classes = ClassTable(model.class_names, model.class_colors)
    refs = stage_weights(output, model.weights)
    framework = FRAMEWORKS[spec.model.framework].build(spec.model.framework_options, refs, model.resolution)
    return JobPlan(
        inputs=inputs, output=output, tiling=tiling, pool=pool,
        failure=FailurePlan(fail_fast=f.mode == "fail_fast", tile_retries=f.tile_retries), classes=classes,
        framework=framework, fingerprint=_fingerprint(spec, classes, framework.fingerprint()),
    )


def _fingerprint(spec: JobSpec, classes: ClassTable, framework: dict[str, Any]) -> str:
    """What fixes an image's output: the framework (weights by content, options), classes, tiling (not how
    many tiles a call or batch holds), value range, the bands selected (only when selected: an RGB job's
    fingerprint is what it was before bands existed), extras and the label name."""
    t = spec.tiling
    bands = {} if spec.inputs.bands is None else {"bands": list(spec.inputs.bands)}
    return fingerprint(
        framework=framework, classes=classes.names, value_range=spec.inputs.value_range,
        tiling=t.model_dump(mode="json", exclude={"batch", "tiles_per_call"}), extras=sorted(spec.output.extras),
        label_name=spec.output.label_name, **bands,
    )


__all__ = ["ResolvedModel", "job_plan", "resolve_model", "stage_weights"]
