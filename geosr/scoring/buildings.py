"""Building orientation: polygonise building masks, orient each building, compare with the reference.

1. **Mask.** :func:`building_mask` is the land-cover heuristic's ``bright`` class (bright, unsaturated: roofs,
   but also concrete and bare soil), opened by about 1 m. A heuristic, like the roads' mask.
2. **Polygons.** ``rasterio.features.shapes`` turns the mask into polygons in the frame
   (:mod:`geosr.scoring.vectors`); those under ``building_min_area_m2`` are dropped.
3. **Orientation.** A building's orientation is the direction of an edge of its minimum rotated rectangle
   (``shapely.oriented_envelope``), in degrees counter-clockwise from the frame's x axis, modulo 90 (a
   rectangle looks the same turned by 90°): ``[0, 90)``. The angle error of a matched pair is the signed
   difference wrapped to ``[-45, 45)``.
4. **Matching.** Reference and output buildings are paired one to one, greedily by IoU, down to
   ``building_match_iou``: ``matched``, ``recall``, ``precision`` and their harmonic mean ``f1`` count these pairs.
   Orientation is compared for every reference building that one output polygon covers at least half of
   (``oriented``; touching buildings that the mask merged into one block all take that block's orientation). The
   report gives these per-building errors
   (signed, so a rotation shows), their mean and median magnitude, the area-weighted orientation histograms
   (``orientation_bins`` over ``[0, 90)``), their intersection (1: the same distribution) and each layer's dominant
   orientation: the area-weighted circular mean on the 90° circle, ``atan2(sum w sin 4a, sum w cos 4a) / 4``.
   Rotating a whole layer by ``t`` shifts every orientation, hence the dominant one, by exactly ``t`` (mod 90),
   matched or not.
"""

from __future__ import annotations

import math

import numpy as np


def building_mask(rgb: np.ndarray, *, pixel_m: tuple[float, float]) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(H, W)`` bool: the heuristic's bright class, opened by about 1 m."""
    from scipy import ndimage
    from skimage import morphology

    from ..conditioning.segmentation import BRIGHT
    from .semantic import segment

    mask = segment(rgb) == BRIGHT
    r = int(round(0.5 / max(min(pixel_m), 1e-12)))
    return ndimage.binary_opening(mask, morphology.disk(r)) if r >= 1 else mask


def polygons_from_mask(mask: np.ndarray, *, pixel_m: tuple[float, float], min_area_m2: float) -> np.ndarray:
    """``(H, W)`` bool -> array of shapely Polygons in the frame, each at least ``min_area_m2``."""
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    frame = Affine(pixel_m[0], 0.0, 0.0, 0.0, -pixel_m[1], 0.0)  # SR px -> frame
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    polys = [shapely.geometry.shape(geom) for geom, value in shapes(m, mask=m.astype(bool), connectivity=4,
                                                                    transform=frame) if value == 1]
    polys = np.array(polys, dtype=object)
    return polys[shapely.area(polys) >= min_area_m2] if len(polys) else polys


def as_polygons(geoms: np.ndarray, *, min_area_m2: float) -> np.ndarray:
    """Polygon parts of any geometries (multi-polygons split), at least ``min_area_m2``."""
    import shapely

    parts = shapely.get_parts(np.asarray(geoms, dtype=object))
    parts = parts[shapely.get_type_id(parts) == 3] if len(parts) else parts
    return parts[shapely.area(parts) >= min_area_m2] if len(parts) else parts


def orientations(polys: np.ndarray) -> np.ndarray:
    """``(N,)`` degrees in ``[0, 90)``: direction of the first edge of each minimum rotated rectangle."""
    import shapely

    if len(polys) == 0:
        return np.zeros(0)
    rects = shapely.oriented_envelope(polys)
    out = np.empty(len(polys))
    for i, r in enumerate(rects):
        xy = shapely.get_coordinates(r)
        dx, dy = xy[1] - xy[0]
        out[i] = math.degrees(math.atan2(dy, dx)) % 90.0
    return out


def angle_error(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Signed ``out - ref`` on the 90° circle, in ``[-45, 45)`` degrees."""
    return (np.asarray(out) - np.asarray(ref) + 45.0) % 90.0 - 45.0


def dominant(angles: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Weighted circular mean on the 90° circle (degrees in ``[0, 90)``); None for no angles."""
    if len(angles) == 0:
        return None
    w = np.ones(len(angles)) if weights is None else np.asarray(weights, dtype=np.float64)
    t = np.radians(4.0 * np.asarray(angles))
    return float(math.degrees(math.atan2(np.sum(w * np.sin(t)), np.sum(w * np.cos(t)))) / 4.0 % 90.0)


def histogram(angles: np.ndarray, weights: np.ndarray, bins: int) -> np.ndarray:
    """``(bins,)`` weighted histogram over ``[0, 90)``, summing to 1 (zeros when empty)."""
    h, _ = np.histogram(angles, bins=bins, range=(0.0, 90.0), weights=weights)
    total = h.sum()
    return h / total if total > 0 else h.astype(np.float64)


def match(ref: np.ndarray, out: np.ndarray, *, min_iou: float) -> list[tuple[int, int, float]]:
    """One-to-one ``(ref index, out index, IoU)`` pairs, greedily by IoU, each at least ``min_iou``."""
    import shapely

    if len(ref) == 0 or len(out) == 0:
        return []
    tree = shapely.STRtree(out)
    ri, oi = tree.query(ref, predicate="intersects")
    if len(ri) == 0:
        return []
    inter = shapely.area(shapely.intersection(ref[ri], out[oi]))
    iou = inter / (shapely.area(ref[ri]) + shapely.area(out[oi]) - inter)
    pairs, used_r, used_o = [], set(), set()
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < min_iou:
            break
        if ri[k] in used_r or oi[k] in used_o:
            continue
        used_r.add(ri[k])
        used_o.add(oi[k])
        pairs.append((int(ri[k]), int(oi[k]), float(iou[k])))
    return pairs


def cover(ref: np.ndarray, out: np.ndarray, *, min_share: float = 0.5) -> list[tuple[int, int, float]]:
    """``(ref index, out index, share)``: for each reference building the output polygon covering most of it,
    when that covers at least ``min_share`` of its area. Several may share one output polygon (a terrace the
    mask merged into one block)."""
    import shapely

    if len(ref) == 0 or len(out) == 0:
        return []
    ri, oi = shapely.STRtree(out).query(ref, predicate="intersects")
    if len(ri) == 0:
        return []
    share = shapely.area(shapely.intersection(ref[ri], out[oi])) / shapely.area(ref[ri])
    best: dict[int, tuple[int, float]] = {}
    for r, o, v in zip(ri.tolist(), oi.tolist(), share.tolist()):
        if v >= min_share and v > best.get(r, (-1, -1.0))[1]:
            best[r] = (o, v)
    return [(r, o, v) for r, (o, v) in sorted(best.items())]


def compare(ref: np.ndarray, out: np.ndarray, config) -> dict:
    """Everything the report says about the output's buildings against the reference's."""
    import shapely

    a_ref, a_out = orientations(ref), orientations(out)
    w_ref, w_out = shapely.area(ref) if len(ref) else np.zeros(0), shapely.area(out) if len(out) else np.zeros(0)
    pairs = match(ref, out, min_iou=config.building_match_iou)
    covered = cover(ref, out)
    err = angle_error(a_ref[[p[0] for p in covered]], a_out[[p[1] for p in covered]]) if covered else np.zeros(0)
    h_ref = histogram(a_ref, w_ref, config.orientation_bins)
    h_out = histogram(a_out, w_out, config.orientation_bins)
    d_ref, d_out = dominant(a_ref, w_ref), dominant(a_out, w_out)
    return {
        "reference_buildings": int(len(ref)), "output_buildings": int(len(out)), "matched": len(pairs),
        "recall": len(pairs) / len(ref) if len(ref) else None,
        "precision": len(pairs) / len(out) if len(out) else None,
        # the harmonic mean of the two, as SpaceNet scores building footprints: 2 matched / (reference + output)
        "f1": 2 * len(pairs) / (len(ref) + len(out)) if len(ref) + len(out) else None,
        "oriented": len(covered),
        "angle_error_mean_abs_deg": float(np.mean(np.abs(err))) if len(err) else None,
        "angle_error_median_abs_deg": float(np.median(np.abs(err))) if len(err) else None,
        "angle_error_median_deg": float(np.median(err)) if len(err) else None,
        "dominant_reference_deg": d_ref, "dominant_output_deg": d_out,
        "dominant_shift_deg": None if d_ref is None or d_out is None else float(angle_error(d_ref, d_out)),
        "histogram_intersection": float(np.minimum(h_ref, h_out).sum()) if len(ref) and len(out) else None,
        "histogram_reference": h_ref.tolist(), "histogram_output": h_out.tolist(),
        "per_building": [{"reference": r, "output": o, "covered": share, "reference_deg": float(a_ref[r]),
                          "output_deg": float(a_out[o]), "error_deg": float(e)}
                         for (r, o, share), e in zip(covered, err)],
        "note": None if len(out) else "no buildings found in the output",
    }
