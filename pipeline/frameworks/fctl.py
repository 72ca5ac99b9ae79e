"""Framework ``fctl``: FCtL's locality-aware contextual correlation (Li et al., ACM MM 2021; github liqiokkk/FCtL).

One stage at full resolution, as ``segment``; each tile also reads its context windows, for each context factor
``c`` the ``c·T`` window centred on it, from the coarsest pyramid level that still holds it at ``T`` pixels
(``Contexts``; the geometry is ``pipeline.frameworks.fctl_contexts``). The model is an FCtL checkpoint
(``gigaseg train`` task fctl, stage fused; or the reference's, ``gigaseg import-checkpoint --from fctl``), or a
seeded one; its output is blended like any tile's. ``procedure: reference`` runs the reference's test: each tile
and its contexts in the 8 flips and rotations, their logits averaged (``tta``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from models import ModelConfig, build_model
from models.errors import CheckpointError
from models.fctl import FctlConfig
from models.fctl_checkpoint import is_fctl_checkpoint, read_fctl_info, seeded_fctl
from models.info import TO_TENSOR_NORMALIZATION
from models.tta import dihedral_mean
from pipeline.errors import ImageReadError, SpecError
from pipeline.frameworks.base import Framework, ModelSource, OpenArray, Resolution, StagePlan
from pipeline.frameworks.fctl_contexts import check_power_of_two, context_level, context_levels, context_window
from pipeline.reader import resize_image
from pipeline.row_reader import LevelRows, image_rows
from pipeline.frameworks.segment import image_stage
from pipeline.frameworks.segmenters import check_in_channels, kind_of
from pipeline.output.layout import ImageOutput
from pipeline.plan import ArrayRef, TilingPlan, WeightsRef
from pipeline.pyramid import Pyramid
from pipeline.tiling import Window
from pipeline.workers.predictor import DeviceConfig, TilePredictor

DEFAULT_CONTEXTS = (2.0, 4.0)
#: A seeded FCtL's contexts with ``procedure: reference``: the reference scripts' (main branch: ×2 and ×3).
REFERENCE_CONTEXTS = (2.0, 3.0)


@dataclass(frozen=True)
class Contexts:
    """A tile input: FCtL's context windows ``(B, n, C, T, T)`` uint8 of each tile, at ``factors`` (``C``: the
    image's channels as the tiles see them, RGB or the selected bands).

    ``levels[l]`` is level ``l`` of the image pyramid, for every level up to the coarsest a context reads; only
    those ``context_levels`` are opened. A block reads each context level a row window at a time over the columns
    all its tiles' contexts span (``row_reader.LevelRows``, zeros past the level): each chunk is decoded once per
    block, not once per tile, and the windows are cut on the device.
    """

    factors: tuple[float, ...]
    levels: tuple[ArrayRef, ...]

    def open_rows(self, open_array: OpenArray, image: ArrayRef, tile: int, x_lo: int, x_hi: int,
                  shared: dict) -> ContextRows:
        return ContextRows(self, open_array, image, tile, x_lo, x_hi)


class ContextRows:
    """One block's context reader (``Contexts``): per tile row, one row window of each context level."""

    def __init__(self, contexts: Contexts, open_array: OpenArray, image: ArrayRef, tile: int, x_lo: int,
                 x_hi: int) -> None:
        shapes = tuple(ref.shape_yx for ref in contexts.levels)
        check_power_of_two(shapes, context_levels(contexts.factors, len(shapes)))
        self.image, self.tile = image, tile
        self.factors = [(c, context_level(c, len(shapes))) for c in contexts.factors]
        ends = (Window(0, x_lo, tile, tile), Window(0, x_hi - tile, tile, tile))  # the block's first and last column
        self.rows: dict[int, LevelRows] = {}
        self.x0: dict[int, int] = {}
        for level in sorted({lv for _, lv in self.factors}):
            spans = [context_window(w, c, level) for c, lv in self.factors if lv == level for w in ends]
            x0, x1 = min(s.x0 for s in spans), max(s.x1 for s in spans)
            ref = contexts.levels[level]
            self.rows[level] = image_rows(open_array(ref), ref.axes, ref.shape_yx, x0, x1, ref.value_range, ref.bands,
                                          pad="constant")
            self.x0[level] = x0

    def read(self, windows: list[Window]) -> tuple[dict[int, np.ndarray], list]:
        """Per level the row window all contexts of the tile row lie in; per factor where its windows are in it
        (``r = T``) or, for a factor that needs resizing (``r ≠ T``), the resized windows themselves."""
        try:
            spans = [[context_window(w, c, level) for w in windows] for c, level in self.factors]
            slabs, tops = {}, {}
            for level, rows in self.rows.items():
                mine = [s[0] for s, (_, lv) in zip(spans, self.factors) if lv == level]
                tops[level] = min(s.y0 for s in mine)
                slabs[level] = rows.rows(tops[level], max(s.y1 for s in mine))
            items = []
            for (_, level), wins in zip(self.factors, spans):
                dy, x0 = wins[0].y0 - tops[level], self.x0[level]
                if wins[0].h == self.tile:
                    items.append((level, dy, [w.x0 - x0 for w in wins]))
                else:  # a factor like ×3: its r×r window resized on the host, as the training crops are
                    slab = slabs[level]
                    items.append(np.stack([resize_image(slab[:, dy : dy + w.h, w.x0 - x0 : w.x1 - x0], self.tile)
                                           for w in wins]))
            return slabs, items
        except Exception as err:  # name the image and the tiles: the decoder's own message says neither
            raise ImageReadError(
                f"{self.image.group_url}: cannot read the FCtL contexts of tiles y {windows[0].y0}:{windows[0].y1}, "
                f"x {windows[0].x0}:{windows[-1].x1}: {type(err).__name__}: {err}") from err

    def to_device(self, host, windows: list[Window], runner) -> torch.Tensor:
        slabs, items = host
        used = {item[0] for item in items if isinstance(item, tuple)}
        dev = {level: runner.upload(slabs[level]) for level in used}
        t, out = self.tile, []
        for item in items:
            if isinstance(item, tuple):
                level, dy, xs = item
                out.append(torch.stack([dev[level][:, dy : dy + t, x : x + t] for x in xs]))
            else:
                out.append(runner.upload(item))
        return torch.stack(out, dim=1)


class FctlModel:
    """``TileModel``: the FCtL network on each tile and its contexts; with ``tta`` the softmax of the mean logits
    of the 8 flips and rotations of the tile and its contexts (``models.tta``, the reference's test)."""

    def __init__(self, predictor: TilePredictor, tta: bool = False) -> None:
        self.predictor, self.runner, self.device = predictor, predictor.runner, predictor.device
        self.tta = tta

    @torch.inference_mode()
    def __call__(self, stage: int, tiles: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        (contexts,) = inputs
        if not self.tta:
            return self.predictor.probabilities(tiles, contexts)
        b, n = contexts.shape[:2]
        ctx = self.runner.input(contexts.reshape(b * n, *contexts.shape[2:]))  # normalised as TilePredictor does
        ctx = ctx.reshape(b, n, *ctx.shape[1:])
        return torch.softmax(dihedral_mean(self.predictor.logits, self.runner.input(tiles), ctx), dim=1)


@dataclass(frozen=True)
class Fctl(Framework):
    model: WeightsRef
    contexts: tuple[float, ...]
    tta: bool = False

    name: ClassVar[str] = "fctl"

    @classmethod
    def resolve(cls, options: Mapping[str, Any], source: ModelSource) -> Resolution:
        wanted = options.get("contexts")
        reference = options.get("procedure") == "reference"
        tta = reference if options.get("tta") is None else options["tta"]
        kind = kind_of(source)
        if kind != "gigaseg":
            raise SpecError("model.framework", [
                f"model.framework: fctl but {source.checkpoint_url} is a model you bring ({kind}): FCtL's correlation "
                "runs on the encoder features of gigaseg's own networks, which such a model does not expose; use "
                "model.framework: segment or magnet, or train an FCtL model with gigaseg train (task fctl)"])
        if source.checkpoint is None:
            contexts = tuple(wanted or (REFERENCE_CONTEXTS if reference else DEFAULT_CONTEXTS))
            data = seeded_fctl(source.architecture, len(source.class_names), list(source.class_names),
                               contexts=contexts, seed=source.seed, width=source.width, gamma=options["gamma"],
                               **_seeded_variant(options, source, contexts, reference),
                               in_channels=source.in_channels)
            return Resolution(read_fctl_info(data)[0], {"model": data}, {"contexts": contexts, "tta": tta})
        if not is_fctl_checkpoint(source.checkpoint):
            raise SpecError("model.framework", [
                f"model.framework: fctl but {source.checkpoint_url} holds a plain segmenter; point model.checkpoint "
                "at the fused FCtL checkpoint of `gigaseg train` (task fctl), or drop it to run a seeded FCtL"])
        try:
            info, config = read_fctl_info(source.checkpoint)
        except CheckpointError as err:
            raise SpecError("model.checkpoint", [f"model.checkpoint: {source.checkpoint_url}: {err}"]) from None
        check_in_channels(info.config.in_channels, source)
        if wanted is not None and tuple(wanted) != config.contexts:
            raise SpecError("model.fctl.contexts", [
                f"model.fctl.contexts: {list(wanted)} but {source.checkpoint_url} was trained with contexts "
                f"{list(config.contexts)}; omit model.fctl.contexts or use those"])
        for field in ARCHITECTURE_OPTIONS:
            if options.get(field) is not None and options[field] != getattr(config, field):
                raise SpecError(f"model.fctl.{field}", [
                    f"model.fctl.{field}: {options[field]} but {source.checkpoint_url} has {getattr(config, field)} "
                    f"(it shapes a seeded FCtL only); omit model.fctl.{field}"])
        return Resolution(info, {"model": source.checkpoint}, {"contexts": config.contexts, "tta": tta})

    @classmethod
    def build(cls, options: Mapping[str, Any], weights: Mapping[str, WeightsRef], resolution: Resolution) -> Fctl:
        return cls(weights["model"], resolution.details["contexts"], resolution.details.get("tta", False))

    def fingerprint(self) -> dict[str, Any]:
        tta = {"tta": True} if self.tta else {}  # absent when off: outputs of earlier versions still resume
        return {"framework": self.name, "checkpoint": self.model.sha256, "contexts": list(self.contexts), **tta}

    def levels(self, n_levels: int) -> set[int]:
        return {0, *range(max(context_levels(self.contexts, n_levels)) + 1)}

    def stages(self, pyramid: Pyramid, out: ImageOutput, tiling: TilingPlan, num_classes: int) -> list[StagePlan]:
        needed = context_levels(self.contexts, pyramid.n_levels)
        check_power_of_two(pyramid.shapes, needed)
        levels = tuple(pyramid.level_ref(lv) for lv in range(max(needed) + 1))
        return [image_stage(0, pyramid, 0, out, tiling, num_classes, (Contexts(self.contexts, levels),))]

    def load(self, read: Callable[[str], bytes], device: DeviceConfig) -> FctlModel:
        return FctlModel(TilePredictor(read(self.model.url), device), self.tta)


#: ``model.fctl`` options that shape a seeded FCtL (a checkpoint has its own).
ARCHITECTURE_OPTIONS = ("key_channels", "fusion", "shared_encoder")


def _seeded_variant(options: Mapping[str, Any], source: ModelSource, contexts: tuple[float, ...],
                    reference: bool) -> dict[str, Any]:
    """A seeded FCtL's architecture and inputs: gigaseg's (key width C/8, gated fusion, own context encoders,
    ImageNet normalisation) or, with ``procedure: reference``, the reference's (key width C; with one context its
    stage-2 model: no fusion, the local encoder shared; ToTensor inputs); each ``model.fctl`` option overrides."""
    one = len(contexts) == 1
    fusion = options.get("fusion") or ("none" if reference and one else "gated")
    shared = options.get("shared_encoder")
    key = options.get("key_channels")
    if key is None and reference:
        with torch.device("meta"):  # C: the deepest encoder map's channels
            key = build_model(ModelConfig(source.architecture, len(source.class_names), width=source.width)
                              ).encoder.out_channels[-1]
    variant = {"key_channels": key, "fusion": fusion, "shared_encoder": reference and one if shared is None else shared,
               "normalization": TO_TENSOR_NORMALIZATION if reference else None}
    try:
        FctlConfig(ModelConfig(source.architecture, len(source.class_names), width=source.width), contexts, key,
                   fusion, variant["shared_encoder"])
    except ValueError as err:
        raise SpecError("model.fctl", [f"model.fctl: {err}"]) from None
    return variant


__all__ = ["ARCHITECTURE_OPTIONS", "DEFAULT_CONTEXTS", "REFERENCE_CONTEXTS", "ContextRows", "Contexts", "Fctl",
           "FctlModel"]
