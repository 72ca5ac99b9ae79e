"""The task sections of the training spec (``jobs.train.spec``): ``refiner`` (task ``magnet_refiner``) and
``fctl`` (task ``fctl``, one stage of FCtL's staged training)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from jobs.spec import Strict


class RefinerSpec(Strict):
    segmenter: str = Field(description="model.safetensors of a finished segmenter training (frozen here)")
    width: int = Field(default=64, ge=4, le=256, description="refiner width (MagNet's: 64)")
    residual: bool = Field(
        default=True,
        description="add log O to the refiner's output, its last conv starting at zero: an untrained refiner "
                    "returns the fine prediction (false: the reference's plain refiner)",
    )
    scales: int = Field(
        default=3, ge=2, le=12,
        description="model.magnet.scales of the jobs that will use it: pairs (crop at level L, coarse view at "
                    "L+1) for L = 0 … scales−2",
    )


FCTL_STAGE_LOCAL = ("stage local is a plain segmenter: train it with task: segmenter and crops.scales: [1] "
                     "(no fctl section); its model.safetensors is fctl.local of stages context and fused")


class FctlSpec(Strict):
    """One stage of FCtL's staged training (``jobs.train.tasks.fctl``); every stage starts from ``local``.

    - ``context``: a segmenter for the context views at ``factor`` (one run per factor), initialised from
      ``local`` (the reference's ``--pre_path``); its ``model.safetensors`` is a plain segmenter checkpoint.
    - ``fused``: ``FCtL.from_local(local)`` with the encoders of ``context_checkpoints`` (one per ``contexts``
      factor, in order) frozen; its ``model.safetensors`` is an FCtL checkpoint (``model.framework: fctl``).
    """

    stage: Literal["context", "fused"] = Field(description="context: one context segmenter; fused: the FCtL")
    local: str = Field(description="model.safetensors of the stage-local run (task: segmenter, crops.scales [1])")
    factor: float | None = Field(default=None, gt=1, validate_default=True,
                                 description="stage context: the context factor this run trains (e.g. 2)")
    contexts: list[float] | None = Field(default=None, validate_default=True,
                                         description="stage fused: context factors, medium then large (default [2, 4])")
    context_checkpoints: list[str] | None = Field(
        default=None, validate_default=True,
        description="stage fused: model.safetensors of each stage-context run, one per contexts factor, in order")
    key_channels: int | None = Field(default=None, ge=1, le=1024, validate_default=True,
                                     description="stage fused: correlation key width (default: C/8 of the deepest map)")

    @field_validator("stage", mode="before")
    @classmethod
    def _no_local_stage(cls, v):
        if v == "local":
            raise ValueError(FCTL_STAGE_LOCAL)
        return v

    @field_validator("factor")
    @classmethod
    def _factor(cls, v, info):
        stage = info.data.get("stage")
        if stage == "context" and v is None:
            raise ValueError("required for stage context: the context factor this run trains (e.g. 2); "
                             "train one run per factor of the fused model")
        if stage == "fused" and v is not None:
            raise ValueError("only read by stage context; the fused stage's factors are fctl.contexts")
        return v

    @field_validator("contexts")
    @classmethod
    def _contexts(cls, v, info):
        stage = info.data.get("stage")
        if stage == "context" and v is not None:
            raise ValueError("only read by stage fused; stage context trains one factor: fctl.factor")
        if stage != "fused":
            return v
        v = [2.0, 4.0] if v is None else v
        if not 1 <= len(v) <= 2:
            raise ValueError(f"FCtL takes 1 or 2 context factors (medium, large), got {v}")
        if any(f <= 1 for f in v) or v != sorted(set(v)):
            raise ValueError(f"factors must be > 1 and increase (medium first, then large), got {v}")
        return v

    @field_validator("context_checkpoints")
    @classmethod
    def _checkpoints(cls, v, info):
        stage, contexts = info.data.get("stage"), info.data.get("contexts")
        if stage == "context" and v is not None:
            raise ValueError("only read by stage fused; remove it")
        if stage != "fused":
            return v
        if not v:
            raise ValueError("required for stage fused: the model.safetensors of each stage-context run, one per "
                             "fctl.contexts factor, in the same order")
        if contexts is not None and len(v) != len(contexts):
            raise ValueError(f"{len(v)} checkpoint(s) for {len(contexts)} context factor(s) (fctl.contexts = "
                             f"{contexts}): give one stage-context checkpoint per factor, in the same order")
        return v

    @field_validator("key_channels")
    @classmethod
    def _key_channels(cls, v, info):
        if info.data.get("stage") == "context" and v is not None:
            raise ValueError("only read by stage fused; remove it")
        return v
