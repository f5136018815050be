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
