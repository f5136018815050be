"""The converted networks behind the SRModel interface, tiled on real imagery (need `geosr weights fetch`)."""

import numpy as np
import pytest
import rasterio

from geosr.config import EnhanceConfig
from geosr.models import get_model
from geosr.scene import enhance_array

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["rrdn-gan", "realesrgan-x4plus"])
def test_tiles_blend_without_seams_at_default_overlap(data, name):
    """Tiled with the default overlap vs the whole crop in one tile: seams must not show."""
    model = get_model(name)
    overlap = 2 * model.receptive_field + max(2, model.receptive_field // 2)  # the default
    tile = 2 * overlap + 8  # the smallest legal tile: as many seams as possible
    side = tile + 40  # at least two tiles per axis
    with rasterio.open(data / "fixtures" / "naip_northdakota_5m_rgbn.tif") as src:
        arr = src.read([1, 2, 3])[:, :side, :side]
    tiled = enhance_array(arr, EnhanceConfig(model=name, tile=tile))
    whole = enhance_array(arr, EnhanceConfig(model=name, tile=4 * side))
    assert tiled.shape == whole.shape == (3, 4 * side, 4 * side)
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    assert diff.mean() < 0.05 and np.percentile(diff, 99.9) <= 2 and diff.max() <= 4, (diff.mean(), diff.max())


@pytest.mark.parametrize("name", ["rrdn-gan", "realesrgan-x4plus"])
def test_network_outputs_are_sharper_than_bicubic_and_faithful(data, name):
    from PIL import Image

    from geosr.bench import load_crops, luma, psnr

    hr = load_crops()[0][:256, :256]
    lr = np.asarray(Image.fromarray(hr).resize((64, 64), Image.BICUBIC))
    out = np.moveaxis(enhance_array(np.moveaxis(lr, -1, 0), EnhanceConfig(model=name)), 0, -1)
    bic = np.moveaxis(enhance_array(np.moveaxis(lr, -1, 0), EnhanceConfig(model="bicubic")), 0, -1)
    grad = lambda im: np.abs(np.diff(luma(im), axis=1)).mean()  # noqa: E731
    assert grad(out) > 1.2 * grad(bic)  # sharper
    assert psnr(luma(out), luma(hr)) > 20  # and still the same scene
