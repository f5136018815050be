import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from geosr.config import data_dir

DATA = data_dir()
GEOSR = shutil.which("geosr", path=str(Path(sys.executable).parent)) or shutil.which("geosr")


def pytest_collection_modifyitems(config, items):
    if not DATA.is_dir():
        skip = pytest.mark.skip(reason=f"shared data not found at {DATA} (set GEOSR_DATA)")
        for item in items:
            if "data" in item.fixturenames:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data() -> Path:
    return DATA


@pytest.fixture
def run_cli():
    """Run the installed ``geosr`` console script; returns CompletedProcess (text)."""
    assert GEOSR, "the geosr console script is not installed in this environment"

    def run(*args, preexec_fn=None, timeout=600):
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        return subprocess.run([GEOSR, *map(str, args)], capture_output=True, text=True, env=env,
                              preexec_fn=preexec_fn, timeout=timeout)

    return run


@pytest.fixture
def make_tif(tmp_path):
    """Write a small synthetic GeoTIFF with a real CRS; returns its path."""

    def make(data: np.ndarray, name="synthetic.tif", *, crs="EPSG:32632", transform=None, nodata=None, **extra):
        data = np.asarray(data)
        if data.ndim == 2:
            data = data[None]
        path = tmp_path / name
        profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=str(data.dtype), transform=transform or Affine(0.5, 0, 500000, 0, -0.5, 5200000))
        if crs is not None:
            profile["crs"] = crs
        if nodata is not None:
            profile["nodata"] = nodata
        profile.update(extra)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
        return path

    return make


def texture(shape, dtype="uint8", seed=0, lo=0, hi=255):
    """Smooth random texture (band, y, x) in [lo, hi], so interpolators see structure."""
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(rng.random(shape), sigma=(0, 2, 2))
    v = (v - v.min()) / (v.max() - v.min() + 1e-12)
    v = lo + v * (hi - lo)
    return np.round(v).astype(dtype) if np.dtype(dtype).kind in "iu" else v.astype(dtype)


def write_synthetic_scene(path: Path) -> Path:
    """A 1024² 3-band uint8 GeoTIFF (EPSG:32632, 0.5 m, nodata 0) with texture: the input of the resume and
    distributed tests."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024]
    base = 120 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    data = np.clip(base[None] + rng.normal(0, 25, (3, 1024, 1024)), 0, 255).astype("uint8")
    with rasterio.open(path, "w", driver="GTiff", height=1024, width=1024, count=3, dtype="uint8", crs="EPSG:32632",
                       transform=Affine(0.5, 0, 500000, 0, -0.5, 5200000), tiled=True, nodata=0) as ds:
        ds.write(data)
    return path


def tiny_mmsr_config():
    """The smallest MMSR architecture the tests build with random weights (seconds to build and run)."""
    from geosr.models.mmsr.bundle import MMSRConfig

    return MMSRConfig(text_encoder="hash", text_dim=16, num_latents=4, connector_depth=1, heads=2, codebook_size=8,
                      code_dim=8, map_size=32, grid_size=8, tokenizer_channels=8, unet_channels=(8, 16), tile=16,
                      attention_head_dim=4)


def save_tiny_mmsr(folder: Path, trained_steps: int = 0) -> Path:
    """A checkpoint folder of the :func:`tiny_mmsr_config` model with random weights (seed 0)."""
    from geosr.models.mmsr.bundle import build_bundle

    bundle = build_bundle(tiny_mmsr_config(), seed=0)
    bundle.meta["trained_steps"] = trained_steps
    return bundle.save(folder)
