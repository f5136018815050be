"""``--model mmsr`` in the tiled engine and the CLI, on a tiny random checkpoint built here (seconds on CPU)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import rasterio

pytest.importorskip("diffusers")

from conftest import save_tiny_mmsr  # noqa: E402

from geosr.config import EnhanceConfig, data_dir  # noqa: E402
from geosr.errors import ConfigError, WeightsError  # noqa: E402
from geosr.models.mmsr.bundle import MMSRBundle  # noqa: E402
from geosr.models.mmsr.model import MMSRModel, parse_temperatures, tile_seed  # noqa: E402
from geosr.scene import enhance_array, enhance_scene  # noqa: E402

FIXTURE = data_dir() / "fixtures" / "zurich_swissimage_tile00_175x120.tif"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_mmsr(tmp_path_factory.mktemp("mmsr") / "tiny")


@pytest.fixture(scope="module")
def small_tif(tmp_path_factory):
    """A 40 x 36 crop of a real SWISSIMAGE tile, EPSG:2056."""
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} not found (set GEOSR_DATA)")
    path = tmp_path_factory.mktemp("scene") / "crop.tif"
    with rasterio.open(FIXTURE) as src:
        window = rasterio.windows.Window(20, 30, 40, 36)
        profile = src.profile | {"width": 40, "height": 36, "transform": src.window_transform(window),
                                 "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return path


def config(checkpoint, **kw) -> EnhanceConfig:
    return EnhanceConfig(**({"model": "mmsr", "checkpoint": str(checkpoint), "steps": 2, "tile": 16, "overlap": 4,
                             "threads": 1} | kw))


def test_parse_temperatures_aliases_and_errors():
    assert parse_temperatures("depth=0.5,edge=2") == {"depth": 0.5, "edges": 2.0}
    assert parse_temperatures({"seg": 3}) == {"segmentation": 3.0}
    assert parse_temperatures(None) == {}
    for bad in ("depth=0", "depth=abc", "edges=-1", "edges"):
        with pytest.raises(ConfigError, match="--temperature"):
            parse_temperatures(bad)


def test_samsr_low_strength_stays_near_the_conditioning_image(checkpoint):
    """With every class at a tiny strength the sampler keeps the bicubic conditioning image (residual model)."""
    from geosr.models.resample import bicubic

    rng = np.random.default_rng(1)
    image = (rng.random((3, 16, 16)) * 255).astype(np.uint8)
    cond = bicubic().upscale(image.astype(np.float32) / 255, 4) * 255
    weak = "other=0.01,vegetation=0.01,water=0.01,shadow=0.01,bright=0.01"
    kept = enhance_array(image, config(checkpoint, samsr_strength=weak)).astype(float)
    free = enhance_array(image, config(checkpoint)).astype(float)
    assert np.abs(kept - cond).mean() < 0.25 * np.abs(free - cond).mean()


def test_tile_seed_depends_on_pixels_and_seed():
    a = np.zeros((3, 4, 4), np.float32)
    b = a.copy()
    b[0, 0, 0] = 1e-3
    assert tile_seed(0, a) == tile_seed(0, a.copy())
    assert len({tile_seed(0, a), tile_seed(0, b), tile_seed(1, a)}) == 3


def test_enhance_scene_georeferencing_tags_and_reproducibility(checkpoint, small_tif, tmp_path):
    cfg = config(checkpoint, guidance=2.0, guidance_mode="m-cfg")
    r1 = enhance_scene(small_tif, tmp_path / "a.tif", cfg)
    r2 = enhance_scene(small_tif, tmp_path / "b.tif", cfg)
    with rasterio.open(small_tif) as src, rasterio.open(r1.path) as a, rasterio.open(r2.path) as b:
        assert (a.width, a.height, a.count, a.dtypes[0]) == (160, 144, 3, src.dtypes[0])
        assert a.crs == src.crs
        assert a.transform == src.transform @ rasterio.Affine.scale(0.25)
        assert a.tags()["GEOSR_MODEL"] == "mmsr"
        assert a.tags()["GEOSR_CAPTION"].startswith("aerial image; ")
        assert "geosr-trained:tiny" in a.tags()["GEOSR_WEIGHTS_SOURCE"]
        x, y = a.read(), b.read()
    np.testing.assert_array_equal(x, y)  # same seed, same settings: same bytes
    assert x.std() > 0


def test_settings_change_the_output(checkpoint):
    rng = np.random.default_rng(0)
    image = (rng.random((3, 24, 24)) * 255).astype(np.uint8)
    base = enhance_array(image, config(checkpoint))
    for kw in ({"seed": 1}, {"temperatures": "edges=0.3,segmentation=5"}, {"guidance": 4.0}, {"samsr_noise": 1.0},
               {"samsr_strength": "other=0.3,vegetation=0.3,bright=0.3,shadow=0.3,water=0.3"}):
        other = enhance_array(image, config(checkpoint, **kw))
        assert other.shape == base.shape == (3, 96, 96)
        assert np.abs(other.astype(int) - base.astype(int)).max() > 0, kw


def test_missing_checkpoint_and_bad_settings(checkpoint, tmp_path, monkeypatch):
    import geosr.models.mmsr.model as mmsr_model

    monkeypatch.setattr(mmsr_model, "EMBEDDED", tmp_path / "not-committed")  # a copy without the embedded one
    model = MMSRModel()
    with pytest.raises(WeightsError, match="--checkpoint"):
        model.prepare()
    monkeypatch.undo()
    with pytest.raises(WeightsError, match="not an MMSR checkpoint"):
        MMSRModel(checkpoint=tmp_path).prepare()
    with pytest.raises(WeightsError, match="no such folder"):
        MMSRModel(checkpoint=tmp_path / "nope").prepare()
    with pytest.raises(ConfigError, match="unknown name foo"):
        MMSRModel().configure(config(checkpoint, temperatures="foo=2"))
    with pytest.raises(ConfigError, match="--samsr-strength roads: unknown class"):
        MMSRModel().configure(config(checkpoint, samsr_strength="roads=0.5"))
    with pytest.raises(ConfigError, match=r"--samsr-strength water=2: give a strength in \(0, 1\]"):
        MMSRModel().configure(config(checkpoint, samsr_strength="water=2"))
    with pytest.raises(ConfigError, match="--steps"):
        MMSRModel().configure(config(checkpoint, steps=0))


def test_bundle_records_a_weights_digest(checkpoint):
    digest = MMSRBundle.load(checkpoint).meta["sha256"]
    assert len(digest) == 64 and int(digest, 16) > 0


def test_cli_enhance_mmsr_with_guidance_and_temperatures(checkpoint, small_tif, tmp_path):
    out = tmp_path / "cli.tif"
    cmd = [sys.executable, "-m", "geosr", "enhance", str(small_tif), "-o", str(out), "--model", "mmsr",
           "--checkpoint", str(checkpoint), "--guidance", "4", "--guidance-mode", "m-cfg",
           "--temperature", "depth=0.5,edge=2", "--steps", "2", "--tile", "16", "--overlap", "4", "-q"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    with rasterio.open(out) as ds:
        params = ds.tags()["GEOSR_PARAMETERS"]
        assert (ds.width, ds.height) == (160, 144)
    assert '"guidance": 4.0' in params and '"guidance_mode": "m-cfg"' in params and "edge=2" in params
    bad = subprocess.run(cmd[:-9] + ["--temperature", "edges=zero", "--overwrite"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "--temperature" in bad.stderr
