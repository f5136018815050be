"""geosr.models.views: a model's output averaged over turned views of its input."""

import numpy as np
import pytest

from geosr.config import EnhanceConfig
from geosr.errors import ConfigError
from geosr.models.base import SRModel
from geosr.models.views import Views
from geosr.scene import enhance_array


class Streaky(SRModel):
    """nearest x4 plus a left-to-right ramp: not turn-equivariant, as a GAN's painted texture is not."""

    name, channels, scales, receptive_field, default_tile = "streaky", 3, (4,), 1, 64
    consistency = default_consistency = 0.5

    def __init__(self):
        self.calls = []

    def upscale(self, x, scale):
        self.calls.append(x.shape)
        y = np.repeat(np.repeat(x, scale, 1), scale, 2)
        return (y + np.linspace(0, 0.2, y.shape[-1], dtype=np.float32)).astype(np.float32)

    def provenance(self):
        return {"package": "p", "member": "streaky weights"}


def test_views_average_the_turned_outputs_turned_back():
    base = Streaky()
    model = Views(base, name="streaky-2v", description="")
    x = np.random.default_rng(0).uniform(0, 1, (3, 6, 10)).astype(np.float32)  # not square: turns swap the sides
    out = model.upscale(x, 4)
    assert out.shape == (3, 24, 40) and out.dtype == np.float32
    assert base.calls == [(3, 6, 10), (3, 10, 6)]  # as given, then a quarter turn
    plain = np.repeat(np.repeat(x, 4, 1), 4, 2)
    ramp_x = np.linspace(0, 0.2, 40)[None, None, :]  # the first view paints along x, the turned one along y
    ramp_y = np.linspace(0, 0.2, 24)[None, :, None]  # turned back clockwise: its left column is the top row
    np.testing.assert_allclose(out, plain + (ramp_x + ramp_y) / 2, atol=1e-6)
    mirrored = Views(Streaky(), name="m", description="", views=((0, False), (0, True)))  # ramps both ways along x
    np.testing.assert_allclose(mirrored.upscale(x, 4), plain + 0.1, atol=1e-6)
    # settings and provenance come from the model it runs
    assert (model.consistency, model.scales, model.receptive_field) == (0.5, (4,), 1)
    assert model.provenance()["member"] == "streaky weights, mean over 2 turned views"
    with pytest.raises(ConfigError):
        model.upscale(x, 2)


def test_views_run_through_the_engine(monkeypatch):
    from geosr import models

    model = Views(Streaky(), name="streaky-4v", description="", views=((0, False), (1, False), (2, False), (3, False)))
    monkeypatch.setitem(models._registry("cpu"), model.name, model)
    lr = np.random.default_rng(1).integers(0, 200, (3, 20, 20), dtype=np.uint8)
    out = enhance_array(lr, EnhanceConfig(model=model.name, scale=4, consistency=0.0))
    assert out.shape == (3, 80, 80)
    # four turns whose ramps point four ways cancel to a constant: what is left is the input, nearest x4, + 0.1
    expected = np.repeat(np.repeat(lr.astype(np.float64), 4, 1), 4, 2) + 0.1 * 255
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0
