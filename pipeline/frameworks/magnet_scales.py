"""MagNet's scales as any list of sizes (the reference's ``--scales``, github VinAIResearch/MagNet ``test.py``):
``model.magnet.scales`` as the fractions ``f_s`` of the image's size, coarse to fine, the last 1.

Stage ``s`` is ``round(H₀·f_s) × round(W₀·f_s)`` px (half up). A fraction ``2^-l`` of a pyramid that has level
``l`` (of ``⌊H₀/2^l⌋`` or ``⌈H₀/2^l⌉`` rows, the same for columns), or a size that is a level's, runs on that
level as it is (the count form ``scales: n`` is ``[2^-(n-1), …, ½, 1]``). Any other stage's image is the coarsest
level at least as large (``⌊−log₂ f⌋`` in a pyramid of halves, or its last level) resized bilinearly
(``F.interpolate(mode="bilinear", align_corners=False)`` without antialias, ``reader.resize_index``; rounded half
up to uint8), written as a Zarr array ``image`` in the stage's maps group before its tiles run, one task per chunk
that reads only its source window (one pixel more), so no process holds a whole image. The previous stage's map
is resized the same way by the ratio of the two stages' sizes (``row_reader.upsample2x_rows``; exactly ×2
between adjacent pyramid levels, as before).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.frameworks.base import StagePlan
from pipeline.plan import ArrayRef
from pipeline.pyramid import Pyramid
from pipeline.reader import read_region, resize_index
from pipeline.sources.convert import out_channels, to_uint8
from pipeline.storage import zarr_store
from pipeline.tiling import Window

#: The array of a resized stage's maps group holding its image, and the attribute marking it complete.
IMAGE = "image"
_DONE = "gigaseg_resized_from"


@dataclass(frozen=True)
class StageScale:
    """Where stage ``s``'s image comes from: pyramid ``level``, read as it is (``exact``) or resized to ``shape``."""

    level: int
    shape: tuple[int, int]
    exact: bool


def stage_scales(config, pyramid: Pyramid) -> list[StageScale]:
    """Each stage's ``StageScale`` on ``pyramid`` (``config``: a ``MagnetConfig``). The count form reads its levels
    (the caller checks the pyramid has them)."""
    shapes = [tuple(s) for s in pyramid.shapes]
    levels = config.levels()
    if isinstance(config.scales, int):
        return [StageScale(lv, shapes[lv], True) for lv in levels]
    h0, w0 = shapes[0]
    out = []
    for f, level in zip(config.scales, levels, strict=True):
        size = (math.floor(h0 * f + 0.5), math.floor(w0 * f + 0.5))
        halved = f == 2.0**-level and all(abs(n - m * f) < 1 for n, m in zip(shapes[min(level, len(shapes) - 1)],
                                                                           (h0, w0), strict=True))
        if level < len(shapes) and halved:
            out.append(StageScale(level, shapes[level], True))
        else:
            finer = [lv for lv in range(min(level, len(shapes) - 1) + 1)
                     if shapes[lv][0] >= size[0] and shapes[lv][1] >= size[1]]
            source = max(finer, default=0)
            out.append(StageScale(source, size, size == shapes[source]))
    return out


@dataclass(frozen=True)
class ResizedStage(StagePlan):
    """A stage whose ``image`` (``IMAGE`` in its maps group) is ``source``, a pyramid level, resized
    (``make_image`` writes it before the stage's tiles run)."""

    source: ArrayRef | None = None
    image_chunk: int = 512


def resized_image_ref(pyramid: Pyramid, maps_url: str, shape: tuple[int, int], storage_options) -> ArrayRef:
    """The resized image as workers read it: ``(C, h, w)`` uint8 (``C`` the channels the pyramid's readers give;
    its bands, if selected, already picked, in order)."""
    bands = None if pyramid.bands is None else tuple(range(len(pyramid.bands)))
    return ArrayRef(maps_url, IMAGE, "cyx", tuple(shape), dict(storage_options), bands=bands)


def _resize_chunk(source: ArrayRef, dst: ArrayRef, window: Window) -> None:
    """Write ``window`` of the resized image: read the source rows and columns it samples, resize, round."""
    (sh, sw), (dh, dw) = source.shape_yx, dst.shape_yx
    ry0, ry1, wy = resize_index(window.y0, window.h, sh, dh)
    rx0, rx1, wx = resize_index(window.x0, window.w, sw, dw)
    y0, y1, x0, x1 = int(ry0.min()), int(ry1.max()) + 1, int(rx0.min()), int(rx1.max()) + 1
    src = to_uint8(read_region(source.open(), source.axes, Window(y0, x0, y1 - y0, x1 - x0)), source.value_range,
                   source.bands).astype(np.float32)
    rows = src[:, ry0 - y0] * (1 - wy)[None, :, None] + src[:, ry1 - y0] * wy[None, :, None]
    out = rows[:, :, rx0 - x0] * (1 - wx)[None, None, :] + rows[:, :, rx1 - x0] * wx[None, None, :]
    array = zarr.open_array(store=zarr_store(dst.group_url, dst.storage_options), path=dst.path, mode="r+")
    array[:, window.y0 : window.y1, window.x0 : window.x1] = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def make_image(stage: ResizedStage, chunk: int, scheduler: Any = "threads") -> None:
    """Write ``stage``'s resized image (chunks ``chunk`` px a side, one Dask task each), unless a complete one
    of the same source and size is there (a resumed job)."""
    import dask

    dst, source = stage.image, stage.source
    key = json.dumps({"source": f"{source.group_url}/{source.path}", "shape": list(source.shape_yx),
                      "size": list(dst.shape_yx)})
    group = zarr.open_group(store=zarr_store(dst.group_url, dst.storage_options), mode="a")
    if IMAGE in group and group[IMAGE].attrs.get(_DONE) == key:
        return
    h, w = dst.shape_yx
    c = out_channels(source.bands)
    array = group.create_array(IMAGE, shape=(c, h, w), chunks=(c, min(chunk, h), min(chunk, w)), dtype="uint8",
                               fill_value=0, overwrite=True)
    tasks = [dask.delayed(_resize_chunk)(source, dst, Window(y, x, min(chunk, h - y), min(chunk, w - x)))
             for y in range(0, h, chunk) for x in range(0, w, chunk)]
    dask.compute(*tasks, scheduler=scheduler)
    array.attrs[_DONE] = key


__all__ = ["IMAGE", "ResizedStage", "StageScale", "make_image", "resized_image_ref", "stage_scales"]
