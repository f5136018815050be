"""The xarray accessor ``da.geosr``: registration, enhance (lazy, georeferenced as the CLI), modalities, score."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import rasterio

import geosr  # noqa: F401
from geosr.config import EnhanceConfig, ModalitiesConfig, ScoreConfig
from geosr.errors import ConfigError
from geosr.scene import enhance_scene

ZURICH = "fixtures/zurich_swissimage_tile00_175x120.tif"


@pytest.mark.parametrize("before", [
    "import geosr",
    "import xarray; import geosr",
    # a library looking xarray up without importing it must not cost the registration
    "import geosr, importlib.util; assert importlib.util.find_spec('xarray') and 'xarray' not in sys.modules",
])
def test_import_geosr_stays_light_and_registers_the_accessor(before):
    code = (f"import sys; {before}; "
            "assert 'torch' not in sys.modules and 'rioxarray' not in sys.modules, 'heavy import'; "
            "import xarray, numpy; a = xarray.DataArray(numpy.zeros((1, 2, 2), 'u1'), dims=('band', 'y', 'x')); "
            "print(type(a.geosr).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "GeosrAccessor"


def test_import_geosr_does_not_import_xarray():
    code = "import sys, geosr; print('xarray' in sys.modules, 'torch' in sys.modules, 'dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def _cli(src, dst, **kw):
    enhance_scene(src, dst, EnhanceConfig(threads=1, **kw))
    with rasterio.open(dst) as ds:
        return ds.read(), ds.transform, ds.crs, ds.nodata, ds.tags()


@pytest.mark.parametrize("name, model, scale, tile", [
    (ZURICH, "bicubic", 4, 64),
    ("fixtures/landsat7_bahamas_300m_rgb.tif", "lanczos", 2, 128),  # nodata 0
])
def test_enhance_on_a_chunked_file_is_lazy_and_matches_the_cli(data, tmp_path, name, model, scale, tile):
    import dask.array
    import rioxarray

    values, transform, crs, nodata, tags = _cli(data / name, tmp_path / "cli.tif", model=model, scale=scale,
                                                tile=tile)
    da = rioxarray.open_rasterio(data / name, chunks={"x": 64, "y": 64})
    out = da.geosr.enhance(scale=scale, model=model, tile=tile, threads=1)
    assert isinstance(out.data, dask.array.Array)  # lazy
    assert out.shape == values.shape and out.dtype == values.dtype
    assert out.rio.crs == crs and tuple(out.rio.transform()) == tuple(transform)  # exactly
    assert out.rio.nodata == nodata
    # coordinates are the output pixel centres, at the new resolution
    assert np.allclose(out.x.values[:2], [transform.c + transform.a * 0.5, transform.c + transform.a * 1.5])
    assert np.allclose(out.y.values[-1], transform.f + transform.e * (out.sizes["y"] - 0.5))
    assert np.allclose(np.diff(out.x.values), da.rio.resolution()[0] / scale)
    assert out.attrs["GEOSR_MODEL"] == tags["GEOSR_MODEL"] == model
    assert out.compute().values.tobytes() == values.tobytes()
    # written by rioxarray with the exact transform, the file has the CLI's grid and values
    out.rio.to_raster(tmp_path / "accessor.tif", recalc_transform=False)
    with rasterio.open(tmp_path / "accessor.tif") as ds:
        assert tuple(ds.transform) == tuple(transform) and ds.crs == crs and ds.nodata == nodata
        assert np.array_equal(ds.read(), values)
    # rioxarray's default recomputes the transform from the coordinates: equal to the last few digits
    out.rio.to_raster(tmp_path / "recalc.tif")
    with rasterio.open(tmp_path / "recalc.tif") as ds:
        assert np.allclose(tuple(ds.transform), tuple(transform), rtol=1e-12, atol=1e-9)


def test_enhance_in_memory_array_matches_the_cli_on_the_same_pixels(data, tmp_path):
    import rioxarray
    import xarray as xr

    values, transform, crs, _, _ = _cli(data / ZURICH, tmp_path / "cli.tif", model="bicubic", scale=2, tile=64)
    with rioxarray.open_rasterio(data / ZURICH) as opened:  # coordinates and CRS only; pixels copied to memory
        mem = xr.DataArray(opened.values.copy(), dims=opened.dims,
                           coords={"band": opened.band.values, "y": opened.y.values, "x": opened.x.values})
    mem = mem.rio.write_crs(opened.rio.crs)
    assert not mem.encoding.get("source")  # not a file view: scaled from its own pixels
    out = mem.geosr.enhance(scale=2, model="bicubic", tile=64, threads=1)
    assert out.rio.crs == crs and out.rio.transform() == transform
    assert out.values.tobytes() == values.tobytes()  # 8-bit: the same scaling as the file


def test_enhance_band_subset_and_2d_arrays(data):
    import rioxarray

    da = rioxarray.open_rasterio(data / ZURICH, chunks={"x": 64, "y": 64})
    two = da.geosr.enhance(scale=2, model="nearest", bands=(3, 1))
    assert list(two.band.values) == [3, 1]
    assert np.array_equal(two.values, np.repeat(np.repeat(da.values[[2, 0]], 2, 1), 2, 2))
    flat = da.isel(band=1).geosr.enhance(scale=2, model="nearest")
    assert flat.shape == (1, 240, 350)
    assert np.array_equal(flat.values[0], np.repeat(np.repeat(da.values[1], 2, 0), 2, 1))


def test_enhance_refuses_unknown_options(data):
    import rioxarray

    da = rioxarray.open_rasterio(data / ZURICH)
    with pytest.raises(ConfigError, match="unknown option tilesize"):
        da.geosr.enhance(scale=2, model="bicubic", tilesize=64)
    with pytest.raises(ConfigError, match="bands=\\[5\\]"):
        da.geosr.enhance(scale=2, model="bicubic", bands=(5,))


def test_modalities_match_extract_modalities(data, tmp_path):
    import rioxarray
    import xarray as xr

    from geosr.modalities import extract_modalities

    da = rioxarray.open_rasterio(data / ZURICH, chunks={"x": 64, "y": 64})
    ds = da.geosr.modalities()
    assert isinstance(ds, xr.Dataset) and {"edges", "segmentation"} <= set(ds.data_vars)
    assert ds.edges.shape == da.shape[1:] and np.array_equal(ds.x.values, da.x.values)
    assert ds.edges.rio.crs == da.rio.crs and ds.edges.rio.transform() == da.rio.transform()
    assert ds.attrs["caption"]
    result = extract_modalities(data / ZURICH, tmp_path / "m", ModalitiesConfig())
    for var, key in (("edges", "edges"), ("segmentation", "segmentation")):
        with rasterio.open(result.files[key]) as f:
            assert np.array_equal(ds[var].values, f.read(1))
    # an in-memory array goes through a temporary GeoTIFF: same maps
    mem = da.load().copy()
    mem.encoding = {}
    assert np.array_equal(mem.geosr.modalities().edges.values, ds.edges.values)


def test_score_matches_score_scene_on_files(data, tmp_path):
    pytest.importorskip("networkx")
    import rioxarray

    from geosr.scoring import score_scene

    _cli(data / ZURICH, tmp_path / "sr.tif", model="bicubic", scale=2, tile=64)
    config = ScoreConfig(lpips=False)
    files = score_scene(tmp_path / "sr.tif", data / ZURICH, config=config).report
    lr = rioxarray.open_rasterio(data / ZURICH, chunks={"x": 64, "y": 64})
    sr = lr.geosr.enhance(scale=2, model="bicubic", tile=64, threads=1)
    result = sr.geosr.score(lr=lr, config=config)
    got = result.report
    assert got["faithfulness"]["lr_consistency_db"] == files["faithfulness"]["lr_consistency_db"]
    assert got["semantic"] == files["semantic"]
    assert got["inputs"]["scale"] == 2 and got["inputs"]["crs"] == files["inputs"]["crs"]
    assert result.maps["map"].shape == (240, 350)
    with pytest.raises(ConfigError, match="lr=None"):
        sr.geosr.score(lr=None)


def test_enhance_reports_progress_and_stops_on_should_stop(data, tmp_path):
    import rioxarray

    from geosr.scene import Cancelled

    values = _cli(data / ZURICH, tmp_path / "cli.tif", model="bicubic", scale=2, tile=48)[0]
    da = rioxarray.open_rasterio(data / ZURICH, chunks={"x": 64, "y": 64})
    seen = []
    out = da.geosr.enhance(scale=2, model="bicubic", tile=48, threads=1,
                           progress=lambda d, t, m: seen.append((d, t)))
    assert seen == []  # lazy: nothing ran yet
    assert out.values.tobytes() == values.tobytes()  # the callback changes no bit
    total = seen[-1][1]
    assert total >= 6 and seen == [(k, total) for k in range(total + 1)]

    ran = []
    stopping = da.geosr.enhance(scale=2, model="bicubic", tile=48, threads=1,
                                progress=lambda d, t, m: ran.append(d), should_stop=lambda: len(ran) > 2)
    with pytest.raises(Cancelled, match="cancelled"):
        stopping.compute(scheduler="synchronous")
    assert ran == [0, 1, 2]  # two tiles, then the stop before the third
