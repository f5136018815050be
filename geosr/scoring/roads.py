"""Road connectivity: road graphs from masks or vectors, compared by an APLS-style path-length similarity.

Pipeline:

1. **Mask.** :func:`road_mask` is a heuristic (no learning): dark, unsaturated pixels (relative to the scene)
   that the land-cover heuristic calls neither vegetation nor water, cleaned by morphology on a grid of about
   ``road_pixel_m``. It finds asphalt, not roads: parking lots and dark roofs pass too (on the SpaceNet Vegas
   sample, a strip mall, the HR image's graph scores APLS 0.15 against the true centrelines; on Zurich, with
   light-grey roads and dark roofs, it finds no roads at all). Both graphs of a comparison come from the same
   rule unless the reference is a vector layer (``--roads``).
2. **Graph.** The mask is skeletonised (``skimage.morphology.skeletonize``), every skeleton pixel becomes a node
   joined to its 8 neighbours (weight: distance in metres), dead ends shorter than ``road_spur_m`` are pruned,
   pieces shorter than ``road_min_length_m`` dropped, and dead ends near the raster's edge continued to it. Vector
   lines are noded at their crossings and densified. Either way the graph is a :mod:`networkx` graph whose nodes
   carry ``xy`` in the frame (:mod:`geosr.scoring.vectors`) and whose edges are at most about ``apls_dense_m``
   long.
3. **APLS** (Van Etten et al., SpaceNet 3; own implementation). Control points are placed on graph ``G``: every
   junction and dead end, and along each chain between them one about every ``apls_spacing_m``. Each is snapped to
   the nearest node of graph ``P`` within ``apls_snap_m``. For every pair ``(a, b)`` of control points joined in
   ``G`` by a path of length ``L``, the pair costs ``min(1, |L - L'| / L)`` where ``L'`` is the length of the
   shortest path in ``P`` between their snapped nodes, and 1 when either did not snap or ``P`` has no such path.
   ``half(G, P) = 1 - mean cost``; ``APLS = harmonic mean of half(ref, prop) and half(prop, ref)`` (missing
   roads are punished by the first, invented ones by the second). Identical graphs score 1 exactly.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- masks


def road_mask(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(H, W)`` bool: dark, unsaturated surfaces (the heuristic's road candidates).

    Relative to the scene: luma in the lowest 30 % of its 2-98 percentile range, saturation under 0.3, and not
    vegetation or water by the land-cover heuristic. Asphalt passes, and so do parking lots and dark roofs.
    """
    from ..conditioning.segmentation import VEGETATION, WATER
    from .semantic import segment

    x = rgb.astype(np.float32) / 255.0
    luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    lo, hi = np.percentile(luma, [2, 98])
    if hi - lo < 1e-3:  # a flat image: nothing tells a road from its surroundings
        return np.zeros(luma.shape, dtype=bool)
    top, bottom = x.max(axis=-1), x.min(axis=-1)
    saturation = (top - bottom) / (top + 1e-6)
    labels = segment(rgb)
    return (((luma - lo) / (hi - lo) < 0.3) & (saturation < 0.3) & (labels != VEGETATION) & (labels != WATER))


def _coarsen(mask: np.ndarray, f: int) -> np.ndarray:
    """Block majority over ``f`` x ``f`` px (the edge blocks cover what is left)."""
    if f == 1:
        return mask.copy()
    h, w = mask.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    padded = np.zeros((hp, wp), dtype=np.float32)
    padded[:h, :w] = mask
    return padded.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3)) > 0.5


def clean_mask(mask: np.ndarray, cell_m: float) -> np.ndarray:
    """Morphology in metres: drop strokes under ~3 m wide, fill car-sized holes, drop specks under 50 m²."""
    from scipy import ndimage
    from skimage import morphology

    r = max(1, int(round(1.5 / cell_m)))
    disk = morphology.disk(r)
    m = ndimage.binary_opening(mask, disk)
    m = ndimage.binary_closing(np.pad(m, r, mode="edge"), disk)[r:-r, r:-r]  # padded: no erosion at the edge
    m = morphology.remove_small_holes(m, max_size=max(1, int(30 / cell_m**2)))
    return morphology.remove_small_objects(m, max_size=max(1, int(50 / cell_m**2)))


# ------------------------------------------------------------------------------------------------ graphs


def _add_edge(g, a, b) -> None:
    pa, pb = g.nodes[a]["xy"], g.nodes[b]["xy"]
    g.add_edge(a, b, weight=float(math.hypot(pa[0] - pb[0], pa[1] - pb[1])))


def graph_from_skeleton(skeleton: np.ndarray, *, cell: tuple[float, float], offset: tuple[float, float] = (0, 0)):
    """``(h, w)`` bool skeleton -> networkx graph; node ``(r, c)`` at frame
    ``(offset_x + (c + 0.5) * cell_x, offset_y - (r + 0.5) * cell_y)``."""
    import networkx as nx

    g = nx.Graph()
    rows, cols = np.nonzero(skeleton)
    on = set(zip(rows.tolist(), cols.tolist()))
    for r, c in on:
        g.add_node((r, c), xy=(offset[0] + (c + 0.5) * cell[0], offset[1] - (r + 0.5) * cell[1]))
    for r, c in on:
        for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):
            if (r + dr, c + dc) in on:
                _add_edge(g, (r, c), (r + dr, c + dc))
    return g


def _chains(g):
    """Yield each chain (list of nodes) between nodes of degree != 2; a pure cycle starts anywhere."""
    seen = set()
    keys = [n for n in g if g.degree(n) != 2]
    for start in keys:
        for nb in g.neighbors(start):
            if frozenset((start, nb)) in seen:
                continue
            chain = [start, nb]
            seen.add(frozenset((start, nb)))
            while g.degree(chain[-1]) == 2:
                nxt = [n for n in g.neighbors(chain[-1]) if n != chain[-2]]
                if not nxt or frozenset((chain[-1], nxt[0])) in seen:
                    break
                seen.add(frozenset((chain[-1], nxt[0])))
                chain.append(nxt[0])
            yield chain
    for u, v in g.edges():  # cycles without any junction
        if frozenset((u, v)) in seen:
            continue
        chain = [u, v]
        seen.add(frozenset((u, v)))
        while True:
            nxt = [n for n in g.neighbors(chain[-1]) if n != chain[-2] and frozenset((chain[-1], n)) not in seen]
            if not nxt:
                break
            seen.add(frozenset((chain[-1], nxt[0])))
            chain.append(nxt[0])
        yield chain


def _length(g, chain) -> float:
    return float(sum(g.edges[a, b]["weight"] for a, b in zip(chain, chain[1:])))


def prune(g, *, spur_m: float, min_length_m: float):
    """Remove dead-end chains shorter than ``spur_m`` (twice) and components shorter than ``min_length_m``."""
    import networkx as nx

    g = g.copy()
    for _ in range(2):
        drop = []
        for chain in _chains(g):
            ends = g.degree(chain[0]), g.degree(chain[-1])
            if 1 in ends and max(ends) > 2 and _length(g, chain) < spur_m:  # a spur off a junction
                drop.extend(chain[1:-1] + [chain[0] if ends[0] == 1 else chain[-1]])
        g.remove_nodes_from(drop)
    for comp in list(nx.connected_components(g)):
        if g.subgraph(comp).size(weight="weight") < min_length_m:
            g.remove_nodes_from(comp)
    return g


EDGE_REACH_M = 8.0  # dead ends this close to the raster's edge are extended to it (the skeleton stops short)


def extend_to_edge(g, *, extent_m: tuple[float, float], reach_m: float = EDGE_REACH_M, step_m: float = 1.0):
    """Continue each dead end within ``reach_m`` of the frame's edge straight to the nearest edge.

    A skeleton ends about half a road width before the raster's edge, where the road itself runs on; without
    this, every road leaving the scene would miss its reference end point by a few metres.
    """
    w, h = extent_m
    for n in [n for n in g if g.degree(n) == 1]:
        x, y = g.nodes[n]["xy"]
        gaps = {"left": x, "right": w - x, "top": -y, "bottom": h + y}
        side = min(gaps, key=gaps.get)
        gap = gaps[side]
        if not 0 < gap <= reach_m:
            continue
        end = {"left": (0.0, y), "right": (w, y), "top": (x, 0.0), "bottom": (x, -h)}[side]
        k = max(1, int(math.ceil(gap / step_m)))
        prev = n
        for i in range(1, k + 1):
            t = i / k
            node = ("edge", n, i)
            g.add_node(node, xy=(x + (end[0] - x) * t, y + (end[1] - y) * t))
            _add_edge(g, prev, node)
            prev = node
    return g


def graph_from_mask(mask: np.ndarray, *, pixel_m: tuple[float, float], config):
    """``(H, W)`` bool road mask on the SR grid -> pruned road graph in the frame."""
    from skimage.morphology import skeletonize

    f = max(1, int(round(config.road_pixel_m / max(min(pixel_m), 1e-12))))
    cell = (pixel_m[0] * f, pixel_m[1] * f)
    coarse = clean_mask(_coarsen(mask, f), min(cell))
    g = graph_from_skeleton(skeletonize(coarse), cell=cell)
    g = prune(g, spur_m=config.road_spur_m, min_length_m=config.road_min_length_m)
    extent = (mask.shape[1] * pixel_m[0], mask.shape[0] * pixel_m[1])
    return extend_to_edge(g, extent_m=extent, step_m=config.apls_dense_m)


def graph_from_lines(lines, *, dense_m: float):
    """Lines in the frame (LineString/MultiLineString) -> graph, noded at crossings, densified to ``dense_m``."""
    import networkx as nx
    import shapely

    g = nx.Graph()
    parts = shapely.get_parts(np.asarray(lines, dtype=object))
    parts = parts[shapely.get_type_id(parts) == 1] if len(parts) else parts  # LineStrings
    if len(parts) == 0:
        return g
    noded = shapely.get_parts(shapely.node(shapely.multilinestrings(parts)))
    for line in shapely.segmentize(noded, dense_m):
        xy = shapely.get_coordinates(line)
        keys = [(round(float(x), 3), round(float(y), 3)) for x, y in xy]
        for k in keys:
            if k not in g:
                g.add_node(k, xy=k)
        for a, b in zip(keys, keys[1:]):
            if a != b:
                _add_edge(g, a, b)
    return g


def summary(g) -> dict:
    import networkx as nx

    return {"nodes": g.number_of_nodes(), "length_m": float(g.size(weight="weight")),
            "components": nx.number_connected_components(g) if len(g) else 0}


def segments(g) -> np.ndarray:
    """``(E, 2, 2)`` edge segments in the frame (for drawing)."""
    if g.number_of_edges() == 0:
        return np.zeros((0, 2, 2))
    return np.array([(g.nodes[a]["xy"], g.nodes[b]["xy"]) for a, b in g.edges()], dtype=np.float64)


# -------------------------------------------------------------------------------------------------- APLS


def control_points(g, spacing_m: float) -> list:
    """Junctions, dead ends and, along every chain between them, a node about every ``spacing_m``."""
    points = {n for n in g if g.degree(n) != 2}
    for chain in _chains(g):
        run = 0.0
        for a, b in zip(chain, chain[1:]):
            run += g.edges[a, b]["weight"]
            if run >= spacing_m and g.degree(b) == 2:
                points.add(b)
                run = 0.0
    return sorted(points, key=str)


def _distances(g, sources: list) -> tuple[np.ndarray, dict]:
    """Shortest path lengths ``(len(sources), N)`` and node -> column index."""
    import networkx as nx
    from scipy.sparse.csgraph import dijkstra

    order = list(g.nodes)
    index = {n: i for i, n in enumerate(order)}
    adj = nx.to_scipy_sparse_array(g, nodelist=order, weight="weight", format="csr")
    if not sources:
        return np.zeros((0, len(order))), index
    return dijkstra(adj, directed=False, indices=[index[s] for s in sources]), index


def apls_half(g, p, *, spacing_m: float, snap_m: float) -> float | None:
    """``1 - mean path cost`` of ``g``'s control-point pairs measured on ``p`` (None: ``g`` has no pair)."""
    from scipy.spatial import cKDTree

    controls = control_points(g, spacing_m)
    if len(controls) < 2:
        return None
    if p.number_of_nodes() == 0:
        snapped = [None] * len(controls)
    else:
        p_nodes = list(p.nodes)
        tree = cKDTree(np.array([p.nodes[n]["xy"] for n in p_nodes]))
        dist, idx = tree.query(np.array([g.nodes[c]["xy"] for c in controls]), distance_upper_bound=snap_m)
        snapped = [p_nodes[i] if np.isfinite(d) else None for d, i in zip(dist, idx)]
    dg, gi = _distances(g, controls)
    valid = [s for s in snapped if s is not None]
    uniq = list(dict.fromkeys(valid))
    dp, pi = _distances(p, uniq) if uniq else (None, {})
    row_of = {n: k for k, n in enumerate(uniq)}
    costs = []
    for a in range(len(controls)):
        for b in range(a + 1, len(controls)):
            length = dg[a, gi[controls[b]]]
            if not np.isfinite(length) or length <= 0:
                continue
            sa, sb = snapped[a], snapped[b]
            if sa is None or sb is None:
                costs.append(1.0)
                continue
            other = dp[row_of[sa], pi[sb]]
            costs.append(1.0 if not np.isfinite(other) else min(1.0, abs(length - other) / length))
    if not costs:
        return None
    return 1.0 - float(np.mean(costs))


def apls(ref, prop, *, spacing_m: float, snap_m: float) -> dict:
    """APLS of ``prop`` against ``ref`` and its two halves; ``apls`` is None when neither graph has roads."""
    if ref.number_of_edges() == 0 and prop.number_of_edges() == 0:
        return {"apls": None, "ref_to_prop": None, "prop_to_ref": None, "note": "no roads in either graph"}
    a = apls_half(ref, prop, spacing_m=spacing_m, snap_m=snap_m)
    b = apls_half(prop, ref, spacing_m=spacing_m, snap_m=snap_m)
    a0, b0 = (0.0 if a is None else a), (0.0 if b is None else b)
    score = 0.0 if a0 + b0 == 0 else 2 * a0 * b0 / (a0 + b0)
    note = None
    if prop.number_of_edges() == 0:
        note = "no roads found in the output"
    elif ref.number_of_edges() == 0:
        note = "no roads in the reference"
    return {"apls": score, "ref_to_prop": a, "prop_to_ref": b, "note": note}


def compare(ref, prop, config) -> dict:
    """Everything the report says about two road graphs."""
    out = apls(ref, prop, spacing_m=config.apls_spacing_m, snap_m=config.apls_snap_m)
    out["reference_graph"], out["output_graph"] = summary(ref), summary(prop)
    return out
