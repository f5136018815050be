"""MMSRPipeline and the SD2 UNet loader, on tiny random components (seconds on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

from geosr.errors import WeightsError  # noqa: E402
from geosr.models.mmsr.connector import ConditionerConfig, MultimodalConditioner  # noqa: E402
from geosr.models.mmsr.pipeline import (  # noqa: E402
    MMSRPipeline,
    MultimodalGuider,
    PipelineInputError,
)
from geosr.models.mmsr.sd2 import unet_from_sd2  # noqa: E402
from geosr.models.mmsr.text import HashTextConfig, HashTextEncoder  # noqa: E402

D = 16  # text / cross-attention width
G = 16  # code grid side
K = 8  # codebook size
MODALITIES = ("depth", "segmentation", "edges")


def tiny_unet(*, in_channels: int, out_channels: int, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=out_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=D, attention_head_dim=4,
        norm_num_groups=4).eval()


def make_pipe(*, unshuffle: int = 2, residual: bool = False, seed: int = 0, residual_scale: float = 1.0
              ) -> MMSRPipeline:
    work = 3 * unshuffle * unshuffle
    torch.manual_seed(seed)
    conditioner = MultimodalConditioner(config=ConditionerConfig(
        modalities=MODALITIES, text_dim=D, num_latents=4, depth=1, heads=2, codebook_size=K, code_dim=8,
        grid_size=G)).eval()
    text = HashTextEncoder(config=HashTextConfig(dim=D, num_buckets=64, max_length=8)).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", clip_sample=False)
    pipe = MMSRPipeline(unet=tiny_unet(in_channels=2 * work, out_channels=work, seed=seed), scheduler=scheduler,
                        conditioner=conditioner, text_encoder=text, scale=4, unshuffle=unshuffle, residual=residual,
                        residual_scale=residual_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> MMSRPipeline:
    return make_pipe()


def lr_batch(B: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (B, 3, h, w)


def codes(B: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randint(0, K, (B, G, G), generator=g) for m in ("depth", "edges")}  # segmentation missing


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unshuffle", [2, 4])
def test_output_shape_x4(unshuffle):
    p = make_pipe(unshuffle=unshuffle)
    out = p(lr_batch(), modalities=codes(), prompt="a road", num_inference_steps=2,
            generator=torch.Generator().manual_seed(0)).images
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (2, 3, 64, 64)
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0


def test_numpy_input_and_pt_output(pipe):
    lr = lr_batch(1).numpy()
    out = pipe(lr, num_inference_steps=1, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("w", [0.0, 2.5])
def test_guidance_combination_matches_hand_computation(pipe, monkeypatch, w):
    B = 2
    work = pipe.unet.config.out_channels
    g = torch.Generator().manual_seed(3)
    eps_pos = torch.randn(B, work, 32, 32, generator=g)
    eps_neg = torch.randn(B, work, 32, 32, generator=g)
    seen_batch, seen_outputs = [], []

    def fake_unet(sample, t, encoder_hidden_states=None, return_dict=True, **_):
        seen_batch.append(sample.shape[0])
        out = torch.cat([eps_pos, eps_neg])[: sample.shape[0]]  # rows 0..B-1 positive, B..2B-1 negative
        return (out,)

    step = pipe.scheduler.step

    def recording_step(model_output, t, sample, **kw):
        seen_outputs.append(model_output.clone())
        return step(model_output, t, sample, **kw)

    monkeypatch.setattr(pipe.unet, "forward", fake_unet)
    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    pipe(lr_batch(B), modalities=codes(B), prompt="roofs", negative_prompt="blur", num_inference_steps=2,
         guidance_scale=w, guidance_mode="m-cfg", generator=torch.Generator().manual_seed(0))
    expected = (1 + w) * eps_pos - w * eps_neg if w else eps_pos
    assert seen_batch == [2 * B if w else B] * 2  # one batched forward per step
    assert len(seen_outputs) == 2
    for got in seen_outputs:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_guider_combine_directly():
    pos, neg = torch.full((1, 2), 3.0), torch.full((1, 2), 1.0)
    out = MultimodalGuider(mode="m0-cfg", scale=2.0).combine(torch.cat([pos, neg]))
    torch.testing.assert_close(out, torch.full((1, 2), 7.0))  # (1 + 2) * 3 - 2 * 1


def test_modes_give_different_negative_branches(pipe, monkeypatch):
    B = 2
    seen = {}
    forward = pipe.conditioner.forward

    def recording_forward(text_states, text_mask, codes, drop=None, temperatures=None, **kw):
        out = forward(text_states, text_mask, codes, drop, temperatures, **kw)
        seen[mode] = dict(text_mask=text_mask.clone(), codes=codes, drop=drop, context=out.clone())
        return out

    monkeypatch.setattr(pipe.conditioner, "forward", recording_forward)
    c = codes(B)
    images = {}
    for mode in ("cfg", "m0-cfg", "m-cfg"):
        neg = None if mode == "cfg" else ""
        images[mode] = pipe(lr_batch(B), modalities=c, prompt="fields and a river", negative_prompt=neg,
                            num_inference_steps=1, guidance_scale=3.0, guidance_mode=mode,
                            generator=torch.Generator().manual_seed(0)).images

    for mode, rec in seen.items():
        mask = rec["text_mask"]
        assert mask.shape[0] == 2 * B
        assert mask[:B].any(dim=1).all()  # the positive caption is always read
        for m in ("depth", "edges"):
            torch.testing.assert_close(rec["codes"][m], torch.cat([c[m], c[m]]))  # real codes in both halves
        assert rec["codes"]["segmentation"] is None  # missing -> null token in both halves
    # m-cfg: negative caption + the real modalities (nothing dropped)
    assert seen["m-cfg"]["drop"] is None
    assert seen["m-cfg"]["text_mask"][B:].any(dim=1).all()
    # m0-cfg: negative caption + null modality tokens in the negative half only
    for m in ("depth", "edges"):
        assert seen["m0-cfg"]["drop"][m].tolist() == [False] * B + [True] * B
        assert seen["cfg"]["drop"][m].tolist() == [False] * B + [True] * B
    assert seen["m0-cfg"]["text_mask"][B:].any(dim=1).all()
    # cfg: the caption is dropped entirely (no text key attended), modalities null
    assert not seen["cfg"]["text_mask"][B:].any()
    # the positive halves agree; the negative halves differ pairwise, and so do the images
    ctx = {k: v["context"] for k, v in seen.items()}
    for a, b in (("cfg", "m0-cfg"), ("cfg", "m-cfg"), ("m0-cfg", "m-cfg")):
        torch.testing.assert_close(ctx[a][:B], ctx[b][:B])
        assert (ctx[a][B:] - ctx[b][B:]).abs().max() > 1e-4, (a, b)
        assert np.abs(images[a] - images[b]).max() > 1e-6, (a, b)


def test_same_seed_same_output_different_seed_differs(pipe):
    kw = dict(modalities=codes(), prompt="a harbour", num_inference_steps=2, guidance_scale=1.5)
    a = pipe(lr_batch(), generator=torch.Generator().manual_seed(7), **kw).images
    b = pipe(lr_batch(), generator=torch.Generator().manual_seed(7), **kw).images
    c = pipe(lr_batch(), generator=torch.Generator().manual_seed(8), **kw).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_batch_equals_single_items():
    # float64: in float32 the UNet's batch-size-dependent CPU kernels differ by ~1e-6, and the first few-step
    # DDIM update divides eps by sqrt(alpha_bar) ~ 0.07, so outputs would agree only to ~2e-4
    pipe = make_pipe().to(torch.float64)
    B = 3
    lr, c = lr_batch(B, seed=4), codes(B, seed=5)
    prompts = ["dense city blocks", "forest", "a long straight road next to a canal"]  # different lengths: padding
    kw = dict(num_inference_steps=2, guidance_scale=2.0, guidance_mode="m0-cfg", temperatures={"depth": 0.5})
    batch = pipe(lr, modalities=c, prompt=prompts, generator=gens([10, 11, 12]), **kw).images
    for i in range(B):
        single = pipe(lr[i:i + 1], modalities={m: v[i:i + 1] for m, v in c.items()}, prompt=prompts[i],
                      generator=gens([10 + i]), **kw).images
        np.testing.assert_allclose(batch[i:i + 1], single, rtol=0, atol=1e-6)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_save_then_load_gives_identical_output(pipe, tmp_path):
    kw = dict(modalities=codes(), prompt="an airport", negative_prompt="noise", num_inference_steps=2,
              guidance_scale=1.0, guidance_mode="m-cfg")
    before = pipe(lr_batch(), generator=torch.Generator().manual_seed(0), **kw).images
    pipe.save_pretrained(tmp_path / "mmsr")
    assert not list((tmp_path / "mmsr").rglob("*.bin"))  # safetensors only
    loaded = MMSRPipeline.from_pretrained(tmp_path / "mmsr")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.conditioner) is MultimodalConditioner
    assert type(loaded.text_encoder) is HashTextEncoder
    assert loaded.conditioner.config == pipe.conditioner.config
    for key, value in pipe.conditioner.state_dict().items():
        torch.testing.assert_close(loaded.conditioner.state_dict()[key], value, rtol=0, atol=0)
    assert dict(loaded.config)["unshuffle"] == 2 and dict(loaded.config)["residual"] is False
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    after = loaded(lr_batch(), generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(before, after)


def test_load_without_text_encoder_and_replacing_a_component(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "mmsr")
    loaded = MMSRPipeline.from_pretrained(tmp_path / "mmsr", text_encoder=None)
    assert loaded.text_encoder is None
    loaded.set_progress_bar_config(disable=True)
    out = loaded(lr_batch(1), num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64)
    with pytest.raises(PipelineInputError, match="prompt"):
        loaded(lr_batch(1), prompt="x", num_inference_steps=1)


@pytest.mark.parametrize("residual", [False, True])
def test_working_space_round_trip(residual):
    p = make_pipe(residual=residual)
    g = torch.Generator().manual_seed(0)
    hr, cond = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    x0 = p.encode_target(hr, cond)
    assert x0.shape == (2, 12, 32, 32)
    torch.testing.assert_close(p.decode_sample(x0, cond), hr)
    if residual:  # the sample is the residual: the conditioning image itself decodes from x0 = 0
        torch.testing.assert_close(p.decode_sample(torch.zeros_like(x0), cond), cond)
        out = p(lr_batch(1), cond_image=cond[:1], num_inference_steps=1,
                generator=torch.Generator().manual_seed(0)).images
        assert out.shape == (1, 3, 64, 64)


def test_residual_scale_multiplies_the_target_and_divides_the_sample(tmp_path):
    g = torch.Generator().manual_seed(0)
    hr, cond = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    plain, scaled = make_pipe(residual=True), make_pipe(residual=True, residual_scale=6.0)
    torch.testing.assert_close(scaled.encode_target(hr, cond), 6.0 * plain.encode_target(hr, cond))
    torch.testing.assert_close(scaled.decode_sample(scaled.encode_target(hr, cond), cond), hr)
    # the same working-space sample lands 6x closer to the conditioning image
    x0 = torch.randn(2, 12, 32, 32, generator=g) * 0.1
    torch.testing.assert_close(scaled.decode_sample(x0, cond) - cond, (plain.decode_sample(x0 / 6.0, cond) - cond))
    assert not torch.allclose(scaled.decode_sample(x0, cond), plain.decode_sample(x0, cond))
    # saved and loaded with the pipeline; a folder written before the setting existed loads as 1
    scaled.save_pretrained(tmp_path / "scaled")
    assert MMSRPipeline.from_pretrained(tmp_path / "scaled").config.residual_scale == 6.0
    plain.save_pretrained(tmp_path / "old")
    index = tmp_path / "old" / "model_index.json"
    index.write_text(index.read_text().replace('"residual_scale": 1.0,', ""))
    assert "residual_scale" not in index.read_text()
    assert MMSRPipeline.from_pretrained(tmp_path / "old").config.residual_scale == 1.0
    with pytest.raises(PipelineInputError, match="residual_scale"):
        make_pipe(residual=True, residual_scale=0.0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(guidance_mode="pag"), "guidance_mode"),
    (dict(num_inference_steps=-1), "num_inference_steps"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(lr=torch.rand(2, 16, 16)), "lr of shape"),
    (dict(lr=torch.rand(2, 4, 16, 16)), "lr of shape"),
    (dict(lr=(torch.rand(1, 3, 16, 16) * 255).to(torch.uint8)), "lr of dtype"),
    (dict(modalities={"height": torch.zeros(1, G, G, dtype=torch.long)}), "unknown modality 'height'"),
    (dict(modalities={"depth": torch.zeros(2, G, G, dtype=torch.long)}), "modalities\\['depth'\\]"),
    (dict(modalities={"depth": torch.zeros(1, G, G)}), "modalities\\['depth'\\]"),
    (dict(temperatures={"height": 1.0}), "temperatures: unknown key 'height'"),
    (dict(temperatures={"depth": 0.0}), "temperatures\\['depth'\\]"),
    (dict(prompt=["a", "b"]), "prompt"),
    (dict(negative_prompt="blur", guidance_scale=1.0, guidance_mode="cfg"), "negative_prompt"),
    (dict(generator=gens([1, 2])), "generator"),
    (dict(output_type="pil"), "output_type"),
    (dict(cond_image=torch.rand(1, 3, 32, 32)), "cond_image"),
])
def test_check_inputs_names_the_bad_value(pipe, kwargs, name):
    args = dict(lr=lr_batch(1), num_inference_steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        pipe(**args)


def test_output_size_must_fit_the_unet():
    p = make_pipe(unshuffle=4)  # sides must be multiples of 4 * 2 = 8: 15 * 4 = 60 is not
    with pytest.raises(ValueError, match="lr of shape .* divisible by 8"):
        p(torch.rand(1, 3, 15, 16), num_inference_steps=1)


def test_constructor_rejects_mismatched_unet():
    p = make_pipe()
    with pytest.raises(ValueError, match="in_channels"):
        MMSRPipeline(unet=tiny_unet(in_channels=8, out_channels=4), scheduler=p.scheduler,
                     conditioner=p.conditioner, unshuffle=2)


# ----------------------------------------------------------------------------------------------------------
# SD2 initialisation


def test_unet_from_sd2_widens_conv_in_with_zeros(tmp_path):
    original = tiny_unet(in_channels=4, out_channels=4, seed=3)
    original.save_pretrained(tmp_path / "sd2" / "unet")
    unet = unet_from_sd2(tmp_path / "sd2", extra_in_channels=5)
    old_w, new_w = original.conv_in.weight, unet.conv_in.weight
    assert new_w.shape == (old_w.shape[0], 9, *old_w.shape[2:])
    assert unet.config.in_channels == 9
    torch.testing.assert_close(new_w[:, :4], old_w, rtol=0, atol=0)
    assert torch.count_nonzero(new_w[:, 4:]) == 0
    torch.testing.assert_close(unet.conv_in.bias, original.conv_in.bias, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 3, D, generator=g)
    with torch.no_grad():
        want = original(x, 10, encoder_hidden_states=ctx).sample
        got = unet(torch.cat([x, torch.zeros(2, 5, 16, 16)], 1), 10, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the widened UNet saves and reloads with its new width
    unet.save_pretrained(tmp_path / "wide")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "wide")
    assert again.conv_in.weight.shape[1] == 9


def test_unet_from_sd2_offline_by_default(tmp_path):
    with pytest.raises(WeightsError, match="local_files_only=False"):
        unet_from_sd2("stabilityai/no-such-model-geosr-test", extra_in_channels=4)
    with pytest.raises(WeightsError, match="no such folder"):
        unet_from_sd2(tmp_path / "missing" / "deeper", extra_in_channels=4)
