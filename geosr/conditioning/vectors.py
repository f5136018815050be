"""Segmentation from the user's vector layers: roads, buildings and water rasterised onto the tile grid.

``--vectors layer.gpkg|geojson|osm.pbf`` (every layer of the file is read with pyogrio; OSM PBF through GDAL's OSM
driver). Features are reprojected to the scene's CRS once per scene. What a feature is comes from its attributes
(OSM-style ``highway``, ``building``, ``natural=water``, ``waterway``) or else from its layer's name (``roads``,
``streets``, ``buildings``, ``water``); layers that match nothing (plots, tessellations) are skipped and logged.
Road centrelines become polygons at a width from their attributes: ``width`` (m), else ``lanes`` x 3.5 m, else a
width per highway class, else :data:`DEFAULT_ROAD_WIDTH`. Buildings are drawn last: a footprint is never covered
by a road that passes under it.

Classes::

    0 unlabelled   no feature
    1 road
    2 building
    3 water
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConditionError
from .base import ClassTable, SceneGrid, TileContext

log = logging.getLogger(__name__)

UNLABELLED, ROAD, BUILDING, WATER = range(4)
CLASSES = ClassTable({UNLABELLED: "unlabelled", ROAD: "road", BUILDING: "building", WATER: "water"},
                     {UNLABELLED: (0, 0, 0, 0), ROAD: (90, 90, 90, 255), BUILDING: (220, 60, 40, 255),
                      WATER: (30, 80, 200, 255)})
KINDS = {ROAD: "roads", BUILDING: "buildings", WATER: "water"}
DRAW_ORDER = (WATER, ROAD, BUILDING)  # later classes are drawn over earlier ones

LANE_WIDTH = 3.5  # m per lane
DEFAULT_ROAD_WIDTH = 6.0  # m, for a road with no width, lane count or known highway class
WATERWAY_WIDTH = 4.0  # m, for a waterway centreline with no width
HIGHWAY_WIDTH = {  # m, typical carriageway width per OSM highway class
    "motorway": 14.0, "trunk": 12.0, "primary": 10.0, "secondary": 8.0, "tertiary": 7.0, "unclassified": 6.0,
    "residential": 6.0, "living_street": 5.0, "service": 4.0, "track": 3.0, "pedestrian": 4.0, "cycleway": 2.0,
    "footway": 2.0, "path": 1.5, "steps": 2.0, "bridleway": 2.0,
}
ROAD_LAYER = re.compile(r"road|street|highway|centerline|centreline", re.I)
BUILDING_LAYER = re.compile(r"build", re.I)
WATER_LAYER = re.compile(r"water|lake|river", re.I)
POLYGON_TYPES = {"Polygon", "MultiPolygon"}
LINE_TYPES = {"LineString", "MultiLineString", "LinearRing"}


@dataclass
class Layer:
    """One class of features, in the scene's CRS."""

    kind: int  # ROAD, BUILDING or WATER
    geometries: list = field(default_factory=list)  # shapely polygons in the scene's CRS


def _number(text) -> float | None:
    if text is None:
        return None
    m = re.match(r"\s*([0-9]+(?:[.,][0-9]+)?)", str(text))
    return float(m.group(1).replace(",", ".")) if m else None


def road_width(attrs: dict) -> float:
    """Carriageway width in metres from a road's attributes (keys lower-cased): width, lanes, highway class."""
    width = _number(attrs.get("width"))
    if width and 0.5 <= width <= 100:
        return width
    lanes = _number(attrs.get("lanes") or attrs.get("lane_number") or attrs.get("lane_count"))
    if lanes and 1 <= lanes <= 20:
        return lanes * LANE_WIDTH
    return HIGHWAY_WIDTH.get(str(attrs.get("highway") or "").strip().lower(), DEFAULT_ROAD_WIDTH)


def _other_tags(text) -> dict:
    """GDAL OSM driver's ``other_tags`` (``"lanes"=>"2","width"=>"7"``) -> dict."""
    return dict(re.findall(r'"([^"]+)"=>"([^"]*)"', text or ""))


def classify(attrs: dict, geom_type: str, layer: str) -> int | None:
    """Which class a feature is: from its attributes first, its layer's name second; None: not drawn."""
    present = {k: v for k, v in attrs.items() if v not in (None, "", "no")}
    if geom_type in LINE_TYPES:
        if "highway" in present:
            return ROAD
        if "waterway" in present:
            return WATER
        return ROAD if ROAD_LAYER.search(layer) and not WATER_LAYER.search(layer) else None
    if geom_type in POLYGON_TYPES:
        if "building" in present:
            return BUILDING
        if present.get("natural") == "water" or "water" in present or "waterway" in present or \
                present.get("landuse") in ("reservoir", "basin"):
            return WATER
        if BUILDING_LAYER.search(layer):
            return BUILDING
        if WATER_LAYER.search(layer):
            return WATER
    return None


def _metric_crs(scene: SceneGrid):
    """A CRS in metres near the scene for buffering: the scene's own when projected, else its UTM zone."""
    from pyproj import CRS, Transformer

    crs = CRS.from_user_input(scene.crs.to_wkt())
    if crs.is_projected and abs(crs.axis_info[0].unit_conversion_factor - 1.0) < 1e-9:
        return crs
    left, bottom, right, top = scene.bounds
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform((left + right) / 2,
                                                                               (bottom + top) / 2)
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def _transformer(src, dst):
    import shapely
    from pyproj import Transformer

    tr = Transformer.from_crs(src, dst, always_xy=True)
    if tr.source_crs == tr.target_crs:
        return lambda g: g

    def apply(geoms):
        return shapely.transform(geoms, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))

    return apply


class VectorLayers:
    """``--vectors FILE``: roads, buildings and water of every layer of ``FILE``, rasterised per tile."""

    modality = "segmentation"
    classes = CLASSES

    def __init__(self, path, *, scene: SceneGrid, all_touched: bool = False):
        self.path = Path(path)
        self.all_touched = all_touched  # rasterio: burn every pixel a feature touches, not only centres inside
        self.layers: dict[int, Layer] = {k: Layer(k) for k in DRAW_ORDER}
        self.counts: dict[str, int] = {KINDS[k]: 0 for k in DRAW_ORDER}  # features per kind inside the scene
        self._read(scene)
        import shapely

        self._trees = {k: shapely.STRtree(layer.geometries) for k, layer in self.layers.items()}

    def _read(self, scene: SceneGrid) -> None:
        import pyogrio
        import shapely
        from pyproj import CRS

        if not self.path.exists():
            raise ConditionError(f"{self.path}: no such vector file")
        if scene.crs is None:
            raise ConditionError(f"{self.path}: the scene has no CRS, so vectors cannot be placed on it")
        try:
            layers = pyogrio.list_layers(self.path)
        except Exception as err:  # pyogrio.errors.DataSourceError and friends
            raise ConditionError(f"{self.path}: not a readable vector file ({' '.join(str(err).split())})") from err
        scene_crs = CRS.from_user_input(scene.crs.to_wkt())
        metric = _metric_crs(scene)
        to_metric_from_scene = _transformer(scene_crs, metric)
        to_scene = _transformer(metric, scene_crs)
        scene_box = shapely.box(*scene.bounds)
        box_metric = to_metric_from_scene(scene_box)
        used = 0
        for name, geom_type in layers:
            name = str(name)
            geom_type = str(geom_type or "").replace(" Z", "").replace("25D", "")
            with warnings.catch_warnings():  # GDAL's notes on unclosed OSM rings: the broken ones are dropped below
                warnings.simplefilter("ignore", RuntimeWarning)
                meta, _, wkb, values = pyogrio.raw.read(self.path, layer=name, force_2d=True)
            if meta["crs"] is None:
                raise ConditionError(f"{self.path}: layer {name!r} has no CRS; assign one (e.g. ogr2ogr -a_srs "
                                     "EPSG:4326 ...)")
            if wkb is None or len(wkb) == 0:
                continue
            geoms = shapely.from_wkb(wkb, on_invalid="ignore")  # None for a broken geometry (e.g. a 2-point ring)
            broken = int(shapely.is_missing(geoms).sum()) - int(sum(g is None for g in wkb))
            if broken:
                log.info("%s: layer %r: %d broken geometries skipped", self.path, name, broken)
            fields = [str(f).lower() for f in meta["fields"]]
            to_metric = _transformer(CRS.from_user_input(meta["crs"]), metric)
            geoms = to_metric(geoms)
            inside = shapely.intersects(geoms, box_metric.buffer(50.0))
            kinds_here = 0
            for i in np.flatnonzero(inside):
                attrs = {f: values[j][i] for j, f in enumerate(fields)}
                attrs.update({k.lower(): v for k, v in _other_tags(attrs.get("other_tags")).items()})
                g = geoms[i]
                kind = classify(attrs, g.geom_type, name)
                if kind is None:
                    continue
                if g.geom_type in LINE_TYPES:
                    width = road_width(attrs) if kind == ROAD else (_number(attrs.get("width")) or WATERWAY_WIDTH)
                    g = shapely.buffer(g, width / 2, cap_style="flat")
                if g.is_empty:
                    continue
                self.layers[kind].geometries.append(to_scene(g))
                if shapely.intersects(g, box_metric):
                    self.counts[KINDS[kind]] += 1
                kinds_here += 1
            used += kinds_here
            if kinds_here == 0:
                log.info("%s: layer %r (%s) has no roads, buildings or water in the scene; skipped", self.path,
                         name, geom_type)
        if used == 0:
            log.warning("%s: no roads, buildings or water overlap the scene", self.path)

    def __call__(self, tile: TileContext) -> np.ndarray:
        import shapely
        from rasterio.features import rasterize

        grid = tile.grid
        box = shapely.box(*grid.bounds)
        shapes = []
        for kind in DRAW_ORDER:
            geoms = self.layers[kind].geometries
            shapes.extend((geoms[i], kind) for i in self._trees[kind].query(box, predicate="intersects"))
        if not shapes:
            return np.full(tile.shape, UNLABELLED, dtype=np.int64)
        out = rasterize(shapes, out_shape=tile.shape, transform=tile.transform, fill=UNLABELLED, dtype=np.uint8,
                        all_touched=self.all_touched)
        return out.astype(np.int64)

    def counts_in(self, grid: SceneGrid) -> dict[str, int]:
        """Features per kind that intersect ``grid`` (a tile or the scene)."""
        import shapely

        box = shapely.box(*grid.bounds)
        return {KINDS[k]: int(len(self._trees[k].query(box, predicate="intersects"))) for k in DRAW_ORDER}
