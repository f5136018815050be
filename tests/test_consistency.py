"""LR-consistency projection (geosr.models.consistency) and its use by the engine (EnhanceConfig.consistency)."""

import numpy as np
import pytest
from PIL import Image

from geosr.bench import lr_consistency
from geosr.config import EnhanceConfig
from geosr.errors import ConfigError
from geosr.models.base import SRModel
from geosr.models.consistency import downscale, project, resample_matrix
from geosr.scene import enhance_array


@pytest.mark.parametrize("size_in,size_out", [((64, 48), (16, 12)), ((37, 53), (9, 13)), ((10, 7), (40, 28))])
def test_resample_matrix_is_pils_bicubic(size_in, size_out):
    x = np.random.default_rng(0).uniform(0, 255, size_in).astype(np.float32)
    ref = np.asarray(Image.fromarray(x, mode="F").resize(size_out[::-1], Image.BICUBIC))
    ours = downscale(x[None], size_out)[0]
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-3
    assert np.allclose(resample_matrix(size_in[0], size_out[0]).sum(axis=1), 1.0)


def test_projection_makes_the_output_agree_with_its_input():
    rng = np.random.default_rng(1)
    lr = rng.uniform(0, 1, (3, 16, 20)).astype(np.float32)
    sr = rng.uniform(0, 1, (3, 64, 80)).astype(np.float32)  # unrelated to lr
    before = np.abs(downscale(sr, (16, 20)) - lr).max()
    full = project(sr, lr, 1.0)
    half = project(sr, lr, 0.5)
    assert full.dtype == np.float32 and full.shape == sr.shape
    assert np.abs(downscale(full, (16, 20)) - lr).max() < 1e-4 < before
    # half strength removes half of the disagreement (the operator is linear)
    assert np.allclose(downscale(half, (16, 20)) - lr, 0.5 * (downscale(sr, (16, 20)) - lr), atol=1e-4)
    assert project(sr, lr, 0.0) is sr
    # what the downscale cannot see (its null space) is left alone: projecting twice changes nothing more
    assert np.abs(project(full, lr, 1.0) - full).max() < 1e-4
    with pytest.raises(ValueError):
        project(sr, lr, 1.5)


def test_projection_can_give_luma_and_colour_their_own_strengths():
    from geosr.models.consistency import _YCBCR

    rng = np.random.default_rng(3)
    lr = rng.uniform(0, 1, (3, 16, 20))
    sr = rng.uniform(0, 1, (3, 64, 80)).astype(np.float32)
    ycc = lambda a: np.einsum("ij,jhw->ihw", _YCBCR, downscale(a, (16, 20)))  # noqa: E731
    before = ycc(sr) - np.einsum("ij,jhw->ihw", _YCBCR, lr)
    luma_only = project(sr, lr, 1.0, chroma=0.0)
    after = ycc(luma_only) - np.einsum("ij,jhw->ihw", _YCBCR, lr)
    assert np.abs(after[0]).max() < 1e-4 < np.abs(before[0]).max()  # the luma agrees with the input
    assert np.allclose(after[1:], before[1:], atol=1e-4)  # the colour is left as it was
    mixed = project(sr, lr, 0.5, chroma=0.2)
    after = ycc(mixed) - np.einsum("ij,jhw->ihw", _YCBCR, lr)
    assert np.allclose(after[0], 0.5 * before[0], atol=1e-4) and np.allclose(after[1:], 0.8 * before[1:], atol=1e-4)
    assert np.allclose(project(sr, lr, 0.5, chroma=0.5), project(sr, lr, 0.5), atol=1e-6)
    assert project(sr, lr, 0.0, chroma=0.0) is sr
    with pytest.raises(ValueError):
        project(sr[:1], lr[:1], 0.5, chroma=0.0)  # colour needs three bands
    with pytest.raises(ValueError):
        project(sr, lr, 0.5, chroma=-0.1)


class LumaFirst(SRModel):
    """nearest x4 whose own projection default is luma only (as a model with ``default_chroma_consistency``)."""

    name, channels, scales, receptive_field, default_tile = "luma-first", 3, (4,), 1, 64
    consistency = default_consistency = 1.0
    chroma_consistency = default_chroma_consistency = 0.0

    def upscale(self, x, scale):
        return np.repeat(np.repeat(x, scale, 1), scale, 2) + np.array([0.1, 0.0, -0.1], dtype=np.float32)[:, None, None]


def test_the_engine_uses_a_models_colour_strength_unless_the_user_gives_one(monkeypatch):
    from geosr import models

    model = LumaFirst()
    monkeypatch.setitem(models._registry("cpu"), model.name, model)
    rng = np.random.default_rng(4)
    lr = np.clip(rng.normal(128, 30, (3, 32, 32)), 0, 255).astype(np.uint8)
    own = enhance_array(lr, EnhanceConfig(model=model.name, scale=4)).astype(np.float64)
    assert model.chroma_consistency == 0.0
    users = enhance_array(lr, EnhanceConfig(model=model.name, scale=4, consistency=1.0)).astype(np.float64)
    assert model.chroma_consistency is None  # the user's strength applies to every band
    tint = lambda a: a[0].mean() - a[2].mean()  # noqa: E731
    assert tint(own) - tint(lr.astype(np.float64)) > 30  # the invented colour stays: only the luma was projected
    assert abs(tint(users) - tint(lr.astype(np.float64))) < 2  # projected in full, the colour is the input's
    luma = lambda a: np.einsum("j,jhw->hw", [0.299, 0.587, 0.114], a)  # noqa: E731
    assert abs(luma(own).mean() - luma(lr.astype(np.float64)).mean()) < 1


def test_engine_applies_consistency_per_tile():
    rng = np.random.default_rng(2)
    lr = np.clip(rng.normal(128, 40, (3, 40, 40)), 0, 255).astype(np.uint8)
    plain = enhance_array(lr, EnhanceConfig(model="nearest", scale=4))
    projected = enhance_array(lr, EnhanceConfig(model="nearest", scale=4, consistency=1.0, tile=24, overlap=8))
    hwc = lambda a: np.moveaxis(a, 0, -1)  # noqa: E731
    assert lr_consistency(hwc(projected), hwc(lr)) > lr_consistency(hwc(plain), hwc(lr)) + 10
    assert projected.dtype == np.uint8 and projected.shape == plain.shape
    again = enhance_array(lr, EnhanceConfig(model="nearest", scale=4, consistency=0.0))
    assert np.array_equal(again, plain)  # strength 0: the model's output as it was
    with pytest.raises(ConfigError):
        enhance_array(lr, EnhanceConfig(model="nearest", scale=4, consistency=2.0))


class Tinter(SRModel):
    """A stand-in 3-channel model that invents colour: nearest x4, red up and blue down."""

    name, channels, scales, receptive_field, default_tile = "tinter", 3, (4,), 1, 64

    def upscale(self, x, scale):
        y = np.repeat(np.repeat(x, scale, 1), scale, 2)
        return y + np.array([0.05, 0.0, -0.05], dtype=np.float32)[:, None, None]


@pytest.mark.parametrize("keep_grey", [True, False])
def test_grey_in_grey_out_unless_turned_off(keep_grey):
    rng = np.random.default_rng(3)
    grey = np.repeat(rng.integers(40, 200, (1, 30, 30), dtype=np.uint8), 3, axis=0)
    colour = rng.integers(40, 200, (3, 30, 30), dtype=np.uint8)
    pale = (grey + np.array([3, 0, 0], dtype=np.uint8)[:, None, None]).astype(np.uint8)
    config = EnhanceConfig(scale=4, tile=16, overlap=4, keep_grey=keep_grey)
    out = enhance_array(grey, config, model=Tinter())
    spread = int((out.max(axis=0).astype(int) - out.min(axis=0)).max())
    if keep_grey:
        assert spread == 0  # identical bands in, identical bands out
        assert np.array_equal(out[0], np.repeat(np.repeat(grey[0], 4, 0), 4, 1))  # the mean of the model's bands
    else:
        assert spread >= 20  # the model's tint, as it gave it (0.05 of 255 up on red, down on blue)
    # a grey image after JPEG's colour rounding (a few pixels a level or two off) is still grey
    jpeg_grey = grey.copy()
    jpeg_grey[0, ::7, ::5] += 2
    out = enhance_array(jpeg_grey, config, model=Tinter())
    assert (int((out.max(axis=0).astype(int) - out.min(axis=0)).max()) == 0) is keep_grey
    # colour input is never touched by it, pale colour (a mean spread of 3 levels) included
    tinted = enhance_array(colour, config, model=Tinter())
    assert int(tinted[0].astype(int).sum() - tinted[2].astype(int).sum()) != 0
    assert np.array_equal(tinted, enhance_array(colour, EnhanceConfig(scale=4, tile=16, overlap=4, keep_grey=False),
                                                model=Tinter()))
    assert np.array_equal(enhance_array(pale, config, model=Tinter()),
                          enhance_array(pale, EnhanceConfig(scale=4, tile=16, overlap=4, keep_grey=False),
                                        model=Tinter()))


def test_keep_grey_reaches_the_config_and_the_bench_runs_anchors_as_published():
    from geosr.bench import method_config
    from geosr.cli import _config, build_parser

    args = build_parser().parse_args(["enhance", "in.tif", "--no-keep-grey"])
    assert _config(args).keep_grey is False
    assert _config(build_parser().parse_args(["enhance", "in.tif"])).keep_grey is True
    assert method_config("realesrgan-x4plus").keep_grey is False
    assert method_config("default").keep_grey is True


def test_limit_chroma_keeps_luma_and_smooths_only_colour():
    from geosr.models.consistency import _YCBCR, limit_chroma

    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, (3, 32, 48)).astype(np.float32)
    out = limit_chroma(x, 2)
    assert out.shape == x.shape and out.dtype == np.float32
    ycc, ycc_out = (np.einsum("ij,jhw->ihw", _YCBCR, a.astype(np.float64)) for a in (x, out))
    np.testing.assert_allclose(ycc_out[0], ycc[0], atol=1e-6)  # luma as it was
    # per-pixel colour noise is smoothed: the chroma's pixel-to-pixel differences shrink
    assert np.abs(np.diff(ycc_out[1:], axis=-1)).mean() < 0.5 * np.abs(np.diff(ycc[1:], axis=-1)).mean()
    # colour that varies slowly stays: a smooth hue ramp comes back nearly unchanged away from the borders
    yy, xx = np.mgrid[0:32, 0:48] / 48.0
    ramp = np.stack([0.3 + 0.4 * xx, 0.5 + 0 * xx, 0.7 - 0.4 * yy]).astype(np.float32)
    np.testing.assert_allclose(limit_chroma(ramp, 2)[:, 4:-4, 4:-4], ramp[:, 4:-4, 4:-4], atol=2e-3)
    grey = np.repeat(x[:1], 3, axis=0)
    np.testing.assert_allclose(limit_chroma(grey, 2), grey, atol=1e-6)  # grey stays grey
    assert limit_chroma(x, 1) is x
