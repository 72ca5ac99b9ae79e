"""The rules that turn an image block into what a model sees: uint8, channel-first ``(C, h, w)``.

Two paths, chosen by ``bands`` (``inputs.bands``):

- ``bands`` None (the default): RGB, ``(3, h, w)``, by the channel rule below (``to_rgb8``);
- ``bands`` a tuple of 0-based source channel indices: those channels in that order, ``(len(bands), h, w)``,
  each mapped to uint8 by the value rule below with its own ``value_range`` when one pair per band is given
  (``to_bands8``). No channel is combined, replicated or dropped but by the selection.

uint8 per band keeps the pyramid, the upload and the model input one byte per band on both paths.

Channels of the RGB path (the ``C`` axis of a ``(C, h, w)`` block):

- 1 channel (gray) → replicated to R, G and B.
- 2 channels (gray + alpha) → gray replicated to R, G and B; alpha dropped.
- 3 channels (RGB) → as is.
- 4 channels (RGBA) → alpha dropped, **not** composited over a background.
- any other count → ``UnsupportedImageError`` (multi-spectral images need ``inputs.bands``).

Values (each band alike; on the band path ``value_range`` may also be one ``(lo, hi)`` per selected band):

- ``value_range=(lo, hi)`` given, any numeric dtype → linear map ``lo → 0``, ``hi → 255``:
  ``out = floor((v − lo) / (hi − lo) · 255 + 0.5)`` clipped to [0, 255] (NaN → 0).
- otherwise by dtype:

  - ``uint8`` → as is.
  - ``uint16`` → ``round(v / 257)`` over the full 16-bit range, i.e. ``(v + 128) // 257``
    (exact: 0 → 0, 65535 → 255).
  - ``float16/32/64`` → assumed in [0, 1]: ``floor(v · 255 + 0.5)`` clipped to [0, 255] (NaN → 0).
  - other integers (``int8``, ``int16``, ``uint32``, ``int32``, ``int64``, ``uint64``) → no implied range:
    ``value_range`` is required.
  - ``bool``, complex and everything else → ``UnsupportedImageError``.

``check_convertible`` applies the same rule to metadata only, so a bad image fails when it is opened,
not in the middle of a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import UnsupportedImageError

SUPPORTED_CHANNELS = (1, 2, 3, 4)
_RANGE_REQUIRED_KINDS = "iu"  # integer dtypes other than uint8/uint16

#: One ``(lo, hi)`` for every band, or (band path only) one pair per selected band.
ValueRange = tuple[float, float] | tuple[tuple[float, float], ...]


def out_channels(bands: Sequence[int] | None) -> int:
    """The channels a conversion returns: 3 (RGB) without ``bands``, else one per selected band."""
    return 3 if bands is None else len(bands)


def is_per_band(value_range: Any) -> bool:
    """Whether ``value_range`` is one ``(lo, hi)`` per band rather than one pair."""
    return value_range is not None and len(value_range) > 0 and isinstance(value_range[0], (list, tuple))


def check_convertible(
    dtype: np.dtype | str,
    channels: int,
    value_range: ValueRange | None = None,
    *,
    where: str = "image",
    bands: Sequence[int] | None = None,
) -> None:
    """Raise ``UnsupportedImageError`` if a ``(channels, h, w)`` block of ``dtype`` has no conversion (RGB, or
    the ``bands`` selected).

    ``where`` names the image (its URL) in the message.
    """
    dt = np.dtype(dtype)
    if bands is not None:
        _check_bands(bands, channels, value_range, where)
        ranges = value_range if is_per_band(value_range) else [value_range] * len(bands)
        for band, vr in zip(bands, ranges, strict=True):
            _check_values(dt, vr, f"{where} (band {band})")
        return
    if is_per_band(value_range):
        raise UnsupportedImageError(
            f"{where}: inputs.value_range gives {len(value_range)} ranges, one per band, but inputs.bands is not "
            f"set; list the bands they belong to in inputs.bands, or give one [low, high] pair."
        )
    if channels not in SUPPORTED_CHANNELS:
        raise UnsupportedImageError(
            f"{where}: {channels} channels cannot be converted to RGB; accepted are 1 (gray), 2 (gray+alpha), "
            f"3 (RGB) or 4 (RGBA). To feed other channels, pick them with inputs.bands (0-based, in the order "
            f"the model takes them, e.g. [3, 2, 1])."
        )
    _check_values(dt, value_range, where)


def _check_bands(bands: Sequence[int], channels: int, value_range: ValueRange | None, where: str) -> None:
    if not bands or any(not isinstance(b, (int, np.integer)) or b < 0 for b in bands):
        raise UnsupportedImageError(f"{where}: inputs.bands must be 0-based channel indices, got {list(bands)}.")
    over = [int(b) for b in bands if b >= channels]
    if over:
        raise UnsupportedImageError(
            f"{where}: inputs.bands {list(bands)} asks for channel(s) {over}, but the image has {channels} "
            f"channel(s) (0..{channels - 1}); pick bands the image has."
        )
    if is_per_band(value_range) and len(value_range) != len(bands):
        raise UnsupportedImageError(
            f"{where}: inputs.value_range gives {len(value_range)} ranges for {len(bands)} bands "
            f"({list(bands)}); give one [low, high] per band, or one pair for all."
        )


def _check_values(dt: np.dtype, value_range: Sequence[float] | None, where: str) -> None:
    """The value rule (module docstring) for one band, or every channel of the RGB path."""
    if value_range is not None:
        _check_range(value_range, where)
        if dt.kind not in "uif":
            raise UnsupportedImageError(
                f"{where}: dtype {dt} is not numeric, so inputs.value_range cannot map it to uint8; "
                f"convert the image to an integer or float dtype."
            )
        return
    if _is_uint(dt, 1) or _is_uint(dt, 2) or dt.kind == "f":
        return
    if dt.kind in _RANGE_REQUIRED_KINDS:
        raise UnsupportedImageError(
            f"{where}: dtype {dt} has no implied display range; set inputs.value_range to the (low, high) "
            f"values that should map to 0 and 255 (e.g. [0, 4095] for 12-bit data)."
        )
    raise UnsupportedImageError(
        f"{where}: dtype {dt} cannot be converted to RGB uint8 (accepted: uint8, uint16, float, or any "
        f"integer dtype with inputs.value_range set)."
    )


def _is_uint(dt: np.dtype, itemsize: int) -> bool:
    """Unsigned integer of ``itemsize`` bytes in either byte order (Zarr v2 arrays are often ``>u2``)."""
    return dt.kind == "u" and dt.itemsize == itemsize


def _check_range(value_range: Sequence[float], where: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise UnsupportedImageError(
            f"{where}: inputs.value_range must be two numbers (low, high), got {value_range!r}."
        ) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise UnsupportedImageError(
            f"{where}: inputs.value_range {value_range!r} must be finite with high > low."
        )
    return lo, hi


def _select_channels(block: np.ndarray) -> np.ndarray:
    """``(C, h, w)`` → ``(1, h, w)`` gray or ``(3, h, w)`` colour, alpha dropped."""
    c = block.shape[0]
    if c in (1, 2):
        return block[:1]
    if c in (3, 4):
        return block[:3]
    raise UnsupportedImageError(
        f"block of shape {block.shape}: {c} channels cannot be converted to RGB (accepted: 1, 2, 3, 4)."
    )


def _scale_to_uint8(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``floor((v − lo)/(hi − lo)·255 + 0.5)`` clipped to [0, 255], NaN → 0."""
    x = (v.astype(np.float64) - lo) * 255.0
    x /= hi - lo  # divide last: exact for integer inputs at half steps (a factor 255/(hi-lo) would round)
    x += 0.5
    np.nan_to_num(x, copy=False, nan=0.0)
    np.clip(x, 0.0, 255.0, out=x)
    return np.floor(x).astype(np.uint8)


def to_rgb8(block: np.ndarray, value_range: Sequence[float] | None = None) -> np.ndarray:
    """Convert ``block`` ``(C, h, w)`` of any supported dtype to ``(3, h, w)`` uint8 (rule: module docstring).

    The result is C-contiguous; when no conversion is needed (uint8 RGB) it may share memory with ``block``,
    which is never modified.
    """
    if block.ndim != 3:
        raise UnsupportedImageError(f"to_rgb8 expects a (C, h, w) block, got shape {block.shape}.")
    check_convertible(block.dtype, block.shape[0], value_range, where=f"block of shape {block.shape}")
    sel = _select_channels(block)
    if value_range is not None:
        lo, hi = _check_range(value_range, "block")
        out = _scale_to_uint8(sel, lo, hi)
    elif _is_uint(sel.dtype, 1):
        out = sel.view(np.uint8)
    elif _is_uint(sel.dtype, 2):
        out = ((sel.astype(np.uint32) + 128) // 257).astype(np.uint8)
    else:  # float, checked above
        out = _scale_to_uint8(sel, 0.0, 1.0)
    if out.shape[0] == 1:
        out = np.broadcast_to(out, (3, *out.shape[1:]))
    return np.ascontiguousarray(out)


def _band_to_uint8(band: np.ndarray, value_range: Sequence[float] | None) -> np.ndarray:
    """One ``(h, w)`` band to uint8 by the value rule (module docstring)."""
    if value_range is not None:
        lo, hi = _check_range(value_range, "band")
        return _scale_to_uint8(band, lo, hi)
    if _is_uint(band.dtype, 1):
        return band.view(np.uint8)
    if _is_uint(band.dtype, 2):
        return ((band.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return _scale_to_uint8(band, 0.0, 1.0)


def to_bands8(block: np.ndarray, bands: Sequence[int], value_range: ValueRange | None = None) -> np.ndarray:
    """``block`` ``(C, h, w)`` → ``(len(bands), h, w)`` uint8: channel ``bands[i]`` as output channel ``i``, mapped
    by ``value_range`` (one pair for all, or ``value_range[i]`` for band ``i``) or its dtype's rule. C-contiguous;
    ``block`` is never modified."""
    if block.ndim != 3:
        raise UnsupportedImageError(f"to_bands8 expects a (C, h, w) block, got shape {block.shape}.")
    check_convertible(block.dtype, block.shape[0], value_range, where=f"block of shape {block.shape}", bands=bands)
    if value_range is None and _is_uint(block.dtype, 1):
        return np.ascontiguousarray(block.view(np.uint8)[list(bands)])
    ranges = value_range if is_per_band(value_range) else [value_range] * len(bands)
    out = np.empty((len(bands), *block.shape[1:]), np.uint8)
    for i, (band, vr) in enumerate(zip(bands, ranges, strict=True)):
        out[i] = _band_to_uint8(block[band], vr)
    return out


def to_uint8(block: np.ndarray, value_range: ValueRange | None = None,
             bands: Sequence[int] | None = None) -> np.ndarray:
    """What a model sees of ``block`` ``(C, h, w)``: ``to_rgb8`` without ``bands`` (bit for bit), else
    ``to_bands8``."""
    if bands is None:
        return to_rgb8(block, value_range)
    return to_bands8(block, bands, value_range)
