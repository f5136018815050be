"""Fine-tuned experts (geosr.training.expert, geosr.models.networks.TunedSR): only the difference from the registry
weights is written, and it is added back only onto the tensors it was computed against."""

import json

import numpy as np
import pytest
import torch

from geosr.config import data_dir
from geosr.errors import WeightsError
from geosr.models import get_model

TRAIN = data_dir() / "train"
rrdn_present = get_model("rrdn-gan").weights_present()
needs_rrdn = pytest.mark.skipif(not rrdn_present, reason="RRDN-GAN weights missing: run `geosr weights fetch`")


def _tuned(tmp_path, delta, name="t"):
    from geosr.models.networks import TunedSR

    base = get_model("rrdn-gan")
    return TunedSR(name=name, filename=base.filename, module=base.module, delta=delta, receptive_field=20,
                   default_tile=256, description="test")


@needs_rrdn
@pytest.mark.skipif(not TRAIN.is_dir(), reason=f"training data not found at {TRAIN} (GEOSR_DATA)")
def test_tune_expert_writes_only_the_difference_and_tunedsr_adds_it_back(tmp_path):
    from safetensors.torch import load_file

    from geosr.models import tfjs
    from geosr.training.expert import ExpertConfig, tune_expert

    cfg = ExpertConfig(data=str(TRAIN), steps=2, batch=2, crop=32, pool=4, holdout=2, log_every=1)
    path = tune_expert(tmp_path / "run", cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1, 2] and all(np.isfinite(e["holdout_lpips"]) for e in log)
    delta = load_file(str(path))
    base = tfjs.load(get_model("rrdn-gan").path).state_dict()
    assert set(delta) == set(base) and all(d.dtype == torch.float16 for d in delta.values())
    moved = sum(float(d.abs().max()) > 0 for d in delta.values())
    assert moved > len(delta) // 2  # two Adam steps move (almost) every tensor
    assert max(float(d.abs().max()) for d in delta.values()) < 0.01  # ... by little: it is a difference, not weights

    model = _tuned(tmp_path, path)
    assert model.weights_present()
    model.prepare()
    tuned = model._net.state_dict()
    for k in base:
        torch.testing.assert_close(tuned[k], base[k] + delta[k].float(), rtol=0, atol=0)
    shared = get_model("rrdn-gan")
    shared.prepare()
    assert all(torch.equal(shared._net.state_dict()[k], base[k]) for k in base)  # the base network is untouched
    x = np.random.default_rng(0).random((3, 12, 12), dtype=np.float32)
    assert model.upscale(x, 4).shape == (3, 48, 48)
    assert np.abs(model.upscale(x, 4) - shared.upscale(x, 4)).max() > 0
    prov = model.provenance()
    assert prov["package"] == "geosr-trained:delta" and prov["version"] == "2 steps"
    assert "@upscalerjs/models" in prov["member"]


@needs_rrdn
def test_a_difference_computed_on_other_base_tensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    from geosr.models import tfjs

    state = tfjs.load(get_model("rrdn-gan").path).state_dict()
    path = tmp_path / "delta.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(path),
              metadata={"base": "rrdn-gan", "base_tensors_sha256": "0" * 64, "trained_steps": "1"})
    with pytest.raises(WeightsError, match="other rrdn_gan_x4.safetensors tensors"):
        _tuned(tmp_path, path).prepare()
    assert not _tuned(tmp_path, tmp_path / "missing.safetensors").weights_present()
    with pytest.raises(WeightsError, match="committed weights are missing"):
        _tuned(tmp_path, tmp_path / "missing.safetensors").prepare()


def test_patch_discriminator_learns_to_tell_its_two_inputs_apart():
    from geosr.training.adversarial import discriminator_loss, generator_loss, patch_discriminator

    torch.manual_seed(0)
    disc = patch_discriminator(features=8)
    real, fake = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32) * 0.2  # bright noise vs dark noise
    assert disc(real).shape == (4, 1, 4, 4)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    first = float(discriminator_loss(disc(real), disc(fake)))
    for _ in range(30):
        loss = discriminator_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(discriminator_loss(disc(real), disc(fake))) < 0.5 * first
    assert float(generator_loss(disc(fake))) > float(generator_loss(disc(real)))  # fakes now look fake


@needs_rrdn
@pytest.mark.skipif(not TRAIN.is_dir(), reason=f"training data not found at {TRAIN} (GEOSR_DATA)")
def test_tune_expert_with_a_discriminator_logs_both_players(tmp_path):
    from geosr.models.sources import read_provenance
    from geosr.training.expert import ExpertConfig, tune_expert

    cfg = ExpertConfig(data=str(TRAIN), steps=2, batch=2, crop=32, pool=4, holdout=2, log_every=1, gan_weight=0.1,
                       p_clean=1.0, p_light=0.0)
    path = tune_expert(tmp_path / "run", cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1, 2]
    assert all(np.isfinite(e["g_adv"]) and 0 < e["d_loss"] < 10 for e in log[1:])
    recorded = json.loads(read_provenance(path)["config"])  # the recipe travels with the difference
    assert (recorded["gan_weight"], recorded["p_clean"]) == (0.1, 1.0)


@needs_rrdn
def test_an_int8_difference_is_added_back_with_its_scales(tmp_path):
    from safetensors.torch import load_file, save_file

    from geosr.models import tfjs
    from geosr.models.sources import read_provenance
    from geosr.training.expert import quantize_delta, tensors_sha256

    base = tfjs.load(get_model("rrdn-gan").path).state_dict()
    rng = torch.Generator().manual_seed(0)
    delta = {k: (torch.randn(v.shape, generator=rng) * 1e-3).half() for k, v in base.items()}
    src = tmp_path / "delta.safetensors"
    save_file(delta, str(src), metadata={"base": "rrdn-gan", "base_tensors_sha256": tensors_sha256(base)})
    q = quantize_delta(src, tmp_path / "q8.safetensors")
    assert q.stat().st_size < 0.6 * src.stat().st_size
    model = _tuned(tmp_path, q)
    model.prepare()
    tuned = model._net.state_dict()
    for k in base:  # within half a quantisation step of the float16 difference
        step = float(delta[k].float().abs().max()) / 127
        assert float((tuned[k] - base[k] - delta[k].float()).abs().max()) <= 0.5 * step + 1e-6
    meta = {k: v for k, v in read_provenance(q).items() if k != "int8_scales"}
    save_file(load_file(str(q)), str(tmp_path / "bad.safetensors"), metadata=meta)  # the scales lost
    with pytest.raises(WeightsError, match="without their scales"):
        _tuned(tmp_path, tmp_path / "bad.safetensors").prepare()


@needs_rrdn
@pytest.mark.skipif(not TRAIN.is_dir(), reason=f"training data not found at {TRAIN} (GEOSR_DATA)")
def test_tune_expert_can_continue_from_a_committed_tuned_network(tmp_path):
    from safetensors.torch import load_file

    from geosr.errors import ConfigError
    from geosr.models import tfjs
    from geosr.training.expert import ExpertConfig, tune_expert

    start = get_model("rrdn-aerial")
    start.prepare()
    started = {k: v.clone() for k, v in start._net.state_dict().items()}
    base = tfjs.load(get_model("rrdn-gan").path).state_dict()
    cfg = ExpertConfig(data=str(TRAIN), steps=1, batch=2, crop=32, pool=4, holdout=2, log_every=1, lr=1e-6,
                       start="rrdn-aerial")
    delta = load_file(str(tune_expert(tmp_path / "run", cfg)))
    # the written difference is still from the registry's weights, and it carries the start's own difference
    start_delta = {k: started[k] - base[k] for k in base}
    big = max(start_delta, key=lambda k: float(start_delta[k].abs().max()))
    assert float(start_delta[big].abs().max()) > 1e-3
    for k in base:  # one step at lr 1e-6 moves a weight by about 1e-6; float16 rounds to 1e-3 of the value
        tol = 2e-5 + 2e-3 * float(start_delta[k].abs().max())
        assert float((delta[k].float() - start_delta[k]).abs().max()) <= tol, k
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < e["holdout_ssim_y"] <= 1 for e in log)
    with pytest.raises(ConfigError, match="not a network tuned from 'rrdn-gan'"):
        tune_expert(tmp_path / "bad", ExpertConfig(data=str(TRAIN), steps=1, start="realesrgan-aerial"))
