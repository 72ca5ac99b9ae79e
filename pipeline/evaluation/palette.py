"""Colour-coded masks → class ids.

Many datasets ship ground truth as RGB images where each class has a colour. ``decode_palette`` maps them
to class ids; ``PALETTES`` names the known palettes (``--palette deepglobe``).

DeepGlobe Land Cover (Demir et al., CVPR-W 2018) masks are RGB PNGs whose colours were blurred by JPEG-like
compression at the edges; its rule is "binarise each mask channel at 128, then map colours to classes",
i.e. ``bit_k = channel_k ≥ 128`` and the colour is the 3-bit word ``(r, g, b)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Color = tuple[int, int, int]

DEEPGLOBE_CLASSES: list[tuple[str, Color]] = [
    ("unknown", (0, 0, 0)),
    ("urban", (0, 255, 255)),
    ("agriculture", (255, 255, 0)),
    ("rangeland", (255, 0, 255)),
    ("forest", (0, 255, 0)),
    ("water", (0, 0, 255)),
    ("barren", (255, 255, 255)),
]
"""DeepGlobe Land Cover classes in id order: ``(name, (r, g, b))``. Id 0 "unknown" is left out of the
challenge's mIoU (mIoU over ids 1–6)."""

PALETTES: dict[str, list[tuple[str, Color]]] = {"deepglobe": DEEPGLOBE_CLASSES}


def get_palette(name: str) -> list[tuple[str, Color]]:
    """``(name, colour)`` per class of a named palette; an unknown name raises listing the valid ones."""
    try:
        return PALETTES[name]
    except KeyError:
        raise ValueError(f"unknown palette {name!r}; valid palettes: {sorted(PALETTES)}.") from None


def decode_palette(
    rgb: np.ndarray,
    colors: Sequence[tuple[int, int, int]],
    threshold: int = 128,
    unknown: int = 255,
) -> np.ndarray:
    """Class ids ``(h, w)`` uint8 of a colour-coded mask ``rgb`` ``(h, w, 3)`` uint8 (an alpha channel is dropped).

    Class ``i`` has colour ``colors[i]``. When every palette component is 0 or 255 (a binary palette, like
    DeepGlobe's), each channel is binarised first, ``bit = channel ≥ threshold``, so blurred or
    lossily-compressed edges still map to the nearest corner of the RGB cube; otherwise colours must match
    exactly. Pixels matching no colour get ``unknown`` (use it as the ignore index).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"decode_palette expects an (h, w, 3) RGB array, got shape {rgb.shape}.")
    if rgb.dtype != np.uint8:
        raise ValueError(f"decode_palette expects uint8 colours, got {rgb.dtype}; convert the mask to 8-bit RGB.")
    table = _check_colors(colors)
    if not 0 <= unknown <= 255:
        raise ValueError(f"unknown={unknown} does not fit the uint8 class ids; choose a value in 0..255.")
    if unknown < len(table):
        raise ValueError(
            f"unknown={unknown} is also the id of class {unknown} (colour {tuple(table[unknown])}); pick an id ≥ "
            f"{len(table)} (255 by default) so unmatched pixels stay distinguishable."
        )
    r, g, b = (rgb[..., k] for k in range(3))
    if np.isin(table, (0, 255)).all():
        if not 1 <= threshold <= 255:
            raise ValueError(f"threshold={threshold} must be in 1..255.")
        lut = np.full(8, unknown, np.uint8)
        bits = (table[:, 0] // 255) * 4 + (table[:, 1] // 255) * 2 + table[:, 2] // 255
        lut[bits] = np.arange(len(table), dtype=np.uint8)
        t = np.uint8(threshold)
        word = (r >= t).astype(np.uint8) * 4 + (g >= t).astype(np.uint8) * 2 + (b >= t).astype(np.uint8)
        return lut[word]
    keys = table[:, 0].astype(np.uint32) << 16 | table[:, 1].astype(np.uint32) << 8 | table[:, 2]
    order = np.argsort(keys)
    sorted_keys = keys[order]
    word = r.astype(np.uint32) << 16 | g.astype(np.uint32) << 8 | b
    pos = np.minimum(np.searchsorted(sorted_keys, word), len(keys) - 1)
    hit = sorted_keys[pos] == word
    return np.where(hit, order[pos], unknown).astype(np.uint8)


def _check_colors(colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    table = np.asarray(colors, dtype=np.int64).reshape(-1, 3) if len(colors) else np.zeros((0, 3), np.int64)
    if not 1 <= len(table) <= 255 or np.asarray(colors, dtype=object).shape != (len(table), 3):
        raise ValueError(
            f"colors must be 1..255 (r, g, b) triples (class id = position), got {len(colors)} entries "
            f"{list(colors)[:4]}{'...' if len(colors) > 4 else ''}."
        )
    if ((table < 0) | (table > 255)).any():
        raise ValueError(f"palette colours must be 0..255 integers, got {[tuple(c) for c in table.tolist()]}.")
    keys = [tuple(c) for c in table.tolist()]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"palette colours {dupes} are given to more than one class; each colour must be unique.")
    return table


def default_colors(n: int) -> list[tuple[int, int, int]]:
    """A fixed, distinguishable palette (tab10-like, then golden-angle hues)."""
    base = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    out = base[:n]
    for i in range(len(out), n):
        h = (i * 0.618033988749895) % 1.0
        out.append(tuple(int(255 * max(0.0, min(1.0, abs(h * 6 - k) - 1))) for k in (3, 2, 4)))
    return out
