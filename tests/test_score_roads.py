"""Road connectivity: APLS validated on the real SpaceNet sample, the mask -> graph pipeline, vector CRSs."""

import numpy as np
import pytest
import shapely

from geosr.config import ScoreConfig
from geosr.errors import VectorError
from geosr.scoring import roads, vectors
from geosr.scoring.inputs import pixel_size_m, read_raster

CONFIG = ScoreConfig()
SCENE = "scenes/vegas_img0_0p3m_rgba.tif"


@pytest.fixture(scope="module")
def vegas(data):
    """(raster, pixel size in m, ground-truth lines in the frame, proposal lines in the frame)."""
    r = read_raster(data / SCENE)
    px = pixel_size_m(r.crs, r.transform, r.shape)
    geoms, crs = vectors.read_layer(data / "vectors" / "vegas_img0_roads.geojson", "roads")
    truth = vectors.place(geoms, crs, crs=r.crs, transform=r.transform, shape=r.shape, pixel_m=px)
    pix = vectors.read_pixel_wkt_csv(data / "vectors" / "vegas_img0_roads_proposal_pixel_wkt.csv")
    proposal = vectors.clip_to_frame(vectors.pixels_to_frame(pix, px), r.shape, px)
    return r, px, truth, proposal


def _graph(lines):
    return roads.graph_from_lines(lines, dense_m=CONFIG.apls_dense_m)


def _apls(a, b):
    return roads.apls(_graph(a), _graph(b), spacing_m=CONFIG.apls_spacing_m, snap_m=CONFIG.apls_snap_m)


def _perturbed(lines, *, sigma_m, drop, seed):
    """Every vertex moved by N(0, sigma) metres and a share ``drop`` of the lines removed."""
    rng = np.random.default_rng(seed)
    keep = [g for g in lines if rng.random() >= drop]
    return np.array([shapely.transform(g, lambda xy: xy + rng.normal(0.0, sigma_m, xy.shape)) for g in keep],
                    dtype=object)


def test_spacenet_ground_truth_reads_as_one_connected_network(vegas):
    _, px, truth, proposal = vegas
    assert len(truth) == 38 and px == pytest.approx((0.2424, 0.3006), abs=1e-3)
    s = roads.summary(_graph(truth))
    assert s["components"] == 1 and 4000 < s["length_m"] < 5000  # measured 4464 m


def test_ground_truth_against_itself_scores_one(vegas):
    out = _apls(vegas[2], vegas[2])
    assert out["apls"] == 1.0 and out["ref_to_prop"] == 1.0 and out["prop_to_ref"] == 1.0


def test_real_competitor_proposal_scores_below_one(vegas):
    out = _apls(vegas[2], vegas[3])
    assert 0.7 < out["apls"] < 0.95  # measured 0.809
    assert out["ref_to_prop"] < 1.0 and out["prop_to_ref"] < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proposal_beats_a_randomly_perturbed_graph(vegas, seed):
    proposal = _apls(vegas[2], vegas[3])["apls"]
    perturbed = _apls(vegas[2], _perturbed(vegas[2], sigma_m=8.0, drop=0.3, seed=seed))["apls"]
    assert perturbed < proposal - 0.3  # measured 0.07, 0.17, 0.06


def test_dropping_roads_lowers_apls_monotonically(vegas):
    scores = [_apls(vegas[2], _perturbed(vegas[2], sigma_m=0.0, drop=d, seed=3))["apls"] for d in (0.0, 0.2, 0.5)]
    assert scores[0] == 1.0 and scores[0] > scores[1] > scores[2]


# ------------------------------------------------------------------------------------- mask -> graph


def _plus_mask(size_m=120, width_m=6, px=0.5, gap_m=0):
    """A '+' of two roads ``width_m`` wide crossing in the middle; optionally a gap in the horizontal one."""
    n = int(size_m / px)
    m = np.zeros((n, n), bool)
    c, hw = n // 2, int(width_m / px / 2)
    m[c - hw:c + hw, :] = True
    m[:, c - hw:c + hw] = True
    if gap_m:
        g = int(gap_m / px)
        m[c - hw:c + hw, n // 5: n // 5 + g] = False
    centre = (c + 0.0) * px  # centre line, frame metres
    lines = [shapely.LineString([(0, -centre), (size_m, -centre)]),
             shapely.LineString([(centre, 0), (centre, -size_m)])]
    return m, np.array(lines, dtype=object), px


def test_mask_to_graph_recovers_a_road_crossing():
    mask, lines, px = _plus_mask()
    g = roads.graph_from_mask(mask, pixel_m=(px, px), config=CONFIG)
    s = roads.summary(g)
    assert s["components"] == 1
    assert 235 < s["length_m"] < 250  # two 120 m roads (measured 246.9: diagonal steps at the crossing)
    out = roads.apls(_graph(lines), g, spacing_m=CONFIG.apls_spacing_m, snap_m=CONFIG.apls_snap_m)
    assert out["apls"] > 0.85


def test_a_broken_road_is_two_components_and_scores_lower():
    whole, lines, px = _plus_mask()
    broken, _, _ = _plus_mask(gap_m=10)
    g_whole = roads.graph_from_mask(whole, pixel_m=(px, px), config=CONFIG)
    g_broken = roads.graph_from_mask(broken, pixel_m=(px, px), config=CONFIG)
    assert roads.summary(g_broken)["components"] == 2
    ref = _graph(lines)
    a = roads.apls(ref, g_whole, spacing_m=CONFIG.apls_spacing_m, snap_m=CONFIG.apls_snap_m)["apls"]
    b = roads.apls(ref, g_broken, spacing_m=CONFIG.apls_spacing_m, snap_m=CONFIG.apls_snap_m)["apls"]
    assert b < a - 0.1


def test_empty_road_mask_reports_no_roads_without_crashing():
    _, lines, px = _plus_mask()
    empty = roads.graph_from_mask(np.zeros((100, 100), bool), pixel_m=(px, px), config=CONFIG)
    assert roads.summary(empty) == {"nodes": 0, "length_m": 0.0, "components": 0}
    out = roads.compare(_graph(lines), empty, CONFIG)
    assert out["apls"] == 0.0 and out["note"] == "no roads found in the output"
    both = roads.compare(empty, empty, CONFIG)
    assert both["apls"] is None and both["note"] == "no roads in either graph"


def test_uniform_vegetation_has_an_empty_road_mask():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[...] = (60, 140, 50)
    assert not roads.road_mask(rgb).any()


# ------------------------------------------------------------------------------------------ vectors


def _write_layer(path, geoms, crs, geometry_type):
    import pyogrio.raw

    pyogrio.raw.write(path, geometry=shapely.to_wkb(geoms), field_data=[], fields=[], crs=crs,
                      geometry_type=geometry_type, driver="GPKG" if str(path).endswith(".gpkg") else "GeoJSON")


def test_vectors_in_another_crs_are_reprojected_not_rejected(vegas, data, tmp_path):
    from rasterio.warp import transform_geom

    r, px, truth, _ = vegas
    geoms, crs = vectors.read_layer(data / "vectors" / "vegas_img0_roads.geojson", "roads")
    utm = np.array([shapely.geometry.shape(transform_geom(crs, "EPSG:32611", shapely.geometry.mapping(g)))
                    for g in geoms], dtype=object)
    path = tmp_path / "roads_utm.gpkg"
    _write_layer(path, utm, "EPSG:32611", "LineString")
    back, back_crs = vectors.read_layer(path, "roads")
    assert back_crs == "EPSG:32611"
    placed = vectors.place(back, back_crs, crs=r.crs, transform=r.transform, shape=r.shape, pixel_m=px)
    assert len(placed) == len(truth)
    assert np.allclose(shapely.get_coordinates(placed), shapely.get_coordinates(truth), atol=1e-3)  # metres
    assert _apls(truth, placed)["apls"] > 0.999


def test_layer_without_crs_is_refused(tmp_path):
    path = tmp_path / "nocrs.gpkg"
    _write_layer(path, np.array([shapely.LineString([(0, 0), (1, 1)])], dtype=object), None, "LineString")
    with pytest.raises(VectorError, match="has no CRS; assign one") as err:
        vectors.read_layer(path, "roads")
    assert str(path) in str(err.value)


def test_several_layers_pick_by_role_or_ask(data):
    geoms, crs = vectors.read_layer(data / "vectors" / "prague_bubenec.gpkg", "roads")
    assert len(geoms) == 35 and crs == "EPSG:3857"  # the 'streets' layer
    geoms, _ = vectors.read_layer(data / "vectors" / "prague_bubenec.gpkg", "buildings")
    assert len(geoms) == 144
    with pytest.raises(VectorError, match="no layer 'nope'; layers: tessellation"):
        vectors.read_layer(data / "vectors" / "prague_bubenec.gpkg", "buildings", layer="nope")


def test_the_heuristic_mask_on_the_real_hr_image_finds_part_of_the_network(vegas):
    """Where the image-based graph stands on real data: the road heuristic is weak on a strip mall."""
    r, px, truth, _ = vegas
    rgb = np.ascontiguousarray(np.moveaxis(r.raw, 0, -1))
    g = roads.graph_from_mask(roads.road_mask(rgb), pixel_m=px, config=CONFIG)
    out = roads.compare(_graph(truth), g, CONFIG)
    assert 0.10 < out["apls"] < 0.30  # measured 0.154 (parking lots pass the mask too)
    assert out["output_graph"]["length_m"] > 2000
