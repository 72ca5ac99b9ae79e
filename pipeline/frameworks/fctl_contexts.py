"""FCtL context windows read from the image pyramid: pure geometry plus the reads a worker makes per tile.

FCtL (Li et al., ACM MM 2021; github liqiokkk/FCtL) gives each local tile ``W`` (level 0, ``T × T``, origin ``(y0, x0)``) context views at
factors ``c > 1``: the ``c·T × c·T`` level-0 window centred on ``W``'s centre, zero-padded past the image,
resized to ``T × T``. Reading ``c·T`` level-0 pixels per context would cost ``c²`` times the tile, so a
context is read from the coarsest pyramid level that still spans the window with ``T`` pixels or more
(``context_level``)::

    l = clamp(⌊log2 c⌋, 0, n_levels − 1)

as a window of ``r = c·T / 2^l`` level-l pixels (``context_window``), and resized ``r → T`` only when
``r ≠ T``. ×2 and ×4 read levels 1 and 2 as they are; ×3 reads ``1.5·T`` level-1 pixels and resizes them
bilinearly with ``pipeline.reader.resize_image``, the resize the FCtL training crops use
(``pipeline.training.crops_fctl.FctlSampler``), so training and inference see the same pixels.

Only the chunks of level ``l`` under the part of the window inside the image are read; the rest is zeros
(``pipeline.reader.read_window`` with ``pad="constant"``), and a window wholly outside reads nothing.

Level ``l`` of an ingested pyramid is ``2^l``-fold 2×2 means of level 0 (``pipeline.pyramid``), so the
×2^l context equals the area-downsampled level-0 window up to the pyramid's rounding (≤ ½ grey level per
level) wherever the window is aligned to level-l pixels (``context_window`` says when).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.errors import UnsupportedImageError
from pipeline.reader import read_window, resize_image
from pipeline.sources.convert import ValueRange, out_channels
from pipeline.tiling import Window


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _check_factor(factor: float) -> None:
    if not factor > 1:
        raise ValueError(
            f"FCtL context factor must be > 1 (a c·T window around a T tile), got {factor}; the ×1 view is the "
            "local tile itself, so leave it out of the factors."
        )


def context_level(factor: float, n_levels: int) -> int:
    """``l = clamp(⌊log2 c⌋, 0, n_levels − 1)``: the coarsest level that still holds the ``c·T`` window at
    ``T`` pixels or more, so a context is never upsampled (unless the pyramid stops early).

    ×2 → 1, ×3 → 1 (then resampled ``1.5·T → T``), ×4 → 2, ×8 with 3 levels → 2 (``2·T → T``).
    """
    _check_factor(factor)
    if n_levels < 1:
        raise ValueError(f"a pyramid has ≥ 1 level, got n_levels={n_levels}")
    return min(max(math.floor(math.log2(factor) + 1e-9), 0), n_levels - 1)


def context_levels(factors: Sequence[float], n_levels: int) -> tuple[int, ...]:
    """The distinct ``context_level`` of ``factors``, ascending: the level arrays ``read_contexts`` needs."""
    return tuple(sorted({context_level(c, n_levels) for c in factors}))


def context_window(window: Window, factor: float, level: int) -> Window:
    """The level-``level`` window of the context at ``factor`` around the level-0 ``window`` (``h × w``).

    Per axis, with ``s = 2^l`` and ``⟦x⟧ = ⌊x + ½⌋`` (round half up, ties towards +∞)::

        r      = max(1, ⟦c·h / s⟧)               size in level-l pixels
        centre = (y0 + h/2) / s                  the tile's centre in level-l coordinates
        origin = ⟦centre − r/2⟧

    When ``c·h/s`` is an integer, ``centre − r/2 = o₀/s`` with ``o₀ = y0 + h/2 − c·h/2`` the origin of the
    exact level-0 window, so the window is exact (covers the same level-0 pixels as the ``c·h`` window)
    iff ``s`` divides ``o₀``. For ``c = 2^l`` that is ``o₀ = y0 − (c − 1)·h/2``: e.g. with ``h = 64`` any
    ``y0 ≡ 0 (mod 4)`` is exact for ×2 and ×4; with ``h = 508`` ×4 needs ``y0 ≡ 2 (mod 4)``. Otherwise the
    window is the level-l pixel window nearest the exact one, its centre off by at most half a level-l
    pixel (``2^(l−1)`` level-0 pixels), a tie (``o₀/s`` ending in ½) going towards +∞ (down/right). The
    window may reach past the image: ``read_context`` zero-fills it there.
    """
    _check_factor(factor)
    if level < 0:
        raise ValueError(f"pyramid level must be ≥ 0, got {level}")
    s = 2**level
    out = []
    for start, size in ((window.y0, window.h), (window.x0, window.w)):
        r = max(1, _round_half_up(factor * size / s))
        out.append((_round_half_up((start + size / 2) / s - r / 2), r))
    (y0, h), (x0, w) = out
    return Window(y0, x0, h, w)


def read_context(
    array,
    axes: str,
    shape_yx: tuple[int, int],
    window: Window,
    out_size: int,
    value_range: ValueRange | None = None,
    bands: tuple[int, ...] | None = None,
) -> np.ndarray:
    """uint8 ``(C, out_size, out_size)`` (RGB, or the ``bands`` selected): ``window`` of one level (``shape_yx``), zeros past the image,
    resized bilinearly (``reader.resize_image``) from ``r × r`` to ``out_size²`` only when ``r ≠ out_size``.

    Only the chunks under ``window.clip(*shape_yx)`` are read; an empty clip reads nothing.
    """
    if window.h != window.w:
        raise ValueError(f"context windows are square; got {window.h}×{window.w} at ({window.y0}, {window.x0})")
    block = read_window(array, axes, shape_yx, window, pad="constant", value_range=value_range, bands=bands)
    return resize_image(block, out_size)


def check_power_of_two(shapes: Sequence[tuple[int, int]], levels: Sequence[int]) -> None:
    """Raise unless each of ``levels`` has ``H_l ∈ {⌊H₀/2^l⌋, ⌈H₀/2^l⌉}`` and ``W_l ∈ {⌊W₀/2^l⌋, ⌈W₀/2^l⌉}``:
    the context geometry maps level-0 pixels to level l by ``/ 2^l``."""
    h0, w0 = shapes[0]
    for level in levels:
        s = 2**level
        ok = all(n in (size // s, -(-size // s)) for n, size in zip(shapes[level], (h0, w0), strict=True))
        if not ok:
            raise UnsupportedImageError(
                f"pyramid level {level} is {shapes[level]} px but level 0 is {shapes[0]}: FCtL contexts need a "
                f"power-of-two pyramid (level l = level 0 / 2^l, here about ({h0 / s:g}, {w0 / s:g})); "
                "ingest the image (pipeline.pyramid.ingest) instead of reading this pyramid in place."
            )


def read_contexts(
    arrays_by_level: Mapping[int, object],
    shapes: Sequence[tuple[int, int]],
    axes: str,
    window: Window,
    factors: Sequence[float],
    tile: int,
    value_range: ValueRange | None = None,
    bands: tuple[int, ...] | None = None,
) -> np.ndarray:
    """The FCtL contexts of the level-0 tile ``window``: ``(len(factors), C, tile, tile)`` uint8 (``C``: 3, or one
    per selected band).

    Context ``i`` is ``read_context`` of level ``l = context_level(factors[i], len(shapes))`` at
    ``context_window(window, factors[i], l)``. ``arrays_by_level`` maps each of ``context_levels(factors,
    len(shapes))`` to its level array (axes ``axes``); ``shapes`` are the (H, W) of every pyramid level.
    """
    if window.h != window.w:
        raise ValueError(f"FCtL tiles are square; got a {window.h}×{window.w} window at ({window.y0}, {window.x0})")
    levels = [context_level(c, len(shapes)) for c in factors]
    check_power_of_two(shapes, sorted(set(levels)))
    out = np.empty((len(factors), out_channels(bands), tile, tile), np.uint8)
    for i, (factor, level) in enumerate(zip(factors, levels, strict=True)):
        if level not in arrays_by_level:
            raise KeyError(
                f"context ×{factor:g} reads pyramid level {level}, but arrays_by_level holds levels "
                f"{sorted(arrays_by_level)}; open every level of context_levels(factors, n_levels) = "
                f"{context_levels(factors, len(shapes))}"
            )
        out[i] = read_context(arrays_by_level[level], axes, shapes[level], context_window(window, factor, level),
                              tile, value_range, bands)
    return out


__all__ = [
    "check_power_of_two", "context_level", "context_levels", "context_window", "read_context", "read_contexts",
]
