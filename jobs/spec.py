"""The job spec: YAML → one frozen, validated pydantic model.

Unknown keys are rejected with their full key path; names are ``Literal``s; cross-field rules are
validators. Credentials never belong in a spec: fsspec reads them from the environment or the standard
config files, so ``storage_options`` refuses credential keys outright.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models import ARCHITECTURES
from pipeline.errors import SpecError
from pipeline.redact import redact
from pipeline.workers.dask_cluster import check_setting

#: Keys that carry secrets in fsspec/s3fs/gcsfs/adlfs storage options.
SECRET_KEYS = frozenset(
    {
        "key", "secret", "token", "password", "session_token", "aws_access_key_id",
        "aws_secret_access_key", "aws_session_token", "account_key", "sas_token", "client_secret",
        "connection_string", "credentials",
    }
)


class Strict(BaseModel):
    """Base of every spec section: frozen, unknown keys rejected."""


    model_config = ConfigDict(extra="forbid", frozen=True)


def check_storage_options(value: dict[str, Any]) -> dict[str, Any]:
    def walk(d: dict[str, Any], path: str) -> None:
        for k, v in d.items():
            if k.lower() in SECRET_KEYS:
                raise ValueError(
                    f"'{path}{k}' is a credential; credentials must not be written in a spec. Set them in "
                    "the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the standard "
                    "config files (~/.aws/credentials), or use an instance role"
                )
            if isinstance(v, dict):
                walk(v, f"{path}{k}.")

    walk(value, "")
    return value


class InputsSpec(Strict):
    url: str = Field(description="local path, file://, s3://bucket/prefix or any fsspec URL")
    patterns: list[str] = Field(default_factory=lambda: ["**/*"], min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    bands: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, min_length=1,
        description="source channels (0-based) the model sees, in its order, e.g. [3, 2, 1, 7]; absent → RGB "
                    "(1–4 channel images converted to red, green, blue)")
    value_range: tuple[float, float] | tuple[tuple[float, float], ...] | None = Field(
        default=None, description="input values mapped linearly to 0..255 (needed for int16/int32 inputs): one "
                                  "[low, high] for every band, or with inputs.bands one pair per selected band"
    )
    preview_bands: tuple[int, int, int] | None = Field(
        default=None, description="the preview's red, green, blue: positions in inputs.bands (0-based); "
                                  "default the first three")

    _storage = field_validator("storage_options")(check_storage_options)

    @field_validator("value_range")
    @classmethod
    def _range_ordered(cls, v):
        for pair in v if v and isinstance(v[0], tuple) else [v]:
            if pair is not None and not pair[0] < pair[1]:
                raise ValueError(f"must be [low, high] with low < high, got {list(pair)}")
        return v

    @model_validator(mode="after")
    def _ranges_per_band(self):
        if self.value_range and isinstance(self.value_range[0], tuple):
            if self.bands is None:
                raise ValueError(f"value_range gives {len(self.value_range)} [low, high] pairs, one per band, but "
                                 "inputs.bands is not set; list the bands they belong to, or give one pair")
            if len(self.value_range) != len(self.bands):
                raise ValueError(f"value_range gives {len(self.value_range)} [low, high] pairs for "
                                 f"{len(self.bands)} bands {self.bands}; give one pair per band, or one for all")
        n = 3 if self.bands is None else len(self.bands)
        if self.preview_bands is not None and not all(0 <= b < n for b in self.preview_bands):
            raise ValueError(f"preview_bands {list(self.preview_bands)} must be positions 0..{n - 1} of the "
                             f"{'selected bands ' + str(self.bands) if self.bands else 'RGB channels'}")
        return self

    @property
    def channels(self) -> int:
        """The channels the model sees: 3 (RGB) or one per selected band."""
        return 3 if self.bands is None else len(self.bands)


class ClassSpec(Strict):
    name: str = Field(min_length=1)
    color: tuple[int, int, int] | None = None

    @field_validator("color")
    @classmethod
    def _rgb(cls, v):
        if v is not None and not all(0 <= c <= 255 for c in v):
            raise ValueError(f"colour components must be in 0..255, got {list(v)}")
        return v


class MagnetSpec(Strict):
    scales: int | list[float] = Field(
        default=3, description="stages; stage s runs at pyramid level scales-1-s | the fractions of the image's "
                               "size of each stage, coarse to fine, the last 1 (e.g. [0.25, 0.6, 1.0])")
    replace: float = Field(default=0.75, gt=0, description="≤ 1: fraction of pixels replaced per stage; > 1: a count")
    median: int = Field(default=5, ge=1, le=63, description="median filter side of the error score (odd)")
    patches: float | None = Field(
        default=None, gt=0, description="MagNet-Fast: ≤ 1 a fraction, > 1 a count of tiles each refinement stage "
                                        "runs (the most uncertain); absent → every tile (MagNet)")
    refiner: str | list[str] | None = Field(
        default=None, description="refiner checkpoint URL, or one per refinement stage (scales − 1, in order: "
                                  "MagNet's Cityscapes model has three); absent → seeded weights")
    refiner_seed: int = Field(default=0, ge=0)
    refiner_width: int = Field(default=64, ge=4, le=256, description="width of a seeded refiner (no checkpoint)")
    procedure: Literal["gigaseg", "reference"] = Field(
        default="gigaseg", description="reference: the reference's test procedure, every option below at its "
                                       "reference value unless given")
    median_view: int | tuple[int, int] | Literal["stage", "tile"] | None = Field(
        default=None, description="where the error score is median-filtered: stage (at the stage's resolution; "
                                  "gigaseg) | tile (on a nearest-neighbour view the size of a tile, then back; the "
                                  "reference, whose view is its network input) | N or [H, W] (that view)")
    median_padding: Literal["edge", "zero"] | None = Field(
        default=None, description="the median's padding past the image: edge (gigaseg) | zero (reference)")
    crop: Literal["exact", "roi_align"] | None = Field(
        default=None, description="the coarse map a tile's refiner reads: exact (the upsampled map's window; "
                                  "gigaseg) | roi_align (torchvision roi_align, aligned=False: half a pixel down "
                                  "and right, edge clamped; reference)")
    stage0: Literal["tiled", "whole"] | None = Field(
        default=None, description="stage 0: tiled (gigaseg) | whole (one pass over the image at that scale, when "
                                  "it fits one tile; reference)")
    patch_choice: Literal["most_uncertain", "least_uncertain"] | None = Field(
        default=None, description="MagNet-Fast's tiles: most_uncertain (gigaseg, what the method means) | "
                                  "least_uncertain (what the reference's code does: torch.sort ascending)")

    @field_validator("median")
    @classmethod
    def _odd(cls, v):
        if v % 2 == 0:
            raise ValueError(f"must be odd, got {v}")
        return v

    @field_validator("scales", mode="before")
    @classmethod
    def _fractions(cls, v):
        form = "give a count of stages (2 to 12) or the fractions of the image's size, e.g. [0.25, 0.6, 1.0]"
        if isinstance(v, int) and not isinstance(v, bool):
            if not 2 <= v <= 12:
                raise ValueError(f"{form}; got {v} stages")
        elif isinstance(v, (list, tuple)) and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in v):
            v = [float(f) for f in v]
            if not 2 <= len(v) <= 12:
                raise ValueError(f"give 2 to 12 fractions of the image's size (one per stage), got {len(v)}")
            if not all(0 < f <= 1 for f in v) or v[-1] != 1.0:
                raise ValueError(f"fractions of the image's size must lie in (0, 1], the last 1 (the image), got {v}")
            if any(a >= b for a, b in pairwise(v)):
                raise ValueError(f"fractions must increase strictly, coarse to fine (e.g. [0.25, 0.6, 1.0]), got {v}")
        else:
            raise ValueError(f"{form}; got {v!r}")
        return v

    @field_validator("refiner")
    @classmethod
    def _refiners(cls, v, info):
        if isinstance(v, list):
            scales = info.data.get("scales", 3)
            scales = len(scales) if isinstance(scales, list) else scales
            if len(v) not in (1, scales - 1):
                raise ValueError(f"{len(v)} refiners for {scales - 1} refinement stages (scales: {scales}): give one "
                                 "for all stages or one per stage")
            return v[0] if len(v) == 1 else v
        return v

    @field_validator("median_view")
    @classmethod
    def _view(cls, v):
        sides = (v,) if isinstance(v, int) else v if isinstance(v, tuple) else ()
        if any(side < 1 for side in sides):
            raise ValueError(f"a view of at least 1 px a side, got {v}")
        return v


class FctlSpec(Strict):
    contexts: list[float] | None = Field(
        default=None, min_length=1, max_length=2,
        description="context factors c > 1 (a c·tile window around each tile): ×2/×4 read pyramid levels 1/2 as is; "
                    "default: the checkpoint's, else [2, 4]",
    )
    gamma: float = Field(default=0.0, description="initial γ of a seeded FCtL (no checkpoint); 0 = the local model")
    procedure: Literal["gigaseg", "reference"] = Field(
        default="gigaseg", description="reference: the reference's test procedure (flips and rotations) and, for a "
                                       "seeded FCtL, its architecture and ToTensor inputs; each option below overrides")
    tta: bool | None = Field(default=None, description="average the logits of the 8 flips/rotations of each tile "
                                                       "and its contexts (reference: on)")
    key_channels: int | None = Field(default=None, ge=1, le=1024,
                                     description="seeded FCtL: correlation key width (gigaseg C/8, reference C)")
    fusion: Literal["gated", "none"] | None = Field(
        default=None, description="seeded FCtL with one context: gated (self branch + fusion) or none (the "
                                  "reference's stage 2: x + γ·correlation)")
    shared_encoder: bool | None = Field(default=None, description="seeded FCtL: contexts through the local encoder "
                                                                  "(the reference's stage 2)")

    @field_validator("contexts")
    @classmethod
    def _factors(cls, v):
        if v is not None and (any(c <= 1 for c in v) or list(v) != sorted(set(v))):
            raise ValueError(f"context factors must be > 1 and increasing, got {v}")
        return v


#: The options section of each framework that has options, by ``model.framework`` (the spec's tagged union:
#: the section named by the tag is read, defaults filled in; any other section is an error naming it).
FRAMEWORK_SECTIONS: dict[str, type[Strict]] = {"magnet": MagnetSpec, "fctl": FctlSpec}


class NormalizationSpec(Strict):
    mean: list[float] = Field(min_length=1, description="per band, on value_scale")
    std: list[float] = Field(min_length=1, description="per band, on value_scale")
    value_scale: float = Field(default=1.0, gt=0, description="1: mean/std of pixel values in 0..1; 255: in 0..255")


class CardSpec(Strict):
    """Fields of a model card (``models.card``) that complete or override the card a model you bring carries
    (ONNX ``metadata_props``, a torch.export extra file or a ``<weights>.model.yaml`` sidecar); the classes are
    ``model.classes``."""

    bands: list[str] | None = Field(default=None, min_length=1, description="input bands in order (red, green, blue)")
    normalization: NormalizationSpec | None = None
    size_multiple: int | None = Field(default=None, ge=1, description="input height and width must be multiples")
    output: Literal["logits", "probabilities"] | None = None

    def fields(self) -> dict[str, Any]:
        """The given fields in the card's form (``models.card.parse_card``'s input)."""
        return self.model_dump(mode="json", exclude_none=True)


class ModelSpec(Strict):
    name: str | None = Field(
        default=None, description="registry name (models.ARCHITECTURES); default: the checkpoint's, else fpn_resnet18"
    )
    checkpoint: str | None = Field(
        default=None, description="the weights: a gigaseg safetensors checkpoint, an ONNX model (.onnx), a "
                                  "torch.export archive (.pt2), or safetensors weights for model.factory")
    factory: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'package.module:function' returning the torch.nn.Module that model.checkpoint's safetensors "
                    "weights load into (strictly); importable on the driver and every worker")
    card: CardSpec | None = Field(default=None, description="model card fields for a model you bring")
    classes: list[ClassSpec] | None = Field(
        default=None, description="class names/colours; required without a checkpoint, else must match it"
    )
    width: int = Field(default=64, ge=4, le=256, description="encoder base width for seeded models")
    seed: int = Field(default=0, ge=0, description="init seed when no checkpoint is given")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    framework: Literal["segment", "magnet", "fctl"] = Field(
        default="segment", description="segment: one pass at full resolution; magnet: coarse-to-fine refinement; "
                                       "fctl: each tile attends to context windows read from coarser levels"
    )
    magnet: MagnetSpec | None = Field(default=None, description="framework magnet's options (only with it)")
    fctl: FctlSpec | None = Field(default=None, description="framework fctl's options (only with it)")

    @model_validator(mode="before")
    @classmethod
    def _framework_defaults(cls, data):
        """The chosen framework's section with its defaults when the spec leaves it out."""
        if isinstance(data, dict):
            name = data.get("framework")
            if name in FRAMEWORK_SECTIONS and data.get(name) is None:
                data = {**data, name: {}}
        return data

    @field_validator(*FRAMEWORK_SECTIONS)
    @classmethod
    def _only_with_its_framework(cls, v, info):
        chosen = info.data.get("framework", "segment")
        if v is not None and chosen != info.field_name:
            raise ValueError(f"options of framework {info.field_name}, but model.framework is {chosen}; remove "
                             f"model.{info.field_name} or set model.framework: {info.field_name}")
        return v

    @field_validator("name")
    @classmethod
    def _registered(cls, v):
        if v is not None and v not in ARCHITECTURES:
            raise ValueError(f"unknown model {v!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
        return v

    @property
    def architecture(self) -> str:
        """The model to build when there is no checkpoint."""
        return self.name or "fpn_resnet18"

    @property
    def framework_options(self) -> dict[str, Any]:
        """The chosen framework's options (``pipeline.frameworks``' ``resolve``/``build`` read them)."""
        section = getattr(self, self.framework, None) if self.framework in FRAMEWORK_SECTIONS else None
        return section.model_dump(mode="json") if section is not None else {}

    @model_validator(mode="after")
    def _classes_given(self):
        if self.checkpoint is None and not self.classes:
            raise ValueError("without a checkpoint, 'classes' must list the class names (at least one)")
        if self.factory is not None and self.checkpoint is None:
            raise ValueError("model.factory needs model.checkpoint: the module's weights, as safetensors")
        if self.card is not None and self.checkpoint is None:
            raise ValueError("model.card completes the card of a model you bring (model.checkpoint); a seeded model "
                             "has its own")
        return self


class TilingSpec(Strict):
    tile: int = Field(default=512, ge=32, le=8192, description="a multiple of the model's size multiple (32 for "
                                                                "gigaseg's networks)")
    overlap: int = Field(default=128, ge=0)
    batch: int = Field(default=8, ge=1, le=1024)
    tiles_per_call: int | Literal["auto"] = Field(
        default="auto", description="tiles per worker call: a block of about this many tiles, run `batch` at a "
                                    "time; auto: blocks as large as 1 GiB of running sums allows, ≤ 16384 px")
    blend: Literal["gaussian", "cosine", "constant"] = "gaussian"
    sigma_scale: float = Field(default=0.125, gt=0, le=10)
    offset: tuple[int, int] = Field(default=(0, 0), description="grid origin shift (y, x) in pixels")
    margin: int = Field(default=64, ge=0, description="pixels tiles reach past the image edge (≤ overlap)")
    chunk: int = Field(default=1024, ge=64, le=16384, description="chunk side of the masks")
    image_chunk: int = Field(default=512, ge=64, le=16384, description="chunk side of ingested image pyramids")

    @model_validator(mode="after")
    def _geometry(self):
        if self.overlap >= self.tile:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile ({self.tile})")
        step = self.tile - self.overlap
        for v in self.offset:
            if not 0 <= v < step:
                raise ValueError(f"offset values must be in [0, tile - overlap = {step}), got {list(self.offset)}")
        if self.margin > self.overlap:
            raise ValueError(f"margin ({self.margin}) must not exceed overlap ({self.overlap})")
        if self.tiles_per_call != "auto" and not 1 <= self.tiles_per_call <= 65536:
            raise ValueError(f"tiles_per_call must be 'auto' or 1..65536, got {self.tiles_per_call}")
        # tile vs the network's stride: checked against the model (``jobs.plan.resolve_model``): 32 for gigaseg's
        # ResNet heads, any size for the reference architectures that resample by size (MagNet's 612 px patches)
        return self


Extra = Literal["confidence", "probabilities"]


class OutputSpec(Strict):
    url: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    extras: list[Extra] = Field(default_factory=list)
    if_exists: Literal["resume", "overwrite"] = "resume"
    label_name: str = Field(default="segmentation", pattern=r"^[A-Za-z0-9_.-]+$")

    _storage = field_validator("storage_options")(check_storage_options)


class ResourcesSpec(Strict):
    workers: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        default=2, description="Ray actors; 'auto': one per gpus_per_worker of the cluster's GPUs (CPUs when 0)"
    )
    gpus_per_worker: float = Field(default=1.0, ge=0, le=8)
    cpus_per_worker: float = Field(default=1.0, gt=0, le=256)
    torch_threads: int = Field(default=1, ge=1, le=256)
    in_flight_per_worker: int = Field(default=1, ge=1, le=64)


class ClusterSpec(Strict):
    address: str | None = Field(default=None, description="absent → embedded local Ray")
    dask: str | None = Field(
        default=None, description="where the label pyramid and MagNet's merges run: absent → Dask threads in the "
                                  "driver; 'ray' → a Dask "
                                  "cluster gigaseg starts on the Ray nodes; tcp://host:port → that Dask scheduler")
    local_gpus: int | None = Field(
        default=None, ge=0, description="logical GPUs of the embedded cluster (default: workers × gpus)"
    )


    @field_validator("dask")
    @classmethod
    def _dask(cls, v):
        check_setting(v)
        return v


class FailureSpec(Strict):
    mode: Literal["continue", "fail_fast"] = "continue"
    tile_retries: int = Field(default=2, ge=0, le=100)


class JobSpec(Strict):
    inputs: InputsSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    tiling: TilingSpec = Field(default_factory=TilingSpec)
    output: OutputSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)

    def echo(self) -> str:
        """The spec as YAML, as the run uses it (safe to log: it never holds credentials, and a presigned URL's
        signature is masked: ``pipeline.redact``)."""
        return redact(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to a raw spec mapping."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key.path=value")
            continue
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                problems.append(f"--set {item!r}: {p!r} is not a mapping")
                break
            node = nxt
        else:
            node[parts[-1]] = yaml.safe_load(raw) if raw else None
    if problems:
        raise SpecError("--set", problems)
    return data


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and place)"
        lines.append(f"{loc}: {msg}")
    return lines


def validate(model: type[BaseModel], data: Any, source: str = "spec"):
    """Validate a raw mapping as ``model``; every problem becomes one ``field.path: message`` line."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, _format_errors(err)) from None


def read_yaml(path: str | Path, overrides: list[str] | None = None) -> Any:
    """A YAML file with ``--set key.path=value`` overrides applied; unreadable files become ``SpecError``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found"]) from None
    except yaml.YAMLError as err:
        raise SpecError(str(path), [f"not valid YAML: {err}".replace("\n", " ")]) from None
    return apply_overrides(data if isinstance(data, dict) else {}, overrides) if overrides else data


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    return validate(JobSpec, data, source)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a YAML job spec."""
    return parse_spec(read_yaml(path, overrides), str(path))
