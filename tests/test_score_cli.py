"""``geosr score`` end to end: through the real entry point, reports and map written, bad input refused."""

import json

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine

from geosr import bench
from geosr.config import ScoreConfig
from geosr.scoring import score_scene

from test_cli import assert_one_line_error

CRS = "EPSG:2056"
T_SR = Affine(0.5, 0, 2679062.5, 0, -0.5, 1248000.0)


@pytest.fixture
def trio(data, make_tif):
    """(sr, lr, hr) files: a 256x192 Zurich crop, its x4 LR, and a bicubic x4 output of that LR."""
    with rasterio.open(data / "scenes" / "zurich_0p5m_rgb.tif") as src:
        hr = np.moveaxis(src.read(window=rasterio.windows.Window(0, 0, 256, 192)), 0, -1)
    lr = bench._resize(hr, (48, 64))
    sr = bench._resize(lr, (192, 256))
    chw = lambda a: np.moveaxis(a, -1, 0)  # noqa: E731
    return (make_tif(chw(sr), "sr.tif", crs=CRS, transform=T_SR),
            make_tif(chw(lr), "lr.tif", crs=CRS, transform=T_SR @ Affine.scale(4)),
            make_tif(chw(hr), "hr.tif", crs=CRS, transform=T_SR))


def test_score_writes_json_html_and_map_on_the_sr_grid(run_cli, trio, tmp_path):
    sr, lr, hr = trio
    out_json, out_html, out_map = tmp_path / "s.json", tmp_path / "s.html", tmp_path / "m.tif"
    proc = run_cli("score", sr, "--lr", lr, "--reference", hr, "--json", out_json, "--html", out_html,
                   "--map", out_map, "--no-lpips", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    report = json.loads(out_json.read_text())
    lines = proc.stdout.splitlines()
    assert lines[0] == "scale x4, 256x192 px"
    assert any(ln.startswith("faithfulness: LR-consistency") for ln in lines)
    assert f"wrote {out_map}" in lines and f"wrote {out_json}" in lines and f"wrote {out_html}" in lines
    # the library gives the same numbers as the command
    again = score_scene(sr, lr, reference=hr, config=ScoreConfig(lpips=False)).report
    for key in ("faithfulness", "semantic"):
        assert report[key] == again[key]
    # pyiqa's torch reductions may round the last bit differently with another thread count (CLI vs this process)
    fr, fr_again = report["full_reference"], again["full_reference"]
    assert fr.keys() == fr_again.keys()
    for k, v in fr.items():
        assert v == (pytest.approx(fr_again[k], rel=1e-9) if isinstance(v, float) else fr_again[k]), k
    assert report["settings"] == ScoreConfig(lpips=False).to_dict()
    assert report["inputs"]["scale"] == 4 and report["inputs"]["crs"] == "EPSG:2056"
    assert 20 < report["full_reference"]["psnr_y"] < 40 and 0 < report["full_reference"]["ssim_y"] < 1
    assert report["full_reference"]["lpips"] is None and "not asked" in report["full_reference"]["note"]
    assert report["full_reference"]["pyiqa_psnr_y"] == pytest.approx(report["full_reference"]["psnr_y"], abs=1e-3)
    nr = report["no_reference"]  # NIQE offline; the rest said in one stdout line, not as warnings
    assert nr["values"]["niqe"] > 0 and nr["values"]["musiq"] is None
    assert [ln for ln in lines if ln.startswith("no reference: NIQE")] == [
        f"no reference: NIQE {nr['values']['niqe']:.4f}, MUSIQ -, CLIPIQA -, MANIQA - ({nr['note']})"]
    assert report["faithfulness"]["lr_consistency_db"] > 30
    with rasterio.open(out_map) as m, rasterio.open(sr) as s:
        assert m.crs == s.crs and m.transform == s.transform and (m.width, m.height) == (s.width, s.height)
        assert m.count == 3 and m.descriptions == ("map", "residual", "detail") and m.dtypes[0] == "float32"
        band = m.read()
        assert np.allclose(band[0], band[1] + band[2], atol=1e-4)
        assert band[0].mean() == pytest.approx(report["faithfulness"]["map"]["map_mean"], rel=1e-5)
    page = out_html.read_text()
    assert page.count("data:image/png;base64,") == 4 and "pyiqa" in page and "<table>" in page


def test_score_without_reference_compares_with_the_lr(run_cli, trio):
    sr, lr, _ = trio
    proc = run_cli("score", sr, "--lr", lr, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "full reference: no --reference given" in proc.stdout
    assert "vs LR input" in proc.stdout and "not computed: musiq, clipiqa, maniqa" in proc.stdout


def test_existing_outputs_are_kept_without_overwrite(run_cli, trio, tmp_path):
    sr, lr, _ = trio
    out = tmp_path / "s.json"
    out.write_text("keep me")
    proc = run_cli("score", sr, "--lr", lr, "--json", out, "-q")
    assert_one_line_error(proc, "already exists; pass --overwrite")
    assert out.read_text() == "keep me"
    proc = run_cli("score", sr, "--lr", lr, "--json", out, "--overwrite", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["inputs"]["scale"] == 4


def test_output_equal_to_an_input_is_refused(run_cli, trio):
    sr, lr, _ = trio
    before = lr.read_bytes()
    proc = run_cli("score", sr, "--lr", lr, "--map", lr, "--overwrite", "-q")
    assert_one_line_error(proc, "output is the input")
    assert lr.read_bytes() == before


@pytest.mark.parametrize("case,pattern", [("extent", "differs from the LR's"), ("missing", "no such file"),
                                          ("roads", "no such file"), ("layer", "choose the roads layer")])
def test_bad_input_is_one_line_naming_the_file(run_cli, trio, make_tif, data, case, pattern):
    sr, lr, _ = trio
    extra, named = [], sr
    if case == "extent":
        with rasterio.open(sr) as s:
            sr = named = make_tif(s.read(), "moved.tif", crs=CRS, transform=T_SR @ Affine.translation(0, 8))
    elif case == "missing":
        sr = named = sr.with_name("nope.tif")
    elif case == "roads":
        named = sr.with_name("nope.gpkg")
        extra = ["--roads", named]
    else:  # two line layers, neither named after roads: which one is meant?
        import pyogrio.raw

        named = sr.with_name("layers.gpkg")
        line = shapely.to_wkb(np.array([shapely.LineString([(2679070, 1247950), (2679150, 1247950)])]))
        for layer in ("paths", "rails"):
            pyogrio.raw.write(named, geometry=line, field_data=[], fields=[], crs=CRS, layer=layer,
                              geometry_type="LineString", driver="GPKG")
        proc = run_cli("score", sr, "--lr", lr, "--roads", named, "--roads-layer", "paths", "-q")
        assert proc.returncode == 0, proc.stderr  # with the layer named, it works
        assert "vs vectors" in proc.stdout
        extra = ["--roads", named]
    proc = run_cli("score", sr, "--lr", lr, *extra, "-q")
    assert_one_line_error(proc, pattern)
    assert str(named) in proc.stderr


def test_no_roads_in_the_output_is_reported_not_a_crash(run_cli, make_tif):
    green = np.zeros((3, 64, 64), np.uint8)
    green[:] = np.array([60, 140, 50], np.uint8)[:, None, None]
    sr = make_tif(green, "sr.tif", crs=CRS, transform=T_SR)
    lr = make_tif(green[:, :16, :16], "lr.tif", crs=CRS, transform=T_SR @ Affine.scale(4))
    proc = run_cli("score", sr, "--lr", lr, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "roads: APLS - vs LR input" in proc.stdout and "(no roads in either graph)" in proc.stdout
    assert "buildings: 0 of 0 matched" in proc.stdout


# ------------------------------------------------------------------------------ vectors end to end


@pytest.fixture(scope="module")
def prague_scene(data, tmp_path_factory):
    """Prague's footprints rasterised bright on vegetation, in UTM 33N (not the layer's EPSG:3857): SR, LR."""
    from rasterio.features import rasterize
    from rasterio.warp import transform_bounds, transform_geom

    from geosr.scoring import vectors

    folder = tmp_path_factory.mktemp("prague")
    geoms, crs = vectors.read_layer(data / "vectors" / "prague_bubenec.gpkg", "buildings")
    x0, y0, x1, y1 = transform_bounds(crs, "EPSG:32633", *shapely.total_bounds(geoms))
    px, pad = 0.5, 100.0  # padding keeps roofs under 15 % of the scene, as the bright-class rule needs
    transform = Affine(px, 0, x0 - pad, 0, -px, y1 + pad)
    h, w = (int(np.ceil((y1 - y0 + 2 * pad) / px / 4)) * 4, int(np.ceil((x1 - x0 + 2 * pad) / px / 4)) * 4)
    utm = [transform_geom(crs, "EPSG:32633", shapely.geometry.mapping(g)) for g in geoms]
    roofs = rasterize(utm, out_shape=(h, w), transform=transform).astype(bool)
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = (70, 125, 60)
    rgb[roofs] = (235, 232, 228)
    lr = bench._resize(rgb, (h // 4, w // 4))

    def write(name, img, t):
        path = folder / name
        with rasterio.open(path, "w", driver="GTiff", height=img.shape[0], width=img.shape[1], count=3,
                           dtype="uint8", crs="EPSG:32633", transform=t) as dst:
            dst.write(np.moveaxis(img, -1, 0))
        return path

    wgs84 = folder / "buildings_4326.geojson"
    import pyogrio.raw

    ll = np.array([shapely.geometry.shape(transform_geom(crs, "EPSG:4326", shapely.geometry.mapping(g)))
                   for g in geoms], dtype=object)
    pyogrio.raw.write(wgs84, geometry=shapely.to_wkb(ll), field_data=[], fields=[], crs="EPSG:4326",
                      geometry_type="Polygon", driver="GeoJSON")
    return write("sr.tif", rgb, transform), write("lr.tif", lr, transform @ Affine.scale(4)), wgs84


def test_building_vectors_in_other_crss_are_reprojected_and_agree(data, prague_scene):
    sr, lr, wgs84 = prague_scene
    config = ScoreConfig(lpips=False)
    by_3857 = score_scene(sr, lr, buildings_path=data / "vectors" / "prague_bubenec.gpkg", config=config)
    by_4326 = score_scene(sr, lr, buildings_path=wgs84, config=config)
    a, b = by_3857.report["buildings"], by_4326.report["buildings"]
    assert a["against"].startswith("vectors") and a["reference_buildings"] == 144
    # the roofs were drawn from these very footprints: most match, and their orientation is kept
    # terraces touch, so the mask merges them into blocks: few one-to-one matches, but nearly every footprint is
    # covered by its block, whose orientation it keeps
    assert a["oriented"] >= 0.9 * 144 and a["matched"] >= 20
    assert a["angle_error_median_abs_deg"] < 3.0 and a["histogram_intersection"] > 0.6
    for key in ("reference_buildings", "output_buildings", "matched", "oriented"):
        assert a[key] == b[key]
    assert a["angle_error_median_abs_deg"] == pytest.approx(b["angle_error_median_abs_deg"], abs=1e-6)
    ref_a, ref_b = by_3857.building_polygons["reference"], by_4326.building_polygons["reference"]
    assert np.allclose(shapely.area(ref_a), shapely.area(ref_b), rtol=1e-6)


def test_progress_reports_every_step_then_done(trio):
    sr, lr, hr = trio
    calls = []
    score_scene(sr, lr, reference=hr, config=ScoreConfig(lpips=False), progress=lambda *a: calls.append(a))
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[0] == 0 and calls[-1] == (8, 8, "done")
    assert all(total == 8 and isinstance(msg, str) and msg for _, total, msg in calls)
    assert "no-reference metrics" in [msg for _, _, msg in calls]
