"""Building orientation: rotations of real footprint layers measured back; mask -> polygons -> orientation."""

import numpy as np
import pytest
import shapely
from affine import Affine
from shapely import affinity

from geosr.config import ScoreConfig
from geosr.scoring import buildings, vectors

CONFIG = ScoreConfig()
LAYERS = {"prague": ("prague_bubenec.gpkg", "EPSG:32633", 144), "alexandria": ("alexandria_buildings.geojson",
                                                                               "EPSG:26918", 84)}
ANGLES = [-33.0, -7.5, 4.0, 15.0, 40.0]


def metric_grid(geoms, crs, dst_crs, px=1.0, pad=10.0):
    """A north-up grid in ``dst_crs`` around ``geoms``: (transform, shape)."""
    from rasterio.warp import transform_bounds

    x0, y0, x1, y1 = transform_bounds(crs, dst_crs, *shapely.total_bounds(geoms))
    x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + pad, y1 + pad
    return Affine(px, 0, x0, 0, -px, y1), (int(np.ceil((y1 - y0) / px)), int(np.ceil((x1 - x0) / px)))


@pytest.fixture(scope="module", params=list(LAYERS))
def footprints(request, data):
    """(name, footprints in a metric frame, expected count); each layer read in its own CRS and reprojected."""
    name, utm, count = LAYERS[request.param]
    geoms, crs = vectors.read_layer(data / "vectors" / name, "buildings")
    transform, shape = metric_grid(geoms, crs, utm)
    placed = vectors.place(geoms, crs, crs=utm, transform=transform, shape=shape, pixel_m=(1.0, 1.0))
    return request.param, buildings.as_polygons(placed, min_area_m2=0.0), count


def test_layers_are_read_whole(footprints):
    name, polys, count = footprints
    assert len(polys) == count  # every footprint (alexandria's multipolygons hold one part each)
    assert shapely.area(polys).min() > 15.0  # m², so the metric frame is metres


@pytest.mark.parametrize("angle", ANGLES)
def test_rotating_the_whole_layer_is_measured_back(footprints, angle):
    _, polys, _ = footprints
    centre = shapely.union_all(polys).centroid
    turned = np.array([affinity.rotate(p, angle, origin=centre) for p in polys], dtype=object)
    out = buildings.compare(polys, turned, CONFIG)
    # a few near-square footprints flip between two almost equal minimum rectangles: measured |error| <= 0.03°
    assert out["dominant_shift_deg"] == pytest.approx(buildings.angle_error(0.0, angle), abs=0.05)
    assert out["output_buildings"] == len(polys)


@pytest.mark.parametrize("angle", ANGLES)
def test_rotating_each_building_is_measured_back_per_building(footprints, angle):
    _, polys, _ = footprints
    turned = np.array([affinity.rotate(p, angle, origin="centroid") for p in polys], dtype=object)
    out = buildings.compare(polys, turned, CONFIG)
    expected = float(buildings.angle_error(0.0, angle))  # the angle itself: all of ANGLES lie in [-45, 45)
    assert out["matched"] >= 0.85 * len(polys) and out["oriented"] >= 0.85 * len(polys)
    assert out["angle_error_median_deg"] == pytest.approx(expected, abs=1e-6)
    assert out["angle_error_median_abs_deg"] == pytest.approx(abs(expected), abs=1e-6)


def test_unrotated_layer_agrees_perfectly(footprints):
    _, polys, _ = footprints
    out = buildings.compare(polys, polys, CONFIG)
    assert out["matched"] == out["oriented"] == len(polys) and out["recall"] == 1.0 and out["precision"] == 1.0
    assert out["f1"] == 1.0
    assert out["angle_error_mean_abs_deg"] == 0.0 and out["histogram_intersection"] == pytest.approx(1.0)
    assert out["dominant_shift_deg"] == pytest.approx(0.0, abs=1e-9)


def test_a_layer_missing_half_the_buildings_has_their_recall_and_f1(footprints):
    _, polys, _ = footprints
    half = polys[: len(polys) // 2]
    out = buildings.compare(polys, half, CONFIG)
    assert out["precision"] == 1.0 and out["recall"] == pytest.approx(len(half) / len(polys))
    assert out["f1"] == pytest.approx(2 * len(half) / (len(polys) + len(half)))
    assert buildings.compare(half[:0], half[:0], CONFIG)["f1"] is None


def test_angle_error_wraps_on_the_ninety_degree_circle():
    assert buildings.angle_error(np.array([0.0, 85.0, 10.0, 44.0]), np.array([89.0, 5.0, 10.0, 0.0])).tolist() == \
        pytest.approx([-1.0, 10.0, 0.0, -44.0])


@pytest.mark.parametrize("angle", [0.0, 12.0, 25.0, 61.0])
def test_mask_polygons_keep_a_rectangles_orientation(angle):
    """A 40 x 20 m rectangle rasterised at 0.25 m, polygonised and oriented again."""
    from rasterio.features import rasterize

    px = 0.25
    rect = affinity.rotate(shapely.box(-20, -10, 20, 10), angle, origin=(0, 0))
    rect = affinity.translate(rect, 40, -40)  # inside an 80 x 80 m frame
    frame = Affine(px, 0, 0, 0, -px, 0)
    mask = rasterize([rect], out_shape=(320, 320), transform=frame).astype(bool)
    polys = buildings.polygons_from_mask(mask, pixel_m=(px, px), min_area_m2=CONFIG.building_min_area_m2)
    assert len(polys) == 1 and polys[0].area == pytest.approx(800, rel=0.02)
    measured = buildings.orientations(polys)[0]
    assert abs(buildings.angle_error(angle % 90, measured)) < 1.0


def test_empty_output_reports_no_buildings():
    ref = np.array([shapely.box(0, 0, 10, 5)], dtype=object)
    out = buildings.compare(ref, np.array([], dtype=object), CONFIG)
    assert out["matched"] == 0 and out["output_buildings"] == 0 and out["recall"] == 0.0
    assert out["angle_error_median_abs_deg"] is None and out["note"] == "no buildings found in the output"
