"""MMSRPipeline in a VAE latent working space, and the SAMSR options, on tiny random components."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL  # noqa: E402
from test_mmsr_pipeline import codes, gens, lr_batch, make_pipe, tiny_unet  # noqa: E402

from geosr.models.mmsr.pipeline import MMSRPipeline, PipelineInputError, segment_noise  # noqa: E402
from geosr.models.mmsr.sd2 import unet_from_sd2  # noqa: E402

LATENT = 4  # latent channels of the tiny VAE (as SD's)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=LATENT, norm_num_groups=4, sample_size=32).eval()


def make_latent_pipe(*, residual: bool = False, unet=None, seed: int = 0) -> MMSRPipeline:
    p = make_pipe(seed=seed)  # conditioner, text encoder and scheduler of the pixel-space test pipeline
    unet = unet if unet is not None else tiny_unet(in_channels=2 * LATENT, out_channels=LATENT, seed=seed)
    pipe = MMSRPipeline(unet=unet, scheduler=p.scheduler, conditioner=p.conditioner, text_encoder=p.text_encoder,
                        vae=tiny_vae(seed), scale=4, residual=residual)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_space_pipe(space: str, **kwargs) -> MMSRPipeline:
    return make_latent_pipe(**kwargs) if space == "latent" else make_pipe(**kwargs)


@pytest.fixture(scope="module")
def latent_pipe() -> MMSRPipeline:
    return make_latent_pipe()


@pytest.fixture(scope="module")
def pixel_pipe() -> MMSRPipeline:
    return make_pipe()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def two_class_segmentation(B: int = 2, size: int = 64) -> torch.Tensor:
    seg = torch.full((B, size, size), 3, dtype=torch.long)  # (B, H, W)
    seg[:, :, size // 2:] = 7
    seg[:, : size // 4, : size // 4] = -1  # unknown
    return seg


# ----------------------------------------------------------------------------------------------------------
# latent working space


@pytest.mark.parametrize("residual", [False, True])
def test_latent_output_shape_and_range(residual):
    p = make_latent_pipe(residual=residual)
    assert p.working_factor == 2 and p.size_multiple == 4  # VAE x2, UNet x2
    noise = p.initial_noise(2, 64, 64, generator=seeded(), device="cpu", dtype=torch.float32)
    assert noise.shape == (2, LATENT, 32, 32)  # drawn directly in latent shape
    out = p(lr_batch(), modalities=codes(), prompt="a road", num_inference_steps=2, generator=seeded()).images
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 64, 64)
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0


def test_latent_same_seed_same_output(latent_pipe):
    kw = dict(modalities=codes(), prompt="a harbour", num_inference_steps=2, guidance_scale=1.5)
    a = latent_pipe(lr_batch(), generator=seeded(7), **kw).images
    b = latent_pipe(lr_batch(), generator=seeded(7), **kw).images
    c = latent_pipe(lr_batch(), generator=seeded(8), **kw).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_latent_save_then_load_gives_identical_output(latent_pipe, tmp_path):
    kw = dict(modalities=codes(), prompt="an airport", num_inference_steps=2, guidance_scale=1.0)
    before = latent_pipe(lr_batch(), generator=seeded(), **kw).images
    latent_pipe.save_pretrained(tmp_path / "mmsr")
    assert (tmp_path / "mmsr" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "mmsr").rglob("*.bin"))
    loaded = MMSRPipeline.from_pretrained(tmp_path / "mmsr")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is AutoencoderKL and loaded.vae.config.latent_channels == LATENT
    after = loaded(lr_batch(), generator=seeded(), **kw).images
    np.testing.assert_array_equal(before, after)


def test_latent_rejects_a_pixel_space_unet():
    with pytest.raises(PipelineInputError, match="in_channels=24.*latent_channels=4.*must be 8"):
        make_latent_pipe(unet=tiny_unet(in_channels=24, out_channels=12))


@pytest.mark.parametrize("residual", [False, True])
def test_latent_round_trip_is_the_vae_reconstruction(residual):
    p = make_latent_pipe(residual=residual)
    g = seeded()
    hr, cond = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        x0 = p.encode_target(hr, cond)
        assert x0.shape == (2, LATENT, 16, 16)
        got = p.decode_sample(x0, cond)
        latent = p.vae.encode(2 * hr - 1).latent_dist.mean
        want = ((p.vae.decode(latent).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_sd2_unet_runs_in_latent_mode(tmp_path):
    tiny_unet(in_channels=LATENT, out_channels=LATENT, seed=3).save_pretrained(tmp_path / "sd2" / "unet")
    unet = unet_from_sd2(tmp_path / "sd2", extra_in_channels=LATENT)
    assert unet.config.in_channels == 2 * LATENT
    p = make_latent_pipe(unet=unet)
    out = p(lr_batch(), modalities=codes(), prompt="fields", num_inference_steps=2, generator=seeded(),
            output_type="pt").images
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0


# ----------------------------------------------------------------------------------------------------------
# SAMSR


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_samsr_off_is_bit_identical(space):
    p = make_space_pipe(space)
    seg = two_class_segmentation()
    kw = dict(modalities=codes(), prompt="a river", num_inference_steps=3, guidance_scale=1.0)
    plain = p(lr_batch(), generator=seeded(), **kw).images
    for samsr in (dict(segmentation=seg, samsr_noise=0.0),
                  dict(samsr_strength=torch.ones(2, 64, 64)),
                  dict(segmentation=seg, samsr_strength={3: 1.0, 7: 1.0})):
        np.testing.assert_array_equal(p(lr_batch(), generator=seeded(), **samsr, **kw).images, plain)


def test_segment_noise_is_unit_variance_and_correlated_within_segments():
    N, C, alpha = 4000, 2, 1.5
    seg = two_class_segmentation(1, 8).expand(N, 8, 8)  # class 3 left, 7 right, -1 top-left 2x2
    g = seeded(0)
    x = segment_noise(torch.randn(N, C, 8, 8, generator=g), seg, alpha, g)  # (N, C, 8, 8)
    samples = x.reshape(N * C, 8, 8)  # channels are independent draws
    assert (samples.mean(0).abs() < 0.1).all()
    assert ((samples.var(0) - 1).abs() < 0.12).all()

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([samples[:, a[0], a[1]], samples[:, b[0], b[1]]]))[0, 1])

    rho = alpha ** 2 / (1 + alpha ** 2)
    assert abs(corr((3, 0), (7, 3)) - rho) < 0.05  # both class 3
    assert abs(corr((0, 4), (7, 7)) - rho) < 0.05  # both class 7
    assert abs(corr((3, 0), (3, 4))) < 0.06  # different classes
    assert abs(corr((0, 0), (1, 1))) < 0.06  # both unknown: independent
    assert abs(corr((0, 0), (3, 0))) < 0.06  # unknown vs class 3
    channels = torch.corrcoef(torch.stack([x[:, 0, 5, 1], x[:, 1, 5, 1]]))[0, 1]
    assert abs(float(channels)) < 0.06  # one n_seg per channel


def test_samsr_noise_changes_the_output_reproducibly(pixel_pipe):
    p = pixel_pipe
    kw = dict(num_inference_steps=2, segmentation=two_class_segmentation(1), samsr_noise=1.0)
    plain = p(lr_batch(1), num_inference_steps=2, generator=seeded()).images
    a = p(lr_batch(1), generator=seeded(), **kw).images
    b = p(lr_batch(1), generator=seeded(), **kw).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - plain).max() > 1e-3


@pytest.mark.parametrize("residual", [False, True])
def test_tiny_strength_keeps_the_conditioning_image(residual):
    p = make_pipe(residual=residual)
    lr = lr_batch(1)
    cond = p.condition_image(lr).numpy()
    strength = torch.ones(1, 64, 64)
    strength[:, :, :32] = 0.05  # starts at t = 50, after the last of 4 trailing steps (249)
    plain = p(lr, num_inference_steps=4, generator=seeded()).images
    samsr = p(lr, num_inference_steps=4, generator=seeded(), samsr_strength=strength).images
    err_plain = np.abs(plain - cond)[..., :32].mean()
    err_samsr = np.abs(samsr - cond)[..., :32].mean()
    assert err_samsr < 0.1 * err_plain
    assert err_samsr < 1e-5  # never denoised: exactly the conditioning target


def test_strength_replaces_values_until_their_start_timestep(monkeypatch):
    p = make_pipe()
    lr = lr_batch(1)
    strength = torch.ones(1, 64, 64)
    strength[:, 16:48, 16:48] = 0.6  # starts at t = 600: replaced before the steps at 999 and 749 only
    seen = []
    step = p.scheduler.step

    def recording_step(model_output, t, sample, **kw):
        seen.append((int(t), sample.clone()))
        return step(model_output, t, sample, **kw)

    monkeypatch.setattr(p.scheduler, "step", recording_step)
    p(lr, num_inference_steps=4, generator=seeded(), samsr_strength=strength)
    noise = p.initial_noise(1, 64, 64, generator=seeded(), device="cpu", dtype=torch.float32)
    x_cond = p.to_working(2 * p.condition_image(lr) - 1)  # (1, 12, 32, 32)
    region = p.mask_to_working(strength) < 1
    assert [t for t, _ in seen] == [999, 749, 499, 249]
    for t, sample in seen:
        known = p.scheduler.add_noise(x_cond, noise, torch.tensor([t]))
        if t > 600:
            torch.testing.assert_close(sample[region], known[region], rtol=0, atol=0)
        else:
            assert (sample[region] - known[region]).abs().max() > 1e-3


def test_strength_per_class_equals_the_same_map(latent_pipe):
    seg = two_class_segmentation()
    strength = torch.ones(2, 64, 64)
    strength[seg == 7] = 0.4
    by_map = latent_pipe(lr_batch(), samsr_strength=strength, num_inference_steps=3, generator=seeded()).images
    by_class = latent_pipe(lr_batch(), segmentation=seg, samsr_strength={7: 0.4, 99: 0.2}, num_inference_steps=3,
                           generator=seeded()).images  # class 99 is absent, class 3 unnamed: strength 1
    plain = latent_pipe(lr_batch(), num_inference_steps=3, generator=seeded()).images
    np.testing.assert_array_equal(by_map, by_class)
    assert np.abs(by_map - plain).max() > 1e-3


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_samsr_with_guidance_batch_equals_single_items(space):
    p = make_space_pipe(space).to(torch.float64)  # float64: see test_batch_equals_single_items
    B, seg, c = 2, two_class_segmentation(), codes()
    kw = dict(num_inference_steps=3, guidance_scale=2.0, guidance_mode="m0-cfg", samsr_noise=0.8)
    strength = {3: 0.5, 7: 0.9}
    batch = p(lr_batch(B), modalities=c, prompt="a port", segmentation=seg, samsr_strength=strength,
              generator=gens([5, 6]), **kw).images
    assert batch.shape == (B, 3, 64, 64) and np.isfinite(batch).all()
    for i in range(B):
        single = p(lr_batch(B)[i:i + 1], modalities={m: v[i:i + 1] for m, v in c.items()}, prompt="a port",
                   segmentation=seg[i:i + 1], samsr_strength=strength, generator=gens([5 + i]), **kw).images
        np.testing.assert_allclose(batch[i:i + 1], single, rtol=0, atol=1e-6)
    unguided = p(lr_batch(B), modalities=c, prompt="a port", segmentation=seg, samsr_strength=strength,
                 generator=gens([5, 6]), **{**kw, "guidance_scale": 0.0}).images
    assert np.abs(batch - unguided).max() > 1e-4


@pytest.mark.parametrize("kwargs, name", [
    (dict(segmentation=torch.zeros(1, 32, 32, dtype=torch.long)), "segmentation of shape"),
    (dict(segmentation=torch.zeros(1, 64, 64)), "segmentation of shape"),
    (dict(segmentation=[[0]]), "segmentation of shape"),
    (dict(samsr_noise=-0.5), "samsr_noise"),
    (dict(samsr_noise=float("nan")), "samsr_noise"),
    (dict(samsr_noise=1.0), "samsr_noise=1.0 needs a segmentation"),
    (dict(samsr_strength={1: 0.5}), "samsr_strength given per class needs a segmentation"),
    (dict(samsr_strength={1: 0.0}, segmentation=torch.zeros(1, 64, 64, dtype=torch.long)), "samsr_strength\\[1\\]"),
    (dict(samsr_strength={1: 1.5}, segmentation=torch.zeros(1, 64, 64, dtype=torch.long)), "samsr_strength\\[1\\]"),
    (dict(samsr_strength=torch.zeros(1, 64, 64)), "samsr_strength: every value must be in \\(0, 1\\]"),
    (dict(samsr_strength=torch.full((1, 64, 64), 1.2)), "samsr_strength: every value"),
    (dict(samsr_strength=torch.ones(1, 32, 32)), "samsr_strength of shape"),
    (dict(samsr_strength=0.5), "samsr_strength of type"),
])
def test_samsr_check_inputs_names_the_bad_value(pixel_pipe, kwargs, name):
    with pytest.raises(PipelineInputError, match=name):
        pixel_pipe(lr_batch(1), num_inference_steps=1, **kwargs)
