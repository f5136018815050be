"""Vector layers (roads, buildings) placed on the SR grid, in the *frame* every structural score works in.

The frame is the SR raster's pixel grid scaled to metres: ``x = col * px_x``, ``y = -row * px_y`` (y up, so
angles are counter-clockwise from the raster's x axis). For projected CRSs this is exact up to the raster's
own rotation; for geographic CRSs it is the local equirectangular approximation at the scene centre.

Vectors in another CRS than the raster are **reprojected** (``rasterio.warp.transform``), never rejected; a
layer without a CRS is refused, because guessing would misplace it silently.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from ..errors import VectorError

log = logging.getLogger(__name__)

_KINDS = {"roads": (("line",), ("road", "street")), "buildings": (("polygon",), ("building",))}


def _choose_layer(path: Path, role: str, layer: str | None) -> str | None:
    import pyogrio

    try:
        layers = [(str(n), str(t)) for n, t in pyogrio.list_layers(path)]
    except Exception as err:
        raise VectorError(f"{path}: not a readable vector file ({' '.join(str(err).split())})") from err
    names = [n for n, _ in layers]
    if layer is not None:
        if layer not in names:
            raise VectorError(f"{path}: no layer {layer!r}; layers: {', '.join(names)}")
        return layer
    if len(layers) == 1:
        return names[0]
    types, words = _KINDS[role]
    fits = [n for n, t in layers if any(k in (t or "").lower() for k in types)]
    named = [n for n in fits if any(w in n.lower() for w in words)]
    for candidates in (named, fits):
        if len(candidates) == 1:
            return candidates[0]
    raise VectorError(f"{path}: {len(layers)} layers ({', '.join(names)}); choose the {role} layer with "
                      f"--{role}-layer")


def resolve_layer(path, role: str, layer: str | None = None) -> str:
    """The name of the ``role`` layer of ``path`` (cheap: reads the layer list only), or VectorError."""
    path = Path(path)
    if not path.exists():
        raise VectorError(f"{path}: no such file")
    return _choose_layer(path, role, layer)


def read_layer(path, role: str, *, layer: str | None = None) -> tuple[np.ndarray, str]:
    """``(shapely geometries, CRS as text)`` of the ``role`` ('roads' or 'buildings') layer of ``path``."""
    import pyogrio
    import shapely

    path = Path(path)
    name = resolve_layer(path, role, layer)
    try:
        meta, _, wkb, _ = pyogrio.raw.read(path, layer=name, read_geometry=True, columns=[])
    except Exception as err:
        raise VectorError(f"{path}: cannot read layer {name!r} ({' '.join(str(err).split())})") from err
    if not meta.get("crs"):
        raise VectorError(f"{path}: layer {name!r} has no CRS; assign one (e.g. ogr2ogr -a_srs EPSG:XXXX)")
    geoms = shapely.from_wkb(wkb)
    geoms = geoms[~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)]
    log.info("%s: layer %s, %d %s, %s", path, name, len(geoms), role, meta["crs"])
    return geoms, meta["crs"]


def frame_of(transform, pixel_m: tuple[float, float]):
    """``(to_frame(cols, rows), from_frame(x, y))`` for the SR grid."""

    def to_frame(cols, rows):
        return np.asarray(cols) * pixel_m[0], -np.asarray(rows) * pixel_m[1]

    def from_frame(x, y):
        return np.asarray(x) / pixel_m[0], -np.asarray(y) / pixel_m[1]

    return to_frame, from_frame


def place(geoms: np.ndarray, src_crs, *, crs, transform, shape: tuple[int, int],
          pixel_m: tuple[float, float], path="vectors") -> np.ndarray:
    """Reproject ``geoms`` from ``src_crs`` onto the raster (``crs``, ``transform``), into the frame, clipped to
    the raster's extent. Empty results are dropped."""
    import shapely
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp

    if crs is None:
        raise VectorError(f"{path}: the SR raster has no CRS, so vectors cannot be placed on it")
    src, dst = CRS.from_user_input(src_crs), CRS.from_user_input(crs)
    inv = ~transform
    to_frame, _ = frame_of(transform, pixel_m)

    def project(xy: np.ndarray) -> np.ndarray:  # (N, 2) in src CRS -> (N, 2) frame
        x, y = xy[:, 0], xy[:, 1]
        if src != dst:
            x, y = (np.asarray(v) for v in warp(src, dst, x, y))
        cols, rows = inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f
        fx, fy = to_frame(cols, rows)
        return np.column_stack([fx, fy])

    out = shapely.transform(geoms, project)
    return clip_to_frame(out, shape, pixel_m)


def clip_to_frame(geoms: np.ndarray, shape: tuple[int, int], pixel_m: tuple[float, float]) -> np.ndarray:
    import shapely

    h, w = shape
    extent = shapely.box(0.0, -h * pixel_m[1], w * pixel_m[0], 0.0)
    inside = shapely.intersects(geoms, extent)
    clipped = shapely.intersection(geoms[inside], extent)
    return clipped[~shapely.is_empty(clipped)]


def read_pixel_wkt_csv(path, *, column: str = "WKT_Pix") -> np.ndarray:
    """Geometries from a SpaceNet-style CSV (``ImageId,WKT_Pix``) in pixel coordinates (col, row)."""
    import shapely

    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise VectorError(f"{path}: cannot read ({err.strerror})") from err
    if rows and column not in rows[0]:
        raise VectorError(f"{path}: no column {column!r}; columns: {', '.join(rows[0])}")
    geoms = shapely.from_wkt([r[column] for r in rows if r[column] and "EMPTY" not in r[column]])
    return np.asarray(geoms, dtype=object)


def pixels_to_frame(geoms: np.ndarray, pixel_m: tuple[float, float], *, pixel_scale: float = 1.0) -> np.ndarray:
    """Geometries in pixel coordinates of a grid ``pixel_scale`` times coarser than the SR's -> frame."""
    import shapely

    def f(xy):
        return np.column_stack([xy[:, 0] * pixel_scale * pixel_m[0], -xy[:, 1] * pixel_scale * pixel_m[1]])

    return shapely.transform(np.asarray(geoms, dtype=object), f)
