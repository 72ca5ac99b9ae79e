"""Counter-based randomness for the synthetic archive: every value is a pure function of integer keys.

No generator state exists, so a pixel's value cannot depend on which chunk, window or order computed it.
``hash_u64(seed, stream, *keys)`` is splitmix64's finaliser chained over the keys; floats come from its top
bits. Only exactly rounded IEEE operations (+, −, ×, /, floor, comparisons) touch the results, never
``sin``/``exp`` whose vectorised implementations may differ in the last bit between array layouts.
"""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix_int(z: int) -> int:
    """splitmix64 on a Python int (for the per-call start value; numpy scalars would warn on overflow)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on a uint64 array (at least 1-D: wrapping is silent there)."""
    z = z + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _as_u64(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.uint64:
        return np.atleast_1d(a)
    return np.atleast_1d(a.astype(np.int64)).view(np.uint64)  # negatives wrap: keys stay distinct


def hash_u64(seed: int, stream: int, *keys) -> np.ndarray:
    """uint64 hash of ``(seed, stream, key_0, key_1, …)``, keys broadcast together (integer arrays).

    ``h_0 = mix(seed·P + stream)``, ``h_{i+1} = mix(h_i ⊕ key_i)`` with splitmix64's ``mix``.
    """
    start = np.uint64(_mix_int((seed * 0x100000001B3 + stream) & _MASK))
    h = np.broadcast_arrays(*(_as_u64(k) for k in keys))
    out = np.full(h[0].shape, start, np.uint64)
    for k in h:
        out = _mix(out ^ k)
    return out


def uniform(seed: int, stream: int, *keys) -> np.ndarray:
    """float64 in ``[0, 1)`` from the top 53 bits of ``hash_u64``."""
    return (hash_u64(seed, stream, *keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def integers(seed: int, stream: int, low: int, high: int, *keys) -> np.ndarray:
    """int64 in ``[low, high]`` (both ends included), uniform up to a 2⁻⁶⁴ bias."""
    span = np.uint64(high - low + 1)
    return (hash_u64(seed, stream, *keys) % span).astype(np.int64) + low


def value_noise(seed: int, stream: int, y0: int, x0: int, h: int, w: int, scale: int) -> np.ndarray:
    """Smooth noise in ``[-0.5, 0.5)`` on the window ``[y0, y0+h) × [x0, x0+w)``: ``(h, w)`` float32.

    Lattice values ``v(i, j) = uniform(i, j) − ½`` at multiples of ``scale``; pixel ``(y, x)`` blends the four
    around it bilinearly with smoothstep weights ``s(t) = t²(3 − 2t)``, ``t = (y mod scale) / scale``.
    """
    ys, xs = np.arange(y0, y0 + h), np.arange(x0, x0 + w)
    gy0, gx0 = y0 // scale, x0 // scale
    gy = np.arange(gy0, (y0 + h - 1) // scale + 2)
    gx = np.arange(gx0, (x0 + w - 1) // scale + 2)
    lattice = (uniform(seed, stream, gy[:, None], gx[None, :]) - 0.5).astype(np.float32)
    iy, ix = ys // scale - gy0, xs // scale - gx0
    ty, tx = (ys % scale) / scale, (xs % scale) / scale
    wy = (ty * ty * (3 - 2 * ty)).astype(np.float32)[:, None]
    wx = (tx * tx * (3 - 2 * tx)).astype(np.float32)[None, :]
    top = lattice[iy][:, ix] * (1 - wx) + lattice[iy][:, ix + 1] * wx
    bottom = lattice[iy + 1][:, ix] * (1 - wx) + lattice[iy + 1][:, ix + 1] * wx
    return top * (1 - wy) + bottom * wy


def pixel_noise(seed: int, stream: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Independent per-pixel noise in ``[-0.5, 0.5)`` on a window: ``(h, w)`` float32."""
    ys, xs = np.arange(y0, y0 + h)[:, None], np.arange(x0, x0 + w)[None, :]
    return ((hash_u64(seed, stream, ys, xs) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)) - 0.5


__all__ = ["hash_u64", "integers", "pixel_noise", "uniform", "value_noise"]
