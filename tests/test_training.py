"""geosr.training: data, degradation, drop flags, the training loop, checkpoints and resume (tiny CPU models)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geosr.bench import degrade as bench_degrade
from geosr.bench import to_8bit
from geosr.config import data_dir
from geosr.errors import ConfigError
from geosr.models.mmsr.bundle import MMSRBundle
from geosr.training.data import CropSampler, find_images, read_rgb8
from geosr.training.degrade import DegradationConfig, degrade, to_uint8
from geosr.training.loop import TrainConfig, Trainer, draw_drop_flags, train

REPO = Path(__file__).resolve().parent.parent
TRAIN = data_dir() / "train"
needs_train_data = pytest.mark.skipif(not TRAIN.is_dir(), reason=f"training data not found at {TRAIN} (GEOSR_DATA)")

TINY_MODEL = dict(scale=4, tile=16, unshuffle=4, residual=True, text_encoder="hash", text_dim=32, num_latents=8,
                  connector_depth=1, heads=2, codebook_size=16, code_dim=8, grid_size=4, map_size=16,
                  tokenizer_channels=8, unet_channels=[16, 32], attention_head_dim=8)


def tiny_config(output, **overrides) -> TrainConfig:
    values = dict(model=TINY_MODEL, batch_size=2, steps=6, tokenizer_steps=2, checkpoint_every=3, log_every=2,
                  lr=1e-3, warmup_steps=2, output=str(output), device="cpu", seed=3)
    return TrainConfig.from_dict({**values, **overrides})


def smooth_hr(seed: int = 0, size: int = 64) -> torch.Tensor:
    """(3, size, size) 8-bit-valued image with structure (a blurred random field)."""
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(np.random.default_rng(seed).random((3, size, size)), sigma=(0, 2, 2))
    v = (v - v.min()) / (v.max() - v.min())
    return torch.from_numpy(np.round(v * 255) / 255).float()


# ----------------------------------------------------------------------------------------------------------
# degradation


def test_degradation_is_seeded_and_has_the_lr_shape():
    hr, cfg = smooth_hr(), DegradationConfig(p_clean=0.0)
    a = degrade(hr, scale=4, config=cfg, rng=np.random.default_rng(7))
    b = degrade(hr, scale=4, config=cfg, rng=np.random.default_rng(7))
    c = degrade(hr, scale=4, config=cfg, rng=np.random.default_rng(8))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(torch.round(a * 255) / 255, a)  # quantised to 8 bits
    plain = bench_degrade(to_uint8(hr), "clean", 0)
    assert np.abs(to_uint8(a).astype(int) - plain).mean() > 2  # really degraded, not a plain resize


def test_clean_degradation_is_the_benchmark_pil_bicubic():
    hr, cfg = smooth_hr(1), DegradationConfig(p_clean=1.0)
    lr = degrade(hr, scale=4, config=cfg, rng=np.random.default_rng(0))
    hr8 = to_uint8(hr)
    pil = np.asarray(Image.fromarray(hr8).resize((16, 16), Image.BICUBIC))
    np.testing.assert_array_equal(to_uint8(lr), pil)
    np.testing.assert_array_equal(to_uint8(lr), bench_degrade(hr8, "clean", 0))


def test_degradation_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="p_clean"):
        DegradationConfig(p_clean=1.5)
    with pytest.raises(ConfigError, match="blur_sigma_1"):
        DegradationConfig(blur_sigma_1=(2.0, 1.0))


# ----------------------------------------------------------------------------------------------------------
# data


def test_data_refuses_validation_scenes_and_empty_folders(tmp_path):
    with pytest.raises(ConfigError, match="validation"):
        find_images(data_dir() / "scenes")
    (tmp_path / "scenes").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "scenes" / "a.png")
    with pytest.raises(ConfigError, match="validation"):
        find_images(tmp_path)  # a folder holding a scenes/ folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        find_images(tmp_path / "empty")


def test_non_8bit_images_are_stretched_like_the_benchmark(make_tif):
    v = np.arange(40 * 50, dtype=np.uint16).reshape(1, 40, 50) * 3 + 100  # one 16-bit band
    rgb = read_rgb8(make_tif(v, "u16.tif"))
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.min() == 0 and rgb.max() == 255
    np.testing.assert_array_equal(rgb, to_8bit(v))


@needs_train_data
def test_crop_sampler_is_seeded_and_skips_small_images():
    a = CropSampler(TRAIN, crop=256, seed=5, cache_mb=16)
    b = CropSampler(TRAIN, crop=256, seed=5, cache_mb=16)
    x = a.sample(3)
    assert x.shape == (3, 3, 256, 256) and x.dtype == torch.float32
    assert torch.equal(x, b.sample(3)) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert len(a.files) < len(find_images(TRAIN))  # the two NAIP chips (< 256 px) are skipped
    assert a._cached_bytes <= 16 * 2**20 or len(a._cache) == 1  # the LRU cache stays bounded


def test_by_source_makes_each_source_folder_equally_likely(tmp_path):
    # source "many": 9 black images; source "one": 1 white image. By file, white is 1 crop in 10; by source, 1 in 2.
    for name, value, count in (("many", 0, 9), ("one", 255, 1)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(tmp_path / name / f"{i}.png")
    shares = {}
    for by_source in (False, True):
        sampler = CropSampler(tmp_path, crop=8, seed=0, by_source=by_source)
        shares[by_source] = np.mean([sampler.sample_uint8().max() > 0 for _ in range(2000)])
        assert len(sampler.groups) == (2 if by_source else 10)
    assert abs(shares[False] - 0.1) < 0.03 and abs(shares[True] - 0.5) < 0.05


# ----------------------------------------------------------------------------------------------------------
# drop flags


def test_drop_flags_follow_the_configured_rates():
    n, pm, pt, pu = 40000, 0.1, 0.2, 0.3
    flags = draw_drop_flags(n, ("depth", "edges"), p_modality=pm, p_text=pt, p_uncond=pu,
                            generator=torch.Generator().manual_seed(0))
    depth, edges, text = flags.modalities["depth"], flags.modalities["edges"], flags.text
    tol = 4 * np.sqrt(0.25 / n)
    for f, p in ((depth, pm), (edges, pm), (text, pt)):
        assert abs(f.float().mean().item() - (p + pu - p * pu)) < tol  # own drop or the unconditional one
    everything = (depth & edges & text).float().mean().item()
    assert abs(everything - (pu + (1 - pu) * pm * pm * pt)) < tol  # all dropped together at p_uncond
    alone = (depth & ~edges & ~text).float().mean().item()
    assert abs(alone - (1 - pu) * pm * (1 - pm) * (1 - pt)) < tol  # independent otherwise
    none = draw_drop_flags(100, ("depth",), p_modality=0.0, p_text=0.0, p_uncond=0.0)
    assert not none.modalities["depth"].any() and not none.text.any()


# ----------------------------------------------------------------------------------------------------------
# training


@needs_train_data
def test_thirty_steps_on_two_crops_lower_the_loss(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, p_modality_drop=0.0, p_text_drop=0.0, p_uncond=0.0, warmup_steps=0))
    hr = trainer.sampler.sample(2)  # (2, 3, 64, 64): the two fixed crops
    lr = torch.stack([degrade(x, scale=4, config=DegradationConfig(), rng=np.random.default_rng(i))
                      for i, x in enumerate(hr)])
    batch = trainer.prepare(hr, lr)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([500, 800])  # v-prediction: where 30 steps can learn (at small t the target is ~ the noise)
    noise = torch.randn(batch.x0.shape, generator=gen)

    def evaluate() -> float:
        with torch.no_grad():
            return float(trainer.loss(batch, t, noise))

    before = evaluate()
    losses = [trainer.step(batch) for _ in range(30)]
    after = evaluate()
    assert np.isfinite(losses).all()
    assert after < 0.6 * before, (before, after)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A 6-step tiny run in one go (checkpoints at 0, 3, 6)."""
    if not TRAIN.is_dir():
        pytest.skip(f"training data not found at {TRAIN} (GEOSR_DATA)")
    out = tmp_path_factory.mktemp("one_go")
    return train(tiny_config(out))


def _state(path: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "training" / f"{name}.safetensors"))


def test_resume_is_bit_identical(six_steps, tmp_path):
    messages: list[str] = []
    stop = lambda: sum(m.startswith("step") for m in messages) >= 3  # noqa: E731
    first = train(tiny_config(tmp_path), progress=lambda d, t, m: messages.append(m), should_stop=stop)
    assert first.stopped and first.steps == 3 and first.final is None
    assert first.checkpoint.name == "step-000003"
    second = train(tiny_config(tmp_path), resume=True)
    assert second.steps == 6 and not second.stopped
    for name in ("model", "ema"):
        a, b = _state(six_steps.checkpoint, name), _state(second.checkpoint, name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_run_folder_and_checkpoint_bundle(six_steps):
    from geosr.models.mmsr.bundle import MMSRBundle

    out = six_steps.output
    assert six_steps.steps == 6 and np.isfinite(six_steps.final_loss)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000000", "step-000003",
                                                                         "step-000006"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4, 6] and all(e["samples_per_s"] > 0 and e["lr"] > 0 for e in log)
    # the EMA weights are what the bundle holds
    ema = _state(six_steps.checkpoint, "ema")
    bundle = MMSRBundle.load(six_steps.checkpoint)
    unet = bundle.pipeline.unet.state_dict()
    assert all(torch.equal(unet[k], ema[f"unet.{k}"]) for k in unet)
    final = MMSRBundle.load(six_steps.final)
    assert final.meta["trained_steps"] == 6 and final.meta["final_loss"] == pytest.approx(six_steps.final_loss)
    assert final.meta["train_config"]["model"]["tile"] == 16
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = bundle.pipeline.condition_image(lr)
    codes = bundle.encode_maps(bundle.modality_maps(cond))
    out = bundle.pipeline(lr, modalities=codes, prompt=bundle.captions(cond), num_inference_steps=2,
                          generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_runs_refuse_what_they_cannot_continue(six_steps, tmp_path):
    with pytest.raises(ConfigError, match="pass --resume, or choose another output"):
        train(tiny_config(six_steps.output))
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tiny_config(tmp_path / "fresh"), resume=True)
    moved = tmp_path / "moved"
    shutil.copytree(six_steps.checkpoint, moved / "checkpoints" / six_steps.checkpoint.name)
    other = tiny_config(moved, model={**TINY_MODEL, "num_latents": 4})
    with pytest.raises(ConfigError, match="num_latents"):
        train(other, resume=True)


# ----------------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("name", ["mmsr_tiny.yaml", "mmsr_small.yaml", "mmsr_small_direct.yaml"])
def test_shipped_configs_parse(name):
    cfg = TrainConfig.from_yaml((REPO / "configs" / name).read_text())
    assert cfg.hr_crop % (cfg.model.scale * cfg.model.unshuffle) == 0
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_config_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="btach_size"):
        TrainConfig.from_yaml("btach_size: 4\n")
    with pytest.raises(ConfigError, match="unet_chanels"):
        TrainConfig.from_yaml("model:\n  unet_chanels: [8]\n")
    with pytest.raises(ConfigError, match="jpeg_qual"):
        TrainConfig.from_yaml("degradation:\n  jpeg_qual: [1, 2]\n")


def test_cli_train_then_resume_through_the_entry_point(tmp_path):
    """`geosr train` runs the tiny config, refuses to overwrite the run, and --resume continues to more steps."""
    import subprocess
    import sys

    if not (data_dir() / "train").is_dir():
        pytest.skip("no training data (set GEOSR_DATA)")
    config = Path(__file__).parent.parent / "configs" / "mmsr_tiny.yaml"
    base = [sys.executable, "-m", "geosr", "train", "--config", str(config), "--output", str(tmp_path / "run"), "-q"]
    first = subprocess.run(base + ["--steps", "4"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("done: 4 steps")
    again = subprocess.run(base + ["--steps", "6"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "--resume" in again.stderr and again.stderr.count("\n") == 1
    resumed = subprocess.run(base + ["--steps", "6", "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("done: 6 steps")
    assert MMSRBundle.load(tmp_path / "run" / "final").meta["trained_steps"] == 6


# ----------------------------------------------------------------------------------------------------------
# few-step and perceptual training


def test_few_step_training_draws_only_the_samplers_timesteps(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, timesteps=2))
    hr = smooth_hr()[None].repeat(2, 1, 1, 1)
    batch = trainer.prepare(hr, torch.nn.functional.avg_pool2d(hr, 4))
    drawn = {int(v) for _ in range(20) for v in trainer.draw(batch)[0]}
    pipe = trainer.pipeline
    pipe.scheduler.set_timesteps(2)
    assert drawn == {int(v) for v in pipe.scheduler.timesteps} == {999, 499}  # trailing spacing, as inference
    everywhere = Trainer(tiny_config(tmp_path / "all"))
    assert len({int(v) for _ in range(20) for v in everywhere.draw(batch)[0]}) > 20
    for bad in ({"timesteps": 0}, {"timesteps": 1001}, {"lpips_weight": -1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            tiny_config(tmp_path, **bad)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_estimate_x0_inverts_the_forward_process(prediction):
    from diffusers import DDIMScheduler

    from geosr.training.loop import estimate_x0

    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    noisy = scheduler.add_noise(x0, noise, t)
    exact = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
    atol = 1e-2 if prediction == "epsilon" else 1e-4  # epsilon divides by sqrt(alpha_bar(999)) ~ 0.006
    torch.testing.assert_close(estimate_x0(scheduler, noisy, exact, t), x0, atol=atol, rtol=0)


def test_lpips_weight_adds_lpips_of_the_decoded_estimate(tmp_path):
    from geosr.config import weights_dir
    from geosr.scoring.lpips import FILENAME
    from geosr.training.loop import estimate_x0

    if not (weights_dir() / FILENAME).is_file():
        pytest.skip("LPIPS weights missing: run `geosr weights fetch`")
    trainer = Trainer(tiny_config(tmp_path, lpips_weight=2.0, p_modality_drop=0.0, p_text_drop=0.0, p_uncond=0.0,
                                  model={**TINY_MODEL, "residual_scale": 4.0}))
    hr = smooth_hr(size=64)[None]
    prior = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(hr, 4), scale_factor=4, mode="bilinear")
    batch = trainer.prepare(hr, torch.nn.functional.avg_pool2d(hr, 4), prior)
    # the image the target stands for is the HR crop itself (the residual unscaled and added to the prior)
    torch.testing.assert_close(trainer.pipeline.working_image(batch.x0, batch.cond_w), 2 * hr - 1, atol=1e-5, rtol=0)
    t, noise = torch.tensor([999]), torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        total = float(trainer.loss(batch, t, noise))
        lpips, trainer.lpips = trainer.lpips, None
        mse = float(trainer.loss(batch, t, noise))
        scheduler = trainer.pipeline.scheduler
        pred = trainer.model(scheduler.add_noise(batch.x0, noise, t), t, batch.cond_w, batch.text_states,
                             batch.text_mask, batch.codes, None)
        x0 = estimate_x0(scheduler, scheduler.add_noise(batch.x0, noise, t), pred, t)
        expected = float(lpips(trainer.pipeline.working_image(x0, batch.cond_w).clamp(-1, 1), 2 * hr - 1).mean())
    assert expected > 0.01
    assert total == pytest.approx(mse + 2.0 * expected, rel=1e-4)
