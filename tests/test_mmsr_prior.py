"""A stage-1 prior as the MMSR conditioning image (``MMSRConfig.prior``), in training and in the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from conftest import texture, tiny_mmsr_config  # noqa: E402
from test_training import smooth_hr, tiny_config  # noqa: E402

from geosr.config import EnhanceConfig  # noqa: E402
from geosr.errors import ConfigError  # noqa: E402
from geosr.models import get_model  # noqa: E402
from geosr.models.mmsr.bundle import MMSRConfig, build_bundle  # noqa: E402
from geosr.scene import enhance_array  # noqa: E402
from geosr.training.loop import Trainer  # noqa: E402

TINY = tiny_mmsr_config()


def lr_batch() -> torch.Tensor:
    return torch.from_numpy(texture((6, 16, 16), dtype="float32", lo=0, hi=1, seed=4).reshape(2, 3, 16, 16))


def test_the_conditioning_image_is_the_priors_output():
    bundle = build_bundle(MMSRConfig(**{**TINY.__dict__, "prior": "nearest"}), seed=0)
    lr = lr_batch()
    cond = bundle.condition_image(lr)
    expected = np.stack([get_model("nearest").upscale(a, 4) for a in lr.numpy()])
    np.testing.assert_allclose(cond.numpy(), expected, atol=1e-6)
    plain = build_bundle(TINY, seed=0).condition_image(lr)  # no prior: the pipeline's bicubic
    assert plain.shape == cond.shape and (plain - cond).abs().mean() > 0.01


def test_the_priors_output_is_cached_by_tile_content(monkeypatch):
    import geosr.models.mmsr.bundle as bundle_module

    bundle = build_bundle(MMSRConfig(**{**TINY.__dict__, "prior": "nearest"}), seed=0)
    stage1 = bundle._stage1()
    calls = []
    real = stage1.upscale
    monkeypatch.setattr(stage1, "upscale", lambda x, s: calls.append(x.copy()) or real(x, s))
    lr = lr_batch()
    first = bundle.condition_image(lr)
    assert len(calls) == 2
    again = bundle.condition_image(lr.clone())  # the same pixels: nothing recomputed, the same result
    assert len(calls) == 2
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    changed = lr.clone()
    changed[1, 0, 3, 3] += 0.25  # one pixel of one tile differs: that tile alone is recomputed
    out = bundle.condition_image(changed)
    assert len(calls) == 3 and np.array_equal(calls[-1], changed[1].numpy())
    torch.testing.assert_close(out[0], first[0], rtol=0, atol=0)
    assert not torch.equal(out[1], first[1])
    # bounded: with room for one tile only the most recent stays
    monkeypatch.setattr(bundle_module, "PRIOR_CACHE_BYTES", first[0].numel() * 4)
    bundle.condition_image(lr[:1] * 0.5)  # a new tile: the three older ones are evicted
    assert len(calls) == 4 and len(bundle._prior_cache) == 1
    bundle.condition_image(lr[:1])  # evicted: computed again
    assert len(calls) == 5 and len(bundle._prior_cache) == 1


def test_a_prior_must_be_a_plain_sr_model():
    for bad in ("mmsr", "no-such-model"):
        bundle = build_bundle(MMSRConfig(**{**TINY.__dict__, "prior": bad}), seed=0)
        with pytest.raises(ConfigError):
            bundle.condition_image(lr_batch())


def test_training_conditions_on_the_prior(tmp_path):
    model = {**tiny_config(tmp_path).model.to_dict(), "prior": "nearest"}
    trainer = Trainer(tiny_config(tmp_path, model=model))
    hr = torch.stack([smooth_hr(0), smooth_hr(1)])  # (2, 3, 64, 64)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    batch = trainer.prepare(hr, lr)
    nearest = torch.from_numpy(np.stack([get_model("nearest").upscale(a, 4) for a in lr.numpy()]))
    pipe = trainer.pipeline
    torch.testing.assert_close(batch.cond_w, pipe.to_working(2 * nearest - 1))
    torch.testing.assert_close(batch.x0, pipe.to_working(2 * hr - 1) - pipe.to_working(2 * nearest - 1))


def test_a_residual_model_that_adds_nothing_returns_the_prior(tmp_path):
    """UNet output zeroed: one trailing DDIM step leaves the conditioning image, i.e. the prior's output."""
    bundle = build_bundle(MMSRConfig(**{**TINY.__dict__, "prior": "nearest"}), seed=0)
    with torch.no_grad():
        bundle.pipeline.unet.conv_out.weight.zero_()
        bundle.pipeline.unet.conv_out.bias.zero_()
    path = bundle.save(tmp_path / "zero")
    image = texture((3, 32, 32), seed=5)
    cfg = EnhanceConfig(model="mmsr", checkpoint=str(path), steps=1, tile=16, overlap=4, threads=1)
    out = enhance_array(image, cfg).astype(float)
    nearest = enhance_array(image, EnhanceConfig(model="nearest")).astype(float)
    bicubic = enhance_array(image, EnhanceConfig(model="bicubic")).astype(float)
    assert np.abs(out - nearest).mean() < 1.0 < np.abs(out - bicubic).mean(), (
        np.abs(out - nearest).mean(), np.abs(out - bicubic).mean())


def _zeroed_prior_checkpoint(tmp_path):
    bundle = build_bundle(MMSRConfig(**{**TINY.__dict__, "prior": "nearest"}), seed=0)
    with torch.no_grad():
        bundle.pipeline.unet.conv_out.weight.zero_()
        bundle.pipeline.unet.conv_out.bias.zero_()
    return bundle.save(tmp_path / "zero")


def test_a_large_tile_runs_the_prior_once_and_diffuses_subtiles_of_the_training_side(tmp_path, monkeypatch):
    path = _zeroed_prior_checkpoint(tmp_path)
    model = get_model("mmsr")
    model.configure(EnhanceConfig(model="mmsr", checkpoint=str(path), steps=1))
    nearest = get_model("nearest")
    # the engine gives the prior its own tile and context
    assert model.default_tile == max(nearest.default_tile, TINY.tile)
    assert model.receptive_field >= nearest.receptive_field
    stage1 = model._bundle._stage1()
    prior_calls, batches = [], []
    real_prior = stage1.upscale
    monkeypatch.setattr(stage1, "upscale", lambda x, s: prior_calls.append(x.shape) or real_prior(x, s))
    monkeypatch.setattr(model, "_sample", lambda lr, cond, seg: batches.append(lr.shape) or cond.numpy())
    x = texture((3, 56, 40), dtype="float32", lo=0, hi=1, seed=7)
    model.begin_scene(x)
    out = model.upscale(x, 4)
    assert prior_calls == [(3, 56, 40)]  # once, on the whole tile
    assert all(shape[1:] == (3, TINY.tile, TINY.tile) for shape in batches)
    assert sum(shape[0] for shape in batches) > 4
    # each sub-tile returning its slice of the conditioning image: the blend gives that image back exactly,
    # so sub-tiles sit where they belong and their weights sum to one everywhere
    np.testing.assert_allclose(out, real_prior(x, 4), atol=1e-6)


def test_subtiled_sampling_through_the_engine_gives_the_prior_back_for_a_model_that_adds_nothing(tmp_path):
    path = _zeroed_prior_checkpoint(tmp_path)
    image = texture((3, 72, 56), seed=5)
    out = enhance_array(image, EnhanceConfig(model="mmsr", checkpoint=str(path), steps=1, threads=1)).astype(float)
    nearest = enhance_array(image, EnhanceConfig(model="nearest")).astype(float)
    assert out.shape == nearest.shape and np.abs(out - nearest).mean() < 1.0, np.abs(out - nearest).mean()


def test_a_tile_larger_than_the_training_side_is_subtiled_and_reproducible(tmp_path, monkeypatch):
    from conftest import save_tiny_mmsr

    model = get_model("mmsr")
    model.configure(EnhanceConfig(model="mmsr", checkpoint=str(save_tiny_mmsr(tmp_path / "tiny")), steps=1))
    side = model._bundle.config.tile
    seen = []
    real = model._sample
    monkeypatch.setattr(model, "_sample", lambda lr, cond, seg: seen.append(lr.shape) or real(lr, cond, seg))
    x = texture((3, 2 * side + 5, side + 3), dtype="float32", lo=0, hi=1, seed=2)
    model.begin_scene(x)
    first = model.upscale(x, 4)
    assert first.shape == (3, 4 * x.shape[1], 4 * x.shape[2]) and np.isfinite(first).all()
    assert seen and all(shape[1:] == (3, side, side) for shape in seen)
    np.testing.assert_array_equal(model.upscale(x, 4), first)  # seeded from each sub-tile's pixels


def test_half_the_checkpoints_scale_is_its_output_downscaled(tmp_path):
    from geosr.models.consistency import downscale

    path = _zeroed_prior_checkpoint(tmp_path)
    model = get_model("mmsr")
    model.configure(EnhanceConfig(model="mmsr", checkpoint=str(path), scale=2, steps=1))
    assert TINY.scale == 4 and model.scales == (2, 4)
    x = texture((3, 40, 24), dtype="float32", lo=0, hi=1, seed=3)
    model.begin_scene(x)
    half = model.upscale(x, 2)
    assert half.shape == (3, 80, 48)
    np.testing.assert_allclose(half, downscale(model.upscale(x, 4), (80, 48)), atol=1e-5)
    with pytest.raises(ConfigError):
        model.upscale(x, 3)
