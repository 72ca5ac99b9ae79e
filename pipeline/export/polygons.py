"""A mask as polygons, one per connected region of a class (4-connected: pixels sharing an edge), written chunk by
chunk and merged across chunk borders, so memory does not grow with the image.

The sweep (row-major over chunks of ``chunk`` px):

1. Chunk (r, c) is polygonised on its own (``rasterio.features.shapes``): exact pixel-edge polygons ("pieces") in
   level-0 pixel coordinates (x right, y down), each with a global id; the pieces are rasterised back to ids.
2. Seams: a piece and a piece of the chunk above (its last row, kept from then) or to the left (its last column)
   belong to one region when a pixel of each, side by side across the seam, has the same class. Such ids are
   united (union-find); a region's pieces stay separate geometries until it is complete.
3. A region is complete once none of its pieces touches a chunk edge whose neighbour is still to come (its
   "pending" edges: the bottom and right edges of each piece's chunk, resolved when that neighbour is read). It is
   then emitted: its pieces' outer rings unioned (exact: integer coordinates), their holes added back,
   simplified (Douglas–Peucker with topology kept, ``tolerance`` in pixels; 0 drops only collinear vertices),
   mapped to the CRS by the image's transform (pixel coordinates when it has none), and forgotten.

A piece's holes lie inside its chunk, where no other piece of the region can reach, so they are holes of the
region too: they are kept aside as int32 coordinates (8 bytes a vertex) and never enter the union, which then
only merges outer rings along the seams.

Memory holds one chunk, the seam rows of one chunk row, and the regions crossing the sweep: those not complete
yet. A region as large as the image (a connected background) is held until the end, as in any polygoniser
(GDAL's too); ``exclude`` leaves classes out (the nodata label always is). ``pixels`` is the region's exact pixel
count (its area before simplification, in px²).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.optional import require


@dataclass(frozen=True)
class Region:
    """A complete region: ``geometry`` (shapely, level-0 pixel coordinates unless mapped), its class and pixel count."""

    geometry: object
    value: int
    pixels: int


class _Regions:
    """Union-find over piece ids; a root holds its pieces, class, pixel count and pending edges."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.pieces: dict[int, list[tuple[int, object]]] = {}  # root → [(id, outer ring as a polygon)]
        self.holes: dict[int, list[np.ndarray]] = {}  # root → its pieces' holes, (n, 2) int32 coordinates
        self.value: dict[int, int] = {}
        self.pixels: dict[int, int] = {}
        self.pending: dict[int, set[tuple[str, int, int]]] = {}
        self.on_edge: dict[tuple[str, int, int], list[int]] = {}  # edge → ids of the pieces touching it

    def add(self, pid: int, shell, holes: list[np.ndarray], value: int, pixels: int, edges: set) -> None:
        self.parent[pid] = pid
        self.pieces[pid] = [(pid, shell)]
        self.holes[pid] = holes
        self.value[pid], self.pixels[pid], self.pending[pid] = value, pixels, set(edges)
        for edge in edges:
            self.on_edge.setdefault(edge, []).append(pid)

    def find(self, pid: int) -> int:
        root = pid
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[pid] != root:  # path compression
            self.parent[pid], pid = root, self.parent[pid]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if len(self.pieces[ra]) < len(self.pieces[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.pieces[ra].extend(self.pieces.pop(rb))
        self.holes[ra].extend(self.holes.pop(rb))
        self.pixels[ra] += self.pixels.pop(rb)
        self.pending[ra] |= self.pending.pop(rb)
        del self.value[rb]

    def resolve(self, edge: tuple[str, int, int]) -> set[int]:
        """``edge`` has been read across: drop it from its regions' pending edges; their roots."""
        roots = set()
        for pid in self.on_edge.pop(edge, ()):
            root = self.find(pid)
            self.pending[root].discard(edge)
            roots.add(root)
        return roots

    def pop_complete(self, roots: Iterable[int]) -> Iterator[tuple[list[object], list[np.ndarray], int, int]]:
        """The regions among ``roots`` with no pending edge, removed: (outer rings, holes, class, pixels)."""
        for root in {self.find(r) for r in roots}:
            if self.pending[root]:
                continue
            members = self.pieces.pop(root)
            for pid, _ in members:
                del self.parent[pid]
            del self.pending[root]
            yield [p for _, p in members], self.holes.pop(root), self.value.pop(root), self.pixels.pop(root)


def polygonize(labels, chunk: int = 1024, exclude: Sequence[int] = (), tolerance: float = 0.0) -> Iterator[Region]:
    """The regions of a ``(H, W)`` integer label array (anything sliceable: a zarr array, numpy), in pixel
    coordinates, read ``chunk`` × ``chunk`` at a time (module docstring). Classes in ``exclude`` give no region."""
    require("shapely", "gigaseg export-masks --to polygons")
    rasterio = require("rasterio", "gigaseg export-masks --to polygons")
    with rasterio.Env():  # one GDAL environment for the whole sweep, not one per call
        yield from _sweep(labels, chunk, exclude, tolerance)


def _sweep(labels, chunk: int, exclude: Sequence[int], tolerance: float) -> Iterator[Region]:
    import shapely
    from rasterio import features
    from rasterio.transform import Affine

    h, w = (int(n) for n in labels.shape)
    n_rows, n_cols = -(-h // chunk), -(-w // chunk)
    regions = _Regions()
    next_id = 1
    bottom: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # column → (labels, ids) of the last row of the chunk above
    right: tuple[np.ndarray, np.ndarray] | None = None  # (labels, ids) of the last column of the chunk to the left
    excluded = np.asarray(sorted(set(exclude)), dtype=np.int64)
    for r in range(n_rows):
        y0, y1 = r * chunk, min((r + 1) * chunk, h)
        for c in range(n_cols):
            x0, x1 = c * chunk, min((c + 1) * chunk, w)
            block = np.ascontiguousarray(labels[y0:y1, x0:x1])
            keep = ~np.isin(block, excluded) if excluded.size else None
            origin = Affine.translation(x0, y0)
            shapes = [] if keep is not None and not keep.any() else list(
                features.shapes(_shapeable(block), mask=keep, connectivity=4, transform=origin))
            ids = np.zeros(block.shape, np.int64)
            touched = set()
            if shapes:
                local = features.rasterize(((g, i + 1) for i, (g, _) in enumerate(shapes)), out_shape=block.shape,
                                           transform=origin, fill=0, dtype="uint32")
                for i, (geom, value) in enumerate(shapes):
                    rings = geom["coordinates"]
                    shell = shapely.Polygon(rings[0])
                    holes = [np.asarray(ring, np.int32) for ring in rings[1:]]
                    pixels = shell.area - sum(shapely.Polygon(h).area for h in holes)
                    _, _, maxx, maxy = shell.bounds
                    edges = set()
                    if maxy == y1 and r + 1 < n_rows:
                        edges.add(("b", r, c))
                    if maxx == x1 and c + 1 < n_cols:
                        edges.add(("r", r, c))
                    regions.add(next_id + i, shell, holes, int(value), int(round(pixels)), edges)
                    touched.add(next_id + i)
                ids = np.where(local > 0, local.astype(np.int64) + (next_id - 1), 0)
                next_id += len(shapes)
            if r > 0:
                _join(regions, *bottom.pop(c), block[0], ids[0])
            if c > 0 and right is not None:
                _join(regions, *right, block[:, 0], ids[:, 0])
            touched |= regions.resolve(("b", r - 1, c)) | regions.resolve(("r", r, c - 1))
            for shells, holes, value, pixels in regions.pop_complete(touched):
                outer = shells[0] if len(shells) == 1 else shapely.union_all(shells)
                geometry = shapely.Polygon(outer.exterior, [*outer.interiors, *holes]) if holes else outer
                # tolerance 0 only drops collinear vertices, which cannot break topology: plain Douglas-Peucker, a
                # third of the memory of the topology-preserving one on a large region
                yield Region(shapely.simplify(geometry, tolerance, preserve_topology=tolerance > 0), value, pixels)
            if r + 1 < n_rows:
                bottom[c] = (block[-1].copy(), ids[-1].copy())
            right = (block[:, -1].copy(), ids[:, -1].copy())
    assert not regions.pieces, "every region is complete once the last chunk is read"


def _join(regions: _Regions, labels_a: np.ndarray, ids_a: np.ndarray, labels_b: np.ndarray, ids_b: np.ndarray) -> None:
    """Unite the regions of side-by-side pixels across a seam that have the same class."""
    same = (labels_a == labels_b) & (ids_a > 0) & (ids_b > 0)
    if same.any():
        for a, b in np.unique(np.stack([ids_a[same], ids_b[same]], 1), axis=0):
            regions.union(int(a), int(b))


def _shapeable(block: np.ndarray) -> np.ndarray:
    """``rasterio.features.shapes`` takes uint8/uint16/int16/int32/float32 only."""
    return block if block.dtype in (np.uint8, np.uint16, np.int16, np.int32) else block.astype(np.int32)


def to_crs(geometry, transform: Sequence[float] | None):
    """``geometry`` from level-0 pixel coordinates to the CRS by ``transform`` (a, b, c, d, e, f); as is without."""
    from shapely import affinity

    if transform is None:
        return geometry
    a, b, c, d, e, f = transform
    return affinity.affine_transform(geometry, [a, b, d, e, c, f])


__all__ = ["Region", "polygonize", "to_crs"]
