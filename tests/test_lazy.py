"""The lazy engine (geosr.lazy): the same bits as enhance_scene / enhance_array, streamed, and lazy."""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import rasterio

from geosr.config import EnhanceConfig
from geosr.io.read import scene_from_array
from geosr.lazy import enhance_lazy, open_source, to_dataarray
from geosr.models.base import SRModel
from geosr.scene import enhance_array, enhance_scene

CASES = [  # fixture, model, tile, scale, edge: multi-tile, with nodata (0, 255) and without (float64, 4 bands)
    ("fixtures/landsat7_bahamas_300m_rgb.tif", "bicubic", 96, 2, None),
    ("fixtures/neon_osbs_forest_0p1m_rgb.tif", "lanczos", 96, 3, "reflect"),
    ("scenes/rotterdam_ms_1m_bgrn.tif", "bicubic", 80, 2, None),
    ("fixtures/naip_northdakota_5m_rgbn.tif", "nearest", 200, 2, None),
]


@pytest.mark.parametrize("name, model, tile, scale, edge", CASES)
def test_lazy_equals_enhance_scene_bit_for_bit(data, tmp_path, name, model, tile, scale, edge):
    import rioxarray

    src = data / name
    config = EnhanceConfig(model=model, tile=tile, scale=scale, edge=edge, threads=1)
    enhance_scene(src, tmp_path / "cli.tif", config)
    with rasterio.open(tmp_path / "cli.tif") as ds:
        expected, transform, crs, nodata = ds.read(), ds.transform, ds.crs, ds.nodata

    lazy = enhance_lazy(open_source(src), config)
    assert len(lazy.grid) > 4  # several tiles, so blending is exercised
    assert lazy.array.shape == expected.shape and lazy.array.dtype == expected.dtype
    assert lazy.array.compute().tobytes() == expected.tobytes()

    # a DataArray opened by rioxarray, with chunks that do not line up with the tiles
    da = rioxarray.open_rasterio(src, chunks={"band": 1, "x": 70, "y": 90})
    out = to_dataarray(enhance_lazy(open_source(da), config))
    assert out.compute().values.tobytes() == expected.tobytes()
    assert out.rio.transform() == transform and out.rio.crs == crs
    assert (out.rio.nodata is None and nodata is None) or out.rio.nodata == nodata


class TinyNet(SRModel):
    """A random 2-layer conv net with pixel shuffle (x2): cheap, non-linear, reaches 2 px."""

    name, channels, scales, receptive_field, default_tile, edge = "tiny", 3, (2,), 2, 32, "cut"

    def __init__(self):
        import torch

        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.PixelShuffle(2))

    def upscale(self, x, scale):
        import torch

        with torch.inference_mode():
            return self.net(torch.from_numpy(np.ascontiguousarray(x))[None])[0].numpy()


def test_lazy_equals_enhance_array_with_a_tiny_network_and_nan_nodata():
    from conftest import texture

    image = texture((4, 90, 110), "float32", seed=3, lo=-5, hi=300)  # 4 bands: RGB together + one band alone
    image[:, 10:30, 40:70] = np.nan  # a hole in the footprint
    config = EnhanceConfig(scale=2, tile=32, overlap=8, threads=1)
    expected = enhance_array(image, config, model=TinyNet())
    lazy = enhance_lazy(scene_from_array(image), config, model=TinyNet())
    assert len(lazy.grid) >= 12
    got = lazy.array.compute()
    assert got.tobytes() == expected.tobytes()
    assert np.isnan(got[:, 20:60, 80:140]).all() and np.isfinite(got[:, :20]).all()


def test_graph_is_lazy_deterministic_and_computes_only_needed_tiles(data):
    import geosr.lazy as lazy_mod

    src = data / "fixtures/landsat7_bahamas_300m_rgb.tif"
    config = EnhanceConfig(model="bicubic", tile=64, scale=2, threads=1)
    calls = []
    real = lazy_mod._tile_task

    def counting(run, tile, window):
        calls.append((tile.row, tile.col))
        return real(run, tile, window)

    lazy_mod._tile_task = counting
    try:
        a = enhance_lazy(open_source(src), config)
        b = enhance_lazy(open_source(src), config)
        assert calls == []  # building runs no tile
        assert a.array.name == b.array.name  # same input and settings: same keys (resumable runs need that)
        assert enhance_lazy(open_source(src), EnhanceConfig(model="lanczos", tile=64, scale=2)).array.name != a.array.name
        corner = a.array[:, :40, :40].compute()
    finally:
        lazy_mod._tile_task = real
    assert calls == [(0, 0)]  # a window at the corner needs its tile only
    assert corner.shape == (3, 40, 40)


class ChunkReads:
    """Input pixels made on demand, chunk by chunk; counts the bytes of chunks alive at once."""

    def __init__(self):
        self.alive = self.peak = self.reads = 0

    def __call__(self, x, block_info=None):
        (b0, b1), (r0, r1), (c0, c1) = block_info[None]["array-location"]
        rr, cc = np.mgrid[r0:r1, c0:c1]
        out = np.stack([((rr * 7 + cc * 13 + 50 * b) % 251).astype(np.uint8) for b in range(b0, b1)])
        self.reads += 1
        self.alive += out.nbytes
        self.peak = max(self.peak, self.alive)
        weakref.finalize(out, self._free, out.nbytes)
        return out

    def _free(self, n):
        self.alive -= n


def test_computing_a_big_scene_streams_its_input():
    """8192 x 1024 x 3 (25 MB) in 256 px chunks: each input chunk is read once, and only a few rows of chunks
    are ever alive at once -- whatever order dask runs the tasks in."""
    import dask.array as da
    import xarray as xr

    import geosr  # noqa: F401  (registers da.geosr)

    reads = ChunkReads()
    shape = (3, 8192, 1024)
    pixels = da.map_blocks(reads, da.empty(shape, dtype=np.uint8, chunks=(1, 256, 256)), dtype=np.uint8)
    out = xr.DataArray(pixels, dims=("band", "y", "x")).geosr.enhance(scale=2, model="nearest", tile=256,
                                                                    threads=1)
    reads_before = reads.reads  # the scene statistics and overview read decimated views, chunk by chunk
    assert reads.peak <= 3 * 256 * 256  # ...one chunk at a time

    class Sink:  # takes each finished chunk and forgets it (so only the engine's own memory counts)
        total = size = 0

        def __setitem__(self, key, value):
            Sink.total += int(value.sum(dtype=np.int64))
            Sink.size += value.size

    reads.peak = 0
    da.store(out.data, Sink(), lock=True)
    n_chunks = 3 * 32 * 4
    assert reads.reads - reads_before == n_chunks  # every input chunk read exactly once
    assert reads.peak < 0.2 * np.prod(shape), f"{reads.peak / 1e6:.1f} MB of input alive at once"
    assert Sink.size == 4 * np.prod(shape)  # every output pixel written once
    assert Sink.total == 4 * int(pixels.sum(dtype=np.int64).compute())  # nearest x2: each pixel 4 times


@pytest.fixture(scope="module")
def tiny_mmsr(tmp_path_factory):
    pytest.importorskip("diffusers")
    from conftest import save_tiny_mmsr

    return save_tiny_mmsr(tmp_path_factory.mktemp("mmsr") / "tiny")


def test_mmsr_lazy_equals_enhance_scene_and_begins_each_scene_once(data, tmp_path, tiny_mmsr, monkeypatch):
    """The diffusion model: same bits as the CLI path; its per-scene step (the caption) runs once per lazy
    array; a second lazy array with other settings, built before the first is computed, changes nothing."""
    from geosr.models.mmsr.model import MMSRModel

    with rasterio.open(data / "fixtures/zurich_swissimage_tile00_175x120.tif") as src:
        window = rasterio.windows.Window(20, 30, 40, 36)
        profile = src.profile | {"width": 40, "height": 36, "transform": src.window_transform(window), "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        with rasterio.open(tmp_path / "crop.tif", "w", **profile) as dst:
            dst.write(src.read(window=window))
    configs = [EnhanceConfig(model="mmsr", checkpoint=str(tiny_mmsr), steps=2, tile=16, overlap=4, threads=1,
                             seed=seed, temperatures=temps) for seed, temps in ((0, None), (5, "edges=3"))]
    expected = []
    for k, config in enumerate(configs):
        enhance_scene(tmp_path / "crop.tif", tmp_path / f"cli{k}.tif", config)
        with rasterio.open(tmp_path / f"cli{k}.tif") as ds:
            expected.append(ds.read())
    assert not np.array_equal(expected[0], expected[1])

    begun = []
    real = MMSRModel.begin_scene
    monkeypatch.setattr(MMSRModel, "begin_scene", lambda self, *a, **k: (begun.append(1), real(self, *a, **k))[1])
    lazies = [enhance_lazy(open_source(tmp_path / "crop.tif"), config) for config in configs]
    assert len(begun) == 2  # once per scene, when the graph is built
    assert len(lazies[0].grid) >= 9
    for lazy, want in zip(reversed(lazies), reversed(expected)):  # computed in the other order
        assert lazy.array.compute().tobytes() == want.tobytes()
    assert len(begun) == 2  # computing runs no begin_scene
    assert lazies[0].tags["GEOSR_CAPTION"] and lazies[0].tags["GEOSR_MODEL"] == "mmsr"


def test_graph_runs_in_other_processes(data, tmp_path):
    """What a distributed runner needs: the graph pickles (workers get the file by path, the model without its
    weights) and other processes compute the same bits."""
    import rioxarray

    src = data / "fixtures/landsat7_bahamas_300m_rgb.tif"
    config = EnhanceConfig(model="bicubic", scale=2, tile=128, threads=1)
    enhance_scene(src, tmp_path / "cli.tif", config)
    with rasterio.open(tmp_path / "cli.tif") as ds:
        expected = ds.read()
    lazy = enhance_lazy(open_source(rioxarray.open_rasterio(src, chunks={"x": 200, "y": 200})), config)
    got = lazy.array.compute(scheduler="processes", num_workers=2)
    assert got.tobytes() == expected.tobytes()


def test_torch_models_pickle_without_weights_and_load_once_per_process():
    import pickle

    from geosr.models import get_model

    model = get_model("realesrgan-x4plus")
    if not model.weights_present():
        pytest.skip("realesrgan-x4plus weights not fetched (geosr weights fetch)")
    model.prepare()
    copy = pickle.loads(pickle.dumps(model))
    assert copy._net is None  # the weights do not travel
    copy.prepare()
    assert copy._net is model._net  # this process loaded them once


# ------------------------------------------------------------------------------------------ progress and cancel


def _landsat(data, tmp_path, **kw):
    src = data / "fixtures/landsat7_bahamas_300m_rgb.tif"
    config = EnhanceConfig(model="bicubic", tile=128, scale=2, threads=1, **kw)
    enhance_scene(src, tmp_path / "cli.tif", config)
    with rasterio.open(tmp_path / "cli.tif") as ds:
        return src, config, ds.read()


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_progress_counts_every_tile_once_per_compute_and_keeps_the_bits(data, tmp_path, scheduler):
    src, config, expected = _landsat(data, tmp_path)
    seen = []
    lazy = enhance_lazy(open_source(src), config, progress=lambda d, t, m: seen.append((d, t, m)))
    total = len(lazy.grid)
    assert total >= 9 and seen == []  # building runs no tile, reports nothing
    assert lazy.array.compute(scheduler=scheduler).tobytes() == expected.tobytes()
    assert seen == [(0, total, "starting")] + [(k, total, f"tile {k}/{total}") for k in range(1, total + 1)]
    seen.clear()  # a window runs only its tiles: its count stops short of the total
    assert lazy.array[:, :40, :40].compute(scheduler=scheduler).shape == (3, 40, 40)
    assert seen == [(0, total, "starting"), (1, total, f"tile 1/{total}")]
    seen.clear()  # each compute is a new pass: counted from 0 again
    assert lazy.array.compute(scheduler=scheduler).tobytes() == expected.tobytes()
    assert [d for d, _, _ in seen] == list(range(total + 1))
    plain = enhance_lazy(open_source(src), config)
    assert plain.array.name == lazy.array.name  # the hooks change no key


def test_should_stop_cancels_the_compute_before_the_remaining_tiles(data, tmp_path):
    import geosr.lazy as lazy_mod
    from geosr.scene import Cancelled

    src, config, expected = _landsat(data, tmp_path)
    ran, seen, stop = [], [], [True]
    real = lazy_mod._tile_task

    def counting(run, tile, window):
        ran.append((tile.row, tile.col))
        return real(run, tile, window)

    lazy_mod._tile_task = counting
    try:
        lazy = enhance_lazy(open_source(src), config, progress=lambda d, t, m: seen.append(d),
                            should_stop=lambda: stop[0] and len(seen) > 3)  # after 3 tiles ("starting" + 3)
        total = len(lazy.grid)
        pool = ThreadPoolExecutor(2)  # dask's threads, but waited for: tiles in flight at the stop end in it
        with pytest.raises(Cancelled):
            lazy.array.compute(scheduler="threads", pool=pool)
        pool.shutdown(wait=True)
        assert 3 <= len(ran) < total  # the model ran for fewer tiles than the scene has
        # a tile that began before the stop was seen may still report; none after it (at most 2 threads)
        assert seen == list(range(len(seen))) and 4 <= len(seen) <= 5
        ran.clear(), seen.clear()
        with pytest.raises(Cancelled):
            lazy.array.compute(scheduler="synchronous")
        assert len(ran) == 3 and seen == [0, 1, 2, 3]  # one tile at a time: exactly 3, then the stop
        ran.clear(), seen.clear()
        stop[0] = False  # the same array computes in full once should_stop says go on
        assert lazy.array.compute().tobytes() == expected.tobytes()
    finally:
        lazy_mod._tile_task = real
    assert len(ran) == total and seen == list(range(total + 1))


def test_progress_true_draws_a_tqdm_bar_and_bad_values_are_refused(data, tmp_path, capsys):
    from geosr.errors import ConfigError

    src, config, expected = _landsat(data, tmp_path)
    lazy = enhance_lazy(open_source(src), config, progress=True)
    assert lazy.array.compute().tobytes() == expected.tobytes()
    err = capsys.readouterr().err  # outside a notebook tqdm.auto is the terminal bar, on stderr
    total = len(lazy.grid)
    assert f"{total}/{total}" in err and f"tile {total}/{total}" in err
    with pytest.raises(ConfigError, match="progress='yes': give a callback"):
        enhance_lazy(open_source(src), config, progress="yes")
    with pytest.raises(ConfigError, match="not for a distributed graph"):
        enhance_lazy(open_source(src), config, remote=True, should_stop=lambda: False)
