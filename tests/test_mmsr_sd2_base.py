"""An MMSR model on a Stable Diffusion 2 base (latent space, its UNet, its CLIP text encoder), on a tiny
SD2-shaped folder written here: build, sample, save, load, and train two steps. Nothing is downloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from geosr.config import data_dir  # noqa: E402
from geosr.models.mmsr.bundle import MMSRBundle, MMSRConfig, build_bundle  # noqa: E402

WIDTH = 32  # the tiny CLIP's hidden size = the UNet's cross_attention_dim = text_dim


def write_tiny_sd2(root):
    """unet/, vae/, text_encoder/ and tokenizer/ in the diffusers layout, random weights, safetensors."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=4, norm_num_groups=4).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    # a character-level CLIP BPE vocabulary: every printable ASCII character, alone and word-final
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(
        root / "text_encoder", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_sd2(tmp_path_factory.mktemp("sd2"))


def tiny_config(base) -> MMSRConfig:
    return MMSRConfig(base=str(base), text_encoder="base", text_dim=WIDTH, tile=16, num_latents=4, connector_depth=1,
                      heads=2, codebook_size=8, code_dim=8, grid_size=8, map_size=32, tokenizer_channels=8,
                      prediction_type="epsilon")


def test_sd2_base_builds_in_latent_space_and_round_trips(base, tmp_path):
    bundle = build_bundle(tiny_config(base), seed=0)
    pipe = bundle.pipeline
    assert pipe.vae is not None and pipe.unet.config.in_channels == 8  # 4 latent + 4 conditioning latent
    w = pipe.unet.conv_in.weight
    assert torch.count_nonzero(w[:, 4:]) == 0 and torch.count_nonzero(w[:, :4]) > 0  # InstructPix2Pix init
    states, mask = pipe.text_encoder.encode(["aerial image; 60% vegetation"])
    assert states.shape == (1, 77, WIDTH) and bool(mask.all())

    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = pipe.condition_image(lr)
    maps, captions = bundle.conditions(cond)

    def run(b):
        return b.pipeline(lr, modalities=b.encode_maps(maps), prompt=captions, num_inference_steps=2,
                          guidance_scale=2.0, guidance_mode="m-cfg", generator=torch.Generator().manual_seed(1)).images

    out = run(bundle)
    assert out.shape == (1, 3, 64, 64) and np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    loaded = MMSRBundle.load(bundle.save(tmp_path / "ckpt"))
    assert loaded.pipeline.vae is not None
    np.testing.assert_array_equal(run(loaded), out)


def test_sd2_base_trains(base, tmp_path):
    from geosr.training.loop import TrainConfig, train

    if not (data_dir() / "train").is_dir():
        pytest.skip("no training data (set GEOSR_DATA)")
    cfg = TrainConfig(model=tiny_config(base), batch_size=1, steps=2, tokenizer_steps=1, checkpoint_every=2,
                      log_every=1, warmup_steps=0, output=str(tmp_path / "run"), device="cpu", threads=1)
    result = train(cfg)
    assert result.steps == 2 and np.isfinite(result.final_loss)
    assert MMSRBundle.load(result.final).pipeline.vae is not None
