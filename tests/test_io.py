"""Reading and writing through enhance_scene: georeferencing, nodata, dtypes, bands, COG, atomic writes."""

import warnings

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp

from conftest import texture
from geosr.config import EnhanceConfig
from geosr.errors import InputError, OutputError
from geosr.io.read import open_scene
from geosr.models import get_model
from geosr.models.base import SRModel
from geosr.models.resample import Replicate
from geosr.scene import band_groups, enhance_scene

FIXTURES = [
    "zurich_swissimage_tile00_175x120.tif", "zurich_swissimage_tile01_175x120.tif",
    "naip_milwaukee_airport_0p6m.tif", "naip_sandiego_road_0p6m.tif", "naip_northdakota_5m_rgbn.tif",
    "sentinel2_netherlands_10m_4band_f64.tif", "landsat7_bahamas_300m_rgb.tif", "neon_osbs_forest_0p1m_rgb.tif",
]


@pytest.mark.parametrize("name", FIXTURES)
def test_georeferencing_round_trip_on_fixtures(data, tmp_path, name):
    src = data / "fixtures" / name
    out = tmp_path / "out.tif"
    scale = 2
    enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=scale, tile=160, overlap=8))
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert b.crs == a.crs
        assert b.transform == a.transform @ Affine.scale(1 / scale)
        assert b.bounds == pytest.approx(a.bounds, abs=1e-9 * max(map(abs, a.bounds)))
        assert (b.width, b.height, b.count) == (a.width * scale, a.height * scale, a.count)
        assert b.dtypes == a.dtypes
        assert b.nodata == a.nodata
        assert b.tags()["GEOSR_MODEL"] == "bicubic"
        assert b.profile["tiled"] and b.profile["compress"] == "deflate"


@pytest.mark.parametrize("name", ["landsat7_bahamas_300m_rgb.tif", "neon_osbs_forest_0p1m_rgb.tif"])
def test_nodata_lies_exactly_where_input_was_nodata(data, tmp_path, name):
    src = data / "fixtures" / name
    out = tmp_path / "out.tif"
    enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=2, tile=200, overlap=8))
    with rasterio.open(src) as a, rasterio.open(out) as b:
        nd = a.nodata
        assert nd is not None
        invalid_in = (a.read() == nd).all(axis=0)  # the footprint: every band nodata
        assert invalid_in.any() and not invalid_in.all()
        expected = np.repeat(np.repeat(invalid_in, 2, 0), 2, 1)
        out_data = b.read()
        assert ((out_data == nd).all(axis=0) == expected).all()
        # no valid pixel was given the nodata value in every band
        assert not (out_data == nd).all(axis=0)[~expected].any()


@pytest.mark.parametrize("dtype,hi", [("uint8", 255), ("uint16", 4000), ("int16", 3000), ("float32", 1.5),
                                      ("float64", 0.3)])
def test_dtype_and_value_range_round_trip(make_tif, tmp_path, dtype, hi):
    arr = texture((3, 40, 50), dtype=dtype, hi=hi)
    src = make_tif(arr)
    out = tmp_path / "out.tif"
    enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=2, tile=24, overlap=8))
    with rasterio.open(out) as b:
        res = b.read()
    assert res.dtype == np.dtype(dtype)
    # bicubic keeps values near the input range (small overshoot only)
    assert res.min() >= arr.min() - 0.1 * hi and res.max() <= arr.max() + 0.1 * hi
    assert abs(res.astype(np.float64).mean() - arr.astype(np.float64).mean()) < 0.02 * hi


def test_replication_model_reproduces_u16_exactly(make_tif, tmp_path, monkeypatch):
    arr = texture((2, 33, 47), dtype="uint16", hi=60000)
    src = make_tif(arr, nodata=0)
    arr_nd = arr.copy()
    out = tmp_path / "out.tif"
    import geosr.scene as scene_mod

    monkeypatch.setattr(scene_mod, "get_model", lambda name, device="cpu": Replicate())
    enhance_scene(src, out, EnhanceConfig(model="nearest", scale=3, tile=16, overlap=4))
    with rasterio.open(out) as b:
        np.testing.assert_array_equal(b.read(), np.repeat(np.repeat(arr_nd, 3, 1), 3, 2))


def test_band_descriptions_and_colorinterp_kept(make_tif, tmp_path):
    src = make_tif(texture((3, 30, 30)), photometric="RGB")
    with rasterio.open(src, "r+") as ds:
        for i, d in enumerate(["red", "green", "blue"], 1):
            ds.set_band_description(i, d)
    out = tmp_path / "out.tif"
    enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=2, tile=40, overlap=8))
    with rasterio.open(out) as b:
        assert b.descriptions == ("red", "green", "blue")
        assert tuple(b.colorinterp) == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)


def test_band_selection(data, tmp_path):
    src = data / "fixtures" / "naip_sandiego_road_0p6m.tif"
    out = tmp_path / "out.tif"
    enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=2, bands=(3, 1), tile=200, overlap=8))
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert b.count == 2
        # band 1 of the output is band 3 of the input: compare means
        assert abs(b.read(1).mean() - a.read(3).mean()) < 2
        assert abs(b.read(2).mean() - a.read(1).mean()) < 2


def test_band_rule_for_rgb_models():
    rgb = get_model("rrdn-gan")
    assert band_groups(rgb, (False,)) == [([0], "single")]
    assert band_groups(rgb, (False,) * 4) == [([0, 1, 2], "model"), ([3], "single")]
    assert band_groups(rgb, (False, False, False, True)) == [([0, 1, 2], "model"), ([3], "nearest")]
    assert band_groups(get_model("bicubic"), (False,) * 5) == [([0, 1, 2, 3, 4], "model")]


def test_alpha_band_is_replicated_not_modelled(data):
    scene = open_scene(data / "scenes" / "vegas_img0_0p3m_rgba.tif")
    assert scene.alpha == (False, False, False, True)


def test_nir_called_alpha_by_gdal_is_still_imagery(data):
    """NAIP's 4th band is NIR even where GDAL labels it alpha: it has many values, so it is enhanced."""
    scene = open_scene(data / "fixtures" / "naip_milwaukee_airport_0p6m.tif")
    assert scene.alpha[3] is False or scene.colorinterp[3] != ColorInterp.alpha


def test_scaling_is_per_scene_not_per_tile(make_tif, tmp_path):
    """A dark tile next to a bright one must come back with its own values, not stretched."""
    arr = np.zeros((3, 40, 80), dtype=np.uint16)
    arr[:, :, :40] = 1000
    arr[:, :, 40:] = 3000
    src = make_tif(arr)
    out = tmp_path / "out.tif"
    enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=2, tile=24, overlap=8))
    with rasterio.open(out) as b:
        res = b.read()
    assert np.all(res[:, :, :60] == 1000) and np.all(res[:, :, 100:] == 3000)


def test_rotated_transform_is_supported_exactly(make_tif, tmp_path):
    t = Affine.translation(500000, 5200000) @ Affine.rotation(20) @ Affine.scale(0.5, -0.5)
    src = make_tif(texture((3, 30, 40)), transform=t)
    out = tmp_path / "out.tif"
    enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=4, tile=40, overlap=8))
    with rasterio.open(out) as b:
        assert b.transform.almost_equals(t @ Affine.scale(0.25))
        for corner in [(0, 0), (40, 0), (0, 30), (40, 30)]:
            x, y = t @ corner
            bx, by = b.transform @ (corner[0] * 4, corner[1] * 4)
            assert (bx, by) == pytest.approx((x, y), abs=1e-6)


def test_non_georeferenced_png_is_accepted_with_warning(tmp_path):
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.fromarray(np.moveaxis(texture((3, 30, 40)), 0, -1)).save(png)
    out = tmp_path / "out.tif"
    with pytest.warns(UserWarning, match="no CRS"):
        enhance_scene(png, out, EnhanceConfig(model="bicubic", scale=2, tile=40, overlap=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(out) as b:
            assert b.crs is None and (b.width, b.height) == (80, 60)


def test_cog_output_is_valid_cog(data, tmp_path):
    out = tmp_path / "out.tif"
    enhance_scene(data / "fixtures" / "neon_osbs_forest_0p1m_rgb.tif", out,
                  EnhanceConfig(model="bicubic", scale=2, cog=True, tile=256, overlap=8))
    with rasterio.open(out) as b:
        assert b.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert b.overviews(1), "a COG of this size carries overviews"
        assert b.tags()["GEOSR_MODEL"] == "bicubic"


def test_existing_output_is_never_overwritten_without_flag(make_tif, tmp_path):
    src = make_tif(texture((3, 20, 20)))
    out = tmp_path / "out.tif"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="--overwrite"):
        enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=2, tile=40, overlap=8))
    assert out.read_bytes() == b"precious"
    enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=2, tile=40, overlap=8, overwrite=True))
    with rasterio.open(out) as b:
        assert b.width == 40
    assert [p.name for p in tmp_path.iterdir() if "geosr-part" in p.name] == []


def test_failure_mid_run_leaves_nothing_and_input_untouched(make_tif, tmp_path, monkeypatch):
    src = make_tif(texture((3, 60, 60)))
    before = src.read_bytes()
    out = tmp_path / "out.tif"
    import geosr.scene as scene_mod

    calls = {"n": 0}
    real = scene_mod._run_model

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(scene_mod, "_run_model", flaky)
    with pytest.raises(OutputError, match="No space left"):
        enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=2, tile=24, overlap=8))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]
    assert src.read_bytes() == before


def test_complex_dtype_refused(make_tif):
    src = make_tif(np.ones((1, 8, 8), dtype=np.complex64))
    with pytest.raises(InputError, match="complex"):
        open_scene(src)


class RGBOnly(SRModel):
    """A stand-in 3-channel model that records what it was given (x4, adds 0.1 so its effect is visible)."""

    name, channels, scales, receptive_field, default_tile = "rgb-only", 3, (4,), 1, 64

    def __init__(self):
        self.calls = []

    def upscale(self, x, scale):
        assert x.shape[0] == 3, x.shape
        self.calls.append(x.copy())
        return np.repeat(np.repeat(x, scale, 1), scale, 2) + 0.1


@pytest.mark.parametrize("bands", [1, 4])
def test_band_rule_end_to_end_with_an_rgb_model(bands):
    from geosr.scene import enhance_array

    arr = texture((bands, 20, 24), dtype="float32", hi=1.0)
    model = RGBOnly()
    out = enhance_array(arr, EnhanceConfig(scale=4, tile=64, overlap=4), model=model)
    assert out.shape == (bands, 80, 96)
    n_single = sum(np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2]) for x in model.calls)
    if bands == 1:  # the lone band, repeated to RGB, in every call
        assert n_single == len(model.calls) > 0
    else:  # per tile: one RGB call with bands 1-3, one single-band call for band 4
        assert 2 * n_single == len(model.calls) > 0
    # every band was modelled: the model's +0.1 shows in every band (in input units)
    scale_span = arr.max() - arr.min()
    assert np.all(np.abs(out - np.repeat(np.repeat(arr, 4, 1), 4, 2) - 0.1 * scale_span) < 0.02 * scale_span + 1e-6)


def test_scene_smaller_than_one_tile(make_tif, tmp_path):
    arr = texture((3, 5, 7))
    src = make_tif(arr)
    out = tmp_path / "tiny.tif"
    enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=4))
    with rasterio.open(out) as b:
        assert (b.width, b.height) == (28, 20)
        assert abs(float(b.read().mean()) - float(arr.mean())) < 3


def test_should_stop_cancels_and_leaves_nothing(make_tif, tmp_path):
    from geosr.scene import Cancelled

    src = make_tif(texture((3, 64, 64)))
    out = tmp_path / "out.tif"
    seen = []
    with pytest.raises(Cancelled):
        enhance_scene(src, out, EnhanceConfig(model="bicubic", scale=2, tile=24, overlap=8),
                      progress=lambda d, t, m: seen.append((d, t)), should_stop=lambda: len(seen) >= 3)
    total = seen[0][1]
    assert seen == [(0, total), (1, total), (2, total)] and total > 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]
