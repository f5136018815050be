"""geosr's trained stage 1 (geosr.models.fusion, geosr.training.stage1) and diffusion training on stored pairs."""

import numpy as np
import pytest
import torch

from geosr.config import data_dir
from geosr.models import get_model
from geosr.models.fusion import EXPERTS, WEIGHTS, FusionNet, FusionSR

TRAIN = data_dir() / "train"
experts_present = all(get_model(name).weights_present() for name in EXPERTS)
needs_experts = pytest.mark.skipif(not experts_present, reason="expert weights missing: run `geosr weights fetch`")
needs_train = pytest.mark.skipif(not TRAIN.is_dir(), reason=f"training data not found at {TRAIN} (GEOSR_DATA)")


def test_fusion_net_starts_as_the_mean_of_its_candidates():
    torch.manual_seed(0)
    net = FusionNet(features=8, blocks=1, experts=EXPERTS)
    lr = torch.rand(2, 3, 6, 5)
    experts = torch.rand(2, 3 * len(EXPERTS), 24, 20)
    bic = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    cands = torch.cat([experts, bic], 1).view(2, len(EXPERTS) + 1, 3, 24, 20)
    out = net(lr, experts)
    assert out.shape == (2, 3, 24, 20)
    assert torch.allclose(out, cands.mean(1), atol=1e-6)  # zero-initialised head: equal weights, no correction


def test_dihedral_gives_the_eight_flips_and_turns_alike_on_every_tensor():
    from geosr.training.stage1 import _dihedral

    a = torch.arange(12.0).view(1, 1, 3, 4)
    views = [_dihedral(a, v % 4, v >= 4) for v in range(8)]
    assert len({tuple(t.flatten().tolist()) + tuple(t.shape) for t in views}) == 8
    # the same turn on an LR and its nearest x4 upsampling commutes with the upsampling: pairs stay aligned
    up = a.repeat_interleave(4, -1).repeat_interleave(4, -2)
    for v in range(8):
        turned = _dihedral(up, v % 4, v >= 4)
        assert torch.equal(turned, _dihedral(a, v % 4, v >= 4).repeat_interleave(4, -1).repeat_interleave(4, -2))


def _write_pairs(folder, n, size=32, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        hr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        lr = hr[::4, ::4]
        experts = np.stack([hr] * len(EXPERTS)).transpose(0, 3, 1, 2)
        np.savez(folder / f"{i:05d}.npz", hr=hr, lr=lr, experts=experts, expert_names=np.array(EXPERTS), kind="clean")


def test_train_fusion_holds_out_pairs_logs_them_and_saves_snapshots(tmp_path):
    import json

    from safetensors import safe_open

    from geosr.errors import ConfigError
    from geosr.training.stage1 import Stage1Config, train_fusion

    _write_pairs(tmp_path / "pairs", 5)
    cfg = Stage1Config(steps=6, batch=2, train_crop=16, features=8, blocks=1, lpips_weight=0.0, holdout=2,
                       snapshot=3)
    final = train_fusion(tmp_path, cfg)
    assert (tmp_path / "fusion-3.safetensors").is_file() and final.name == "fusion.safetensors"
    entries = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    held = [e for e in entries if "holdout_l1" in e]
    assert [e["step"] for e in held] == [3, 6]
    assert all(0 < e["holdout_l1"] < 1 for e in held)
    with safe_open(str(final), framework="pt") as f:
        meta = f.metadata()
    assert meta["pairs"] == "3" and meta["trained_steps"] == "6"  # trained on 5 - 2 held-out pairs
    assert json.loads(meta["config"])["augment"] is True
    with pytest.raises(ConfigError, match="holdout=5"):
        train_fusion(tmp_path, Stage1Config(steps=1, holdout=5, lpips_weight=0.0))


@needs_experts
@needs_train
def test_pairs_training_priors_and_the_model(tmp_path):
    from geosr.training.stage1 import PairSampler, Stage1Config, add_priors, make_pairs, train_fusion

    cfg = Stage1Config(data=str(TRAIN), pairs=3, crop=64, steps=4, batch=2, train_crop=32, features=8, blocks=1)
    folder = make_pairs(tmp_path, cfg)
    files = sorted(folder.glob("*.npz"))
    assert len(files) == 3
    z = np.load(files[0])
    assert z["hr"].shape == (64, 64, 3) and z["lr"].shape == (16, 16, 3)
    assert z["experts"].shape == (len(EXPERTS), 3, 64, 64) and z["experts"].dtype == np.uint8
    stamps = [f.stat().st_mtime_ns for f in files]
    make_pairs(tmp_path, cfg)  # resumable: existing pairs are kept as they are
    assert [f.stat().st_mtime_ns for f in files] == stamps

    weights = train_fusion(tmp_path, cfg)
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"step": 4' in lines[0]
    model = FusionSR(path=weights, chroma_factor=1)  # the network's own colour, as add_priors stores it
    assert model.provenance()["trained_steps"] == "4" and model.provenance()["version"] == "4 steps"
    lr = z["lr"].transpose(2, 0, 1).astype(np.float32) / 255
    out = model.upscale(lr, 4)
    assert out.shape == (3, 64, 64) and np.isfinite(out).all()

    assert add_priors(tmp_path, weights) == 3
    prior = np.load(files[0].with_suffix(".prior.npy"))
    assert prior.shape == (3, 64, 64) and prior.dtype == np.float16
    # the stored prior is what the model gives on the pair's LR (up to float16 and the 8-bit experts)
    assert np.abs(prior.astype(np.float32) - np.clip(out, 0, 1)).max() < 0.02

    sampler = PairSampler(tmp_path, crop=32, scale=4, seed=1)
    hr, low, pr = sampler.sample(2)
    assert hr.shape == (2, 3, 32, 32) and low.shape == (2, 3, 8, 8) and pr.shape == (2, 3, 32, 32)
    state = sampler.state_dict()
    again = sampler.sample(2)
    sampler.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again, sampler.sample(2)))


@pytest.mark.skipif(not (experts_present and WEIGHTS.is_file()), reason="committed stage-1 weights or experts missing")
def test_diffusion_trains_on_stored_pairs(tmp_path):
    from test_training import tiny_config

    from geosr.errors import ConfigError
    from geosr.training.loop import Trainer
    from geosr.training.stage1 import PairSampler

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        hr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        np.savez(pairs / f"{i:05d}.npz", hr=hr, lr=hr[::4, ::4], experts=np.zeros((2, 3, 64, 64), np.uint8),
                 kind="clean")
        np.save(pairs / f"{i:05d}.prior.npy", np.full((3, 64, 64), 0.5, np.float16))
    with pytest.raises(ConfigError, match="model.prior"):
        tiny_config(tmp_path / "run", pairs=str(tmp_path))
    model = dict(tiny_config(tmp_path / "x").model.to_dict(), prior="aerial-x4")
    trainer = Trainer(tiny_config(tmp_path / "run", pairs=str(tmp_path), model=model))
    batch = trainer.next_crops()
    assert len(batch) == 3 and batch[2].shape == batch[0].shape
    assert torch.all(batch[2] == 0.5)  # the stored prior, not the stage-1 model run again
    prepared = trainer.prepare(*batch)
    loss = trainer.step(prepared)
    assert np.isfinite(loss)
    assert isinstance(trainer.pairs, PairSampler)


@needs_train
def test_make_pairs_adds_the_outputs_of_new_experts_to_stored_pairs(tmp_path):
    from geosr.errors import ConfigError
    from geosr.training.stage1 import Stage1Config, make_pairs, pair_experts, train_fusion

    cfg = Stage1Config(data=str(TRAIN), pairs=2, crop=32, experts=("bicubic",), steps=1, batch=1, train_crop=16,
                       features=8, blocks=1, lpips_weight=0.0)
    files = sorted(make_pairs(tmp_path, cfg).glob("*.npz"))
    before = [dict(np.load(f)) for f in files]
    assert [str(n) for n in before[0]["expert_names"]] == ["bicubic"]
    more = Stage1Config(**{**cfg.__dict__, "experts": ("lanczos", "bicubic")})
    with pytest.raises(ConfigError, match="lanczos"):  # training on pairs that lack a candidate says what to run
        train_fusion(tmp_path, more)
    make_pairs(tmp_path, more)
    for f, old in zip(files, before):
        z = np.load(f)
        assert [str(n) for n in z["expert_names"]] == ["bicubic", "lanczos"]
        assert np.array_equal(z["hr"], old["hr"]) and np.array_equal(z["lr"], old["lr"])  # the pair is kept
        assert np.array_equal(z["experts"][0], old["experts"][0])
        x = np.moveaxis(z["lr"], -1, 0).astype(np.float32) / 255
        lanczos = np.clip(np.round(get_model("lanczos").upscale(x, 4) * 255), 0, 255).astype(np.uint8)
        both = pair_experts(z, ("lanczos", "bicubic"))  # in the order asked for
        assert both.shape == (6, 32, 32)
        assert np.array_equal(both[:3], lanczos) and np.array_equal(both[3:], old["experts"][0])
    weights = train_fusion(tmp_path, more)
    assert FusionSR(path=weights).experts == ("lanczos", "bicubic")  # recorded with the weights


def test_weights_without_recorded_experts_are_the_first_two(tmp_path):
    import json

    from safetensors.torch import save_file

    from geosr.models.fusion import LEGACY_EXPERTS, load_net, read_arch

    net = FusionNet(features=8, blocks=1)  # written as files were before the experts were recorded
    save_file(net.state_dict(), str(tmp_path / "old.safetensors"),
              metadata={"net": json.dumps({"features": 8, "blocks": 1, "residual": True})})
    assert read_arch(tmp_path / "old.safetensors")["experts"] == LEGACY_EXPERTS == ("rrdn-gan", "realesrgan-x4plus")
    assert load_net(tmp_path / "old.safetensors").k == 3


def test_training_ssim_is_the_benchmark_ssim_y():
    from geosr.bench import luma, ssim
    from geosr.training.stage1 import ssim_luma

    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.normal(0, 90, a.shape), 0, 255).astype(np.uint8)
    t = lambda x: torch.from_numpy(np.moveaxis(x, -1, 0)[None].astype(np.float64) / 255)  # noqa: E731
    want = ssim(luma(a), luma(b))
    assert 0.2 < want < 0.95
    assert abs(float(ssim_luma(t(a), t(b))) - want) < 2e-3  # luma here is not rounded to 8 bits
    assert abs(float(ssim_luma(t(a), t(a))) - 1) < 1e-9


def test_fusion_net_at_x2_starts_as_the_mean_of_its_x2_candidates():
    torch.manual_seed(0)
    net = FusionNet(features=8, blocks=1, experts=("waifu2x-photo",), scale=2)
    lr = torch.rand(1, 3, 7, 5)
    experts = torch.rand(1, 3, 14, 10)
    bic = torch.nn.functional.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False)
    out = net(lr, experts)
    assert out.shape == (1, 3, 14, 10)
    assert torch.allclose(out, (experts + bic) / 2, atol=1e-6)


def test_an_expert_without_the_scale_is_brought_down_from_its_own():
    from geosr.models.base import SRModel
    from geosr.models.consistency import downscale
    from geosr.models.fusion import candidate

    class X4Only(SRModel):  # nearest x4 only
        scales = (4,)

        def upscale(self, x, scale):
            self.check_scale(scale)
            return x.repeat(4, -1).repeat(4, -2) * 1.1 - 0.05  # leaves [0, 1] on purpose

    x = np.random.default_rng(0).random((3, 6, 8)).astype(np.float32)
    c2 = candidate(X4Only(), x, 2)
    assert c2.shape == (3, 12, 16)
    want = downscale(x.repeat(4, -1).repeat(4, -2) * 1.1 - 0.05, (12, 16))
    assert np.array_equal(c2, np.round(np.clip(want, 0, 1) * 255) / 255)  # 8-bit values, as stored in pairs
    c4 = candidate(get_model("nearest"), x, 2)  # a model with the scale runs at it
    assert np.array_equal(c4, np.round(np.clip(x.repeat(2, -1).repeat(2, -2), 0, 1) * 255) / 255)


@needs_train
def test_x2_pairs_train_a_x2_network_that_the_x4_model_runs_at_scale_2(tmp_path):
    from geosr.config import EnhanceConfig
    from geosr.errors import ConfigError
    from geosr.training.stage1 import Stage1Config, make_pairs, train_fusion

    cfg = Stage1Config(data=str(TRAIN), pairs=2, crop=32, scale=2, experts=("lanczos",), steps=2, batch=1,
                       train_crop=16, features=8, blocks=1, lpips_weight=0.0)
    z = np.load(min(make_pairs(tmp_path / "x2", cfg).glob("*.npz")))
    assert z["hr"].shape == (32, 32, 3) and z["lr"].shape == (16, 16, 3) and z["experts"].shape == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="x2 pair, not x4"):  # one folder per scale
        make_pairs(tmp_path / "x2", Stage1Config(**{**cfg.__dict__, "scale": 4}))
    weights = train_fusion(tmp_path / "x2", cfg)
    x2 = FusionSR(path=weights, name="x2", consistency=0.5, chroma_factor=2)
    assert x2.arch["scale"] == 2 and x2.scales == (2,)
    lr = np.moveaxis(z["lr"], -1, 0).astype(np.float32) / 255
    out = x2.upscale(lr, 2)
    assert out.shape == (3, 32, 32)
    x4 = FusionSR(x2=x2)
    assert x4.scales == (2, 4)
    assert np.array_equal(x4.upscale(lr, 2), out)  # the x4 model runs x2 with its x2 network
    x4.configure(EnhanceConfig(scale=2))
    assert x4.consistency == 0.5  # ... and the engine projects with that network's strength
    x4.configure(EnhanceConfig(scale=4))
    assert x4.consistency == FusionSR.default_consistency
    x4.configure(EnhanceConfig(scale=2, consistency=0.1))
    assert x4.consistency == 0.1  # a strength the user asks for wins
    assert f"; x2: {weights.name} + experts lanczos" in x4.provenance()["member"]


def test_damaged_only_trains_on_the_damaged_pairs_alone(tmp_path):
    from safetensors import safe_open

    from geosr.errors import ConfigError
    from geosr.training.stage1 import Stage1Config, train_fusion

    _write_pairs(tmp_path / "pairs", 5)
    cfg = dict(steps=2, batch=2, train_crop=16, features=8, blocks=1, lpips_weight=0.0, damaged_only=True)
    with pytest.raises(ConfigError, match="must leave pairs to train on"):  # every pair here is a clean one
        train_fusion(tmp_path, Stage1Config(**cfg))
    for name in ("00001.npz", "00003.npz"):
        z = dict(np.load(tmp_path / "pairs" / name))
        np.savez(tmp_path / "pairs" / name, **{**z, "kind": "second-order"})
    final = train_fusion(tmp_path, Stage1Config(**cfg))
    with safe_open(str(final), framework="pt") as f:
        assert f.metadata()["pairs"] == "2"
    final = train_fusion(tmp_path, Stage1Config(**{**cfg, "damaged_only": False}))
    with safe_open(str(final), framework="pt") as f:
        assert f.metadata()["pairs"] == "5"


def _train_on_a_copy(tmp_path, name, cfg):
    """Train a fusion network with ``cfg`` on a copy of ``tmp_path/pairs`` in ``tmp_path/name``; its tensors."""
    from safetensors.torch import load_file

    from geosr.training.stage1 import train_fusion

    folder = tmp_path / name
    (folder / "pairs").mkdir(parents=True)
    for p in (tmp_path / "pairs").glob("*.npz"):
        (folder / "pairs" / p.name).write_bytes(p.read_bytes())
    train_fusion(folder, cfg)
    return load_file(str(folder / "fusion.safetensors"))


def test_the_ssim_weight_can_differ_on_clean_pairs(tmp_path):
    from geosr.training.stage1 import Stage1Config, _load_pairs, ssim_luma

    rng = np.random.default_rng(5)
    a, b = torch.from_numpy(rng.random((3, 3, 20, 20))), torch.from_numpy(rng.random((3, 3, 20, 20)))
    per = ssim_luma(a, b, per_sample=True)
    assert per.shape == (3,) and torch.allclose(per.mean(), ssim_luma(a, b))
    assert float(per[0]) == pytest.approx(float(ssim_luma(a[:1], b[:1])))

    _write_pairs(tmp_path / "pairs", 4)
    z = dict(np.load(tmp_path / "pairs" / "00001.npz"))
    np.savez(tmp_path / "pairs" / "00001.npz", **{**z, "kind": "light"})
    assert _load_pairs(tmp_path / "pairs", EXPERTS)[3].tolist() == [True, False, True, True]
    cfg = {"steps": 3, "batch": 2, "train_crop": 16, "features": 8, "blocks": 1, "lpips_weight": 0.0,
           "ssim_weight": 0.6}
    runs = []
    for clean_weight in (None, 0.6, 0.0):
        runs.append(_train_on_a_copy(tmp_path, str(clean_weight), Stage1Config(**cfg, ssim_weight_clean=clean_weight)))
    # a clean weight equal to the others' trains the same network (up to the order of the mean), another does not
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=1e-6) for k in runs[0])
    assert any(not torch.allclose(runs[0][k], runs[2][k]) for k in runs[0])


def test_the_lr_consistency_term_is_the_benchmarks_downscale_and_changes_training(tmp_path):
    from PIL import Image

    from geosr.training.stage1 import Stage1Config, lr_disagreement

    rng = np.random.default_rng(6)
    hr = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    lr = np.asarray(Image.fromarray(hr).resize((10, 12), Image.BICUBIC))  # PIL's antialiased bicubic, as LRC's
    t = lambda x: torch.from_numpy(np.moveaxis(x, -1, 0)[None].astype(np.float32) / 255)  # noqa: E731
    agree = float(lr_disagreement(t(hr), t(lr)))
    assert agree < 0.6 / 255  # PIL rounds to 8 bits; nothing else differs
    off = t(hr).clone().requires_grad_(True)
    worse = lr_disagreement(off + 0.1, t(lr))
    assert float(worse.detach()) == pytest.approx(0.1, abs=1e-3)  # a uniform shift survives the downscale whole
    worse.backward()
    assert off.grad is not None and float(off.grad.abs().sum()) > 0  # differentiable

    _write_pairs(tmp_path / "pairs", 3)
    cfg = {"steps": 3, "batch": 2, "train_crop": 32, "features": 8, "blocks": 1, "lpips_weight": 0.0}
    runs = []
    for weight in (0.0, 5.0):
        runs.append(_train_on_a_copy(tmp_path, str(weight), Stage1Config(**cfg, lrc_weight=weight)))
    assert any(not torch.allclose(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(bool(torch.isfinite(v).all()) for v in runs[1].values())
