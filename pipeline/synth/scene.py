"""Geometry of the synthetic scene: regions, rims, roads and buildings as pure functions of ``(seed, y, x)``.

Everything here takes integer coordinate arrays ``ys``, ``xs`` that broadcast together (``(h, 1)`` and
``(1, w)`` for a window, or two 1-D arrays of scattered points) and returns values of their broadcast shape.
A point's value depends only on the hashed features near it, never on the other points asked about, which is
what makes the archive chunk-boundary independent. See ``pipeline.synth`` for the class table and why.

* Regions: Voronoi cells of one feature point per ``region_size`` grid cell, placed in the cell's central
  60 %, so a point's nearest feature lies in its own or an adjacent grid cell and every feature within
  ``cap ≪ region_size`` of a cell boundary lies within two grid cells. The kind of a region is hashed from
  its grid cell; its look (tint, stripe angle/period/phase) from another hash stream, independent of the kind.
* Rims: a field region's pixels closer than ``rim_width`` to its own Voronoi boundary are its rim: a hedge
  for ``field-hedged``, a bare verge for ``field-open``. Distance to the boundary of the cell of ``p`` is
  ``min_q (|x−q|² − |x−p|²) / (2|q−p|)`` over the other features ``q`` (distance to each bisector).
* Roads: straight segments between the nodes of a ``road_spacing`` lattice jittered by ±spacing/16 (slope
  ≤ 1/7), each segment present with ``road_density``, ``w ∈ road_width`` px wide: pixels with distance to the
  segment < ``w/2``.
* Buildings: one candidate square per ``building_cell`` grid cell, ``s ∈ building_size`` px, inside its cell,
  kept when it lies in a bare region (≥ 0.75·s + 2 px from its boundary) and ≥ 0.75·s + 2 px from any road.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synth.hash import hash_u64, integers, uniform

BARE, FOREST, FIELD_OPEN, FIELD_HEDGED, HEDGE, ROAD, BUILDING = range(7)
REGION_KINDS = np.array([BARE, FOREST, FIELD_OPEN, FIELD_HEDGED], np.uint8)
REGION_MIX = np.cumsum([0.2, 0.2, 0.3, 0.3])[:-1]  # thresholds on a uniform: bare, forest, open, hedged
RIM_OF = {FIELD_OPEN: BARE, FIELD_HEDGED: HEDGE}

# hash streams: one per independent decision, so no two decisions share bits
S_POINT_Y, S_POINT_X, S_KIND, S_LOOK, S_NODE_Y, S_NODE_X, S_ROAD, S_WIDTH, S_BUILDING = range(1, 10)


@dataclass(frozen=True)
class Cells:
    """Region feature points around a window, in row-major grid order (the order breaks distance ties)."""

    gy: np.ndarray  # (K,) int64 grid row
    gx: np.ndarray  # (K,) int64 grid column
    py: np.ndarray  # (K,) float64 feature y
    px: np.ndarray  # (K,) float64 feature x
    kind: np.ndarray  # (K,) uint8 region class


@dataclass(frozen=True)
class Scene:
    labels: np.ndarray  # uint8 class ids
    region: np.ndarray  # int64 index into cells
    cells: Cells
    building: np.ndarray  # bool, building pixels


def _span(a) -> tuple[int, int]:
    a = np.asarray(a)
    return int(np.floor(a.min())), int(np.ceil(a.max()))


def region_cells(cfg, y_lo: int, y_hi: int, x_lo: int, x_hi: int, margin: int = 2) -> Cells:
    """Feature points of the grid cells covering ``[y_lo, y_hi] × [x_lo, x_hi]`` plus ``margin`` cells around."""
    r = cfg.region_size
    gy, gx = np.meshgrid(np.arange(y_lo // r - margin, y_hi // r + margin + 1),
                         np.arange(x_lo // r - margin, x_hi // r + margin + 1), indexing="ij")
    gy, gx = gy.ravel(), gx.ravel()
    py = (gy + 0.2 + 0.6 * uniform(cfg.seed, S_POINT_Y, gy, gx)) * r
    px = (gx + 0.2 + 0.6 * uniform(cfg.seed, S_POINT_X, gy, gx)) * r
    kind = REGION_KINDS[np.searchsorted(REGION_MIX, uniform(cfg.seed, S_KIND, gy, gx), side="right")]
    return Cells(gy, gx, py, px, kind)


def boundary_cap(cfg) -> int:
    """Boundary and road distances are exact below this many px and clipped to it above."""
    return max(cfg.rim_width, cfg.building_size[1]) + 4


def regions(cfg, ys, xs) -> tuple[np.ndarray, np.ndarray, Cells]:
    """``(index into cells of the nearest feature, distance to that Voronoi cell's boundary ≤ cap, cells)``."""
    shape = np.broadcast_shapes(np.shape(ys), np.shape(xs))
    cells = region_cells(cfg, *_span(ys), *_span(xs))
    ys, xs = np.asarray(ys, np.float64), np.asarray(xs, np.float64)
    best = np.full(shape, np.inf)
    second = np.full(shape, np.inf)
    idx = np.zeros(shape, np.int64)
    for k in range(len(cells.py)):
        d2 = (ys - cells.py[k]) ** 2 + (xs - cells.px[k]) ** 2
        np.minimum(second, np.maximum(best, d2), out=second)
        np.putmask(idx, d2 < best, k)  # strict: the first feature in grid order wins a tie
        np.minimum(best, d2, out=best)
    cap = boundary_cap(cfg)
    dist = np.full(shape, float(cap))
    # (F2 − F1)/2 bounds the boundary distance from below: only this band needs the exact bisectors
    band = np.nonzero(np.sqrt(second) - np.sqrt(best) < 2 * cap)
    if band[0].size:
        y, x = np.broadcast_to(ys, shape)[band], np.broadcast_to(xs, shape)[band]
        p, dp2 = idx[band], best[band]
        t = np.full(p.shape, float(cap))
        for k in range(len(cells.py)):
            sep = np.sqrt((cells.py[k] - cells.py[p]) ** 2 + (cells.px[k] - cells.px[p]) ** 2)  # not hypot: libm
            dq2 = (y - cells.py[k]) ** 2 + (x - cells.px[k]) ** 2
            with np.errstate(divide="ignore", invalid="ignore"):
                np.minimum(t, np.where(p == k, np.inf, (dq2 - dp2) / (2 * sep)), out=t)
        dist[band] = t
    return idx, dist, cells


def road_clearance(cfg, ys, xs) -> np.ndarray:
    """Distance past the nearest road's edge, ``min over segments of (d − w/2)``, clipped to ``boundary_cap``:
    negative on a road."""
    shape = np.broadcast_shapes(np.shape(ys), np.shape(xs))
    cap = float(boundary_cap(cfg))
    (y_lo, y_hi), (x_lo, x_hi) = _span(ys), _span(xs)
    s, jitter = cfg.road_spacing, cfg.road_spacing / 16
    j, i = np.meshgrid(np.arange(y_lo // s - 2, y_hi // s + 3), np.arange(x_lo // s - 2, x_hi // s + 3), indexing="ij")
    ny = j * s + s / 2 + jitter * (2 * uniform(cfg.seed, S_NODE_Y, j, i) - 1)
    nx = i * s + s / 2 + jitter * (2 * uniform(cfg.seed, S_NODE_X, j, i) - 1)
    out = np.full(shape, cap)
    ys, xs = np.asarray(ys, np.float64), np.asarray(xs, np.float64)
    for direction, (a, b) in enumerate([(np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])]):
        keys = (j[a], i[a], direction)
        present = uniform(cfg.seed, S_ROAD, *keys) < cfg.road_density
        width = integers(cfg.seed, S_WIDTH, *cfg.road_width, *keys)
        for ay, ax, by, bx, w in zip(ny[a][present], nx[a][present], ny[b][present], nx[b][present], width[present]):
            reach = w / 2 + cap
            if min(ay, by) - reach > y_hi or max(ay, by) + reach < y_lo or \
                    min(ax, bx) - reach > x_hi or max(ax, bx) + reach < x_lo:
                continue
            dy, dx = by - ay, bx - ax
            ry, rx = ys - ay, xs - ax
            t = np.clip((ry * dy + rx * dx) / (dy * dy + dx * dx), 0.0, 1.0)
            np.minimum(out, np.sqrt((ry - t * dy) ** 2 + (rx - t * dx) ** 2) - w / 2, out=out)
    return np.minimum(out, cap)


def _building_params(cfg, cy, cx) -> tuple[np.ndarray, ...]:
    """``(present, size, y offset, x offset)`` of the candidate square of building cell ``(cy, cx)``."""
    lo, hi = cfg.building_size
    h = hash_u64(cfg.seed, S_BUILDING, cy, cx)  # four 16-bit fields: presence, size, y offset, x offset
    bits = [((h >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.int64) for k in range(4)]
    size = lo + bits[1] % (hi - lo + 1)
    room = cfg.building_cell - size - 3  # offsets 2 … cell − size − 2 keep a square inside its cell
    return bits[0] < cfg.building_density * 65536, size, 2 + bits[2] % room, 2 + bits[3] % room


def buildings(cfg, ys, xs, bare: np.ndarray) -> np.ndarray:
    """Building pixels (bool, broadcast shape); ``bare`` marks the points in bare regions."""
    cell = cfg.building_cell
    ys, xs = np.asarray(ys), np.asarray(xs)
    cy, cx = ys // cell, xs // cell
    present, size, oy, ox = _building_params(cfg, cy, cx)
    ry, rx = ys - cy * cell - oy, xs - cx * cell - ox
    inside = present & (ry >= 0) & (ry < size) & (rx >= 0) & (rx < size) & bare
    if not inside.any():
        return inside
    where = np.nonzero(inside)
    keys = np.stack([np.broadcast_to(cy, inside.shape)[where], np.broadcast_to(cx, inside.shape)[where]])
    (ky, kx), inverse = np.unique(keys, axis=1, return_inverse=True)
    _, s, oy, ox = _building_params(cfg, ky, kx)
    centre_y, centre_x = ky * cell + oy + (s - 1) / 2, kx * cell + ox + (s - 1) / 2
    idx, dist, cells = regions(cfg, centre_y, centre_x)
    need = 0.75 * s + 2  # > half the diagonal: the whole square is bare and off the road
    keep = (cells.kind[idx] == BARE) & (dist > need) & (road_clearance(cfg, centre_y, centre_x) > need)
    inside[where] = keep[inverse.ravel()]
    return inside


def scene(cfg, ys, xs) -> Scene:
    """Class ids of the points (see the module doc), with what the image needs to paint them."""
    idx, dist, cells = regions(cfg, ys, xs)
    kind = cells.kind[idx]
    labels = kind.copy()
    rim = dist < cfg.rim_width
    for field, rim_class in RIM_OF.items():
        labels[rim & (kind == field)] = rim_class
    labels[road_clearance(cfg, ys, xs) < 0] = ROAD
    building = buildings(cfg, ys, xs, kind == BARE)
    labels[building] = BUILDING
    return Scene(labels, idx, cells, building)
