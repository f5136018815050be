"""Multimodal latent connector (MMLC): a fixed number of latents that read caption + spatial modality tokens.

Sequence the latents read, per sample (M = T + P * g * g keys)::

    [ text tokens (T) | depth codes (g*g) | segmentation codes (g*g) | edges codes (g*g) ]

* every spatial token = projection of its code embedding + modality-type embedding + 2-D position embedding;
  every text token = the text encoder's state + the "text" type embedding;
* a modality that is missing (``codes[m] is None``) or dropped for a sample (``drop[m][b]``) has ALL its
  g*g tokens replaced by that modality's learnable null token m_null, so "missing" and "dropped" are the same
  input to the connector (classifier-free guidance per modality);
* N learnable latents cross-attend once to the whole sequence (cost O(N * M), no M x M matrix), then L
  pre-norm self-attention blocks mix the latents (O(N^2), independent of M). Output ``(B, N, D)``;
* per-modality temperature delta_m divides the cross-attention logits of the keys of modality m, on top of
  the usual 1/sqrt(d_head): ``softmax_j(q . k_j / (sqrt(d) * delta_{m(j)}))``. delta = 1 is neutral; a lower
  delta sharpens (and for zero-mean logits raises) that modality's share of the attention, a higher one
  flattens it. Useful range about 0.4 to 10. Implemented by scaling the keys by 1/delta_m, which is exactly
  the same as dividing the logits and lets the fast path use ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from .tokenizer import ModalityTokenizer, load_config, load_weights, save_component

log = logging.getLogger(__name__)

TEXT = "text"


class UnknownModalityError(ConfigError, ValueError):
    """A modality name the conditioner was not built with (a ValueError too, for callers that catch that)."""


@dataclass
class ConditionerConfig:
    modalities: tuple[str, ...] = ("depth", "segmentation", "edges")  # spatial modalities, in sequence order
    text_dim: int = 384  # D: width of the text states, of every token and of the output latents
    num_latents: int = 128  # N: learnable latents that read the multimodal sequence
    depth: int = 4  # L: self-attention blocks after the cross-attention
    heads: int = 8  # attention heads in every attention layer; text_dim must be divisible by it
    mlp_ratio: float = 4.0  # hidden width of every MLP, as a multiple of D
    codebook_size: int = 1024  # K: codes per modality (the tokenizers' codebook_size)
    code_dim: int = 256  # width of a code embedding before projection to D (the tokenizers' code_dim)
    grid_size: int = 16  # side of each modality's code grid: g*g tokens per modality
    dropout: float = 0.0  # dropout on attention weights and MLP outputs (training only)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        for name in self.modalities:
            if not name.isidentifier() or name == TEXT:
                raise ConfigError(f"modality name '{name}': use a Python identifier other than '{TEXT}'")
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"modalities {self.modalities}: each name must appear once")
        if self.text_dim % self.heads:
            raise ConfigError(f"text_dim={self.text_dim} is not divisible by heads={self.heads}")
        if min(self.num_latents, self.codebook_size, self.code_dim, self.grid_size, self.heads) < 1 or self.depth < 0:
            raise ConfigError(f"{self}: sizes must be positive (depth may be 0)")


# ----------------------------------------------------------------------------------------------------------
# spatial tokens


class ModalityTokens(nn.Module):
    """Code grids of every spatial modality -> one token sequence ``(B, P*g*g, D)`` with null substitution."""

    def __init__(self, *, modalities: tuple[str, ...], codebook_size: int, code_dim: int, dim: int,
                 grid_size: int):
        super().__init__()
        self.modalities = tuple(modalities)
        self.codebook_size, self.grid_size = codebook_size, grid_size
        # separate tables: each modality has its own tokenizer, so code 7 of depth and code 7 of edges differ
        self.embed = nn.ModuleDict({m: nn.Embedding(codebook_size, code_dim) for m in self.modalities})
        self.proj = nn.ModuleDict({m: nn.Linear(code_dim, dim) for m in self.modalities})
        self.type_embed = nn.Parameter(torch.randn(len(self.modalities) + 1, dim) * 0.02)  # (1+P, D), row 0 = text
        self.pos_embed = nn.Parameter(torch.randn(grid_size * grid_size, dim) * 0.02)  # (g*g, D), shared
        self.null = nn.Parameter(torch.randn(len(self.modalities), dim) * 0.02)  # (P, D) one m_null per modality

    @property
    def tokens_per_modality(self) -> int:
        return self.grid_size * self.grid_size

    def load_codebook(self, modality: str, codebook: Tensor) -> None:
        """Initialise a modality's code embedding from its tokenizer's codebook ``(K, code_dim)``."""
        table = self.embed[modality].weight
        if codebook.shape != table.shape:
            raise ConfigError(f"codebook of shape {tuple(codebook.shape)} for '{modality}': the conditioner "
                              f"expects {tuple(table.shape)} (codebook_size, code_dim)")
        with torch.no_grad():
            table.copy_(codebook)

    def forward(self, codes: dict[str, Tensor | None], *, drop: dict[str, Tensor] | None, batch_size: int,
                ) -> tuple[Tensor, Tensor]:
        """Return tokens ``(B, P*g*g, D)`` and the key segment id of each token ``(P*g*g,)`` (1 + modality index)."""
        B, G = batch_size, self.tokens_per_modality
        drop = drop or {}
        chunks, segments = [], []
        for i, name in enumerate(self.modalities):
            null = self.null[i].expand(B, G, -1)  # (B, G, D)
            grid = codes.get(name)
            if grid is None:
                tokens = null
            else:
                e = self.embed[name](grid.reshape(B, G))  # (B, G, code_dim)
                tokens = self.proj[name](e) + self.type_embed[i + 1] + self.pos_embed  # (B, G, D)
                if name in drop:
                    tokens = torch.where(drop[name].reshape(B, 1, 1), null, tokens)
            chunks.append(tokens)
            segments.append(torch.full((G,), i + 1, dtype=torch.long, device=self.null.device))
        if not chunks:
            empty = self.null.new_zeros(B, 0, self.null.shape[-1])
            return empty, torch.zeros(0, dtype=torch.long, device=self.null.device)
        return torch.cat(chunks, dim=1), torch.cat(segments)


# ----------------------------------------------------------------------------------------------------------
# attention blocks


class Attention(nn.Module):
    """Multi-head attention of queries ``(B, N, D)`` over keys/values ``(B, M, D)``: logits are (B, h, N, M)."""

    def __init__(self, *, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim // heads, dropout
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, *, key_mask: Tensor | None = None,
                key_scale: Tensor | None = None, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        B, N, D = x.shape
        M, h, dh = context.shape[1], self.heads, self.dim_head
        q = self.to_q(x).view(B, N, h, dh).transpose(1, 2)  # (B, h, N, dh)
        k, v = self.to_kv(context).view(B, M, 2, h, dh).permute(2, 0, 3, 1, 4)  # 2 x (B, h, M, dh)
        if key_scale is not None:  # 1/delta per key: q.(k/delta) == (q.k)/delta
            k = k * key_scale.reshape(-1, 1, M, 1).to(k.dtype)  # scale (M,) or (B, M) -> (1|B, 1, M, 1)
        mask = None if key_mask is None else key_mask.reshape(B, 1, 1, M)  # True = attend
        p = self.dropout if self.training else 0.0
        attn = None
        if return_attention:
            logits = (q @ k.transpose(-1, -2)) * dh**-0.5  # (B, h, N, M)
            if mask is not None:
                logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
            attn = logits.softmax(dim=-1)  # (B, h, N, M)
            out = F.dropout(attn, p, self.training) @ v  # (B, h, N, dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, N, dh)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.to_out(out), attn


class Block(nn.Module):
    """Pre-norm attention + MLP; cross-attention when a context is given, self-attention otherwise."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float, dropout: float, cross: bool):
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.attn = Attention(dim=dim, heads=heads, dropout=dropout)
        hidden = int(round(dim * mlp_ratio))
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_mask: Tensor | None = None,
                key_scale: Tensor | None = None, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        q = self.norm_x(x)  # (B, N, D)
        kv = q if self.norm_context is None else self.norm_context(context)  # (B, M, D)
        a, attn = self.attn(q, kv, key_mask=key_mask, key_scale=key_scale, return_attention=return_attention)
        x = x + a
        x = x + self.mlp(self.norm_mlp(x))
        return x, attn


class MultimodalLatentConnector(nn.Module):
    """N latents: one cross-attention over the M-token sequence, then L self-attention blocks. -> (B, N, D)."""

    def __init__(self, *, dim: int, num_latents: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)  # (N, D)
        self.cross = Block(dim=dim, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, cross=True)
        self.layers = nn.ModuleList(Block(dim=dim, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, cross=False)
                                    for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, context: Tensor, *, key_mask: Tensor | None = None, key_scale: Tensor | None = None,
                return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``context`` (B, M, D); ``key_mask`` (B, M) True = real; ``key_scale`` (M,) or (B, M) = 1/delta per key.

        With ``return_attention`` also returns the cross-attention weights ``(B, h, N, M)``.
        """
        B = context.shape[0]
        x = self.latents.expand(B, -1, -1)  # (B, N, D)
        x, attn = self.cross(x, context, key_mask=key_mask, key_scale=key_scale, return_attention=return_attention)
        for layer in self.layers:
            x, _ = layer(x)  # (B, N, D)
        x = self.norm_out(x)
        return (x, attn) if return_attention else x


# ----------------------------------------------------------------------------------------------------------
# the public module


class MultimodalConditioner(nn.Module):
    """Caption states + modality code grids -> ``(B, N, D_text)`` conditioning latents for the denoiser.

    Example::

        cond = MultimodalConditioner(config=ConditionerConfig())
        z = cond(states, mask, {"depth": depth_codes, "segmentation": None, "edges": edge_codes},
                 drop={"depth": torch.tensor([False, True])}, temperatures={"depth": 0.5})  # (B, 128, 384)
    """

    def __init__(self, *, config: ConditionerConfig):
        super().__init__()
        self.config = config
        self.modalities: tuple[str, ...] = tuple(config.modalities)
        self.tokens = ModalityTokens(modalities=self.modalities, codebook_size=config.codebook_size,
                                     code_dim=config.code_dim, dim=config.text_dim, grid_size=config.grid_size)
        self.connector = MultimodalLatentConnector(dim=config.text_dim, num_latents=config.num_latents,
                                                   depth=config.depth, heads=config.heads,
                                                   mlp_ratio=config.mlp_ratio, dropout=config.dropout)

    @property
    def keys(self) -> tuple[str, ...]:
        """Names a temperature can be given for: ``("text", *modalities)``; index = key segment id."""
        return (TEXT, *self.modalities)

    def key_segments(self, num_text_tokens: int) -> Tensor:
        """Segment id (index into :attr:`keys`) of each of the M keys, ``(M,)`` long."""
        G = self.tokens.tokens_per_modality
        ids = [torch.zeros(num_text_tokens, dtype=torch.long)]
        ids += [torch.full((G,), i + 1, dtype=torch.long) for i in range(len(self.modalities))]
        return torch.cat(ids)

    def attention_share(self, attention: Tensor, num_text_tokens: int) -> dict[str, Tensor]:
        """Cross-attention mass per key name, averaged over heads and latents: ``{name: (B,)}``, sums to 1."""
        seg = self.key_segments(num_text_tokens).to(attention.device)
        mass = attention.mean(dim=(1, 2))  # (B, M)
        return {name: mass[:, seg == i].sum(-1) for i, name in enumerate(self.keys)}

    def load_codebooks(self, tokenizers: dict[str, ModalityTokenizer]) -> None:
        """Initialise the code embeddings from trained tokenizers (same codebook_size and code_dim)."""
        self._check_names(tokenizers, "tokenizers", self.modalities)
        for name, tok in tokenizers.items():
            self.tokens.load_codebook(name, tok.codebook.detach())

    # -- validation ----------------------------------------------------------------------------------------------

    @staticmethod
    def _check_names(given, what: str, known: tuple[str, ...]) -> None:
        for key in given:
            if key not in known:
                raise UnknownModalityError(f"{what}: unknown modality '{key}'; known: {', '.join(known)}")

    def check_inputs(self, text_states: Tensor, text_mask: Tensor | None, codes: dict[str, Tensor | None],
                     drop: dict[str, Tensor] | None, temperatures: dict[str, float] | None) -> None:
        cfg = self.config
        if text_states.dim() != 3 or text_states.shape[-1] != cfg.text_dim:
            raise ConfigError(f"text_states of shape {tuple(text_states.shape)}: expected (B, T, {cfg.text_dim}); "
                              "the text encoder's width must equal ConditionerConfig.text_dim")
        B, T = text_states.shape[:2]
        if text_mask is not None and (text_mask.shape != (B, T) or text_mask.dtype != torch.bool):
            raise ConfigError(f"text_mask of shape {tuple(text_mask.shape)} and dtype {text_mask.dtype}: "
                              f"expected ({B}, {T}) bool, True = real token")
        self._check_names(codes, "codes", self.modalities)
        self._check_names(drop or {}, "drop", self.modalities)
        self._check_names(temperatures or {}, "temperatures", self.keys)
        g = cfg.grid_size
        for name, grid in codes.items():
            if grid is None:
                continue
            if grid.shape != (B, g, g) or torch.is_floating_point(grid) or grid.dtype == torch.bool:
                raise ConfigError(f"codes['{name}'] of shape {tuple(grid.shape)} and dtype {grid.dtype}: "
                                  f"expected ({B}, {g}, {g}) integer code indices")
            if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) >= cfg.codebook_size):
                raise ConfigError(f"codes['{name}'] hold indices outside [0, {cfg.codebook_size}): was the map "
                                  "encoded with a tokenizer of another codebook_size?")
        for name, flags in (drop or {}).items():
            if flags.shape != (B,) or flags.dtype != torch.bool:
                raise ConfigError(f"drop['{name}'] of shape {tuple(flags.shape)} and dtype {flags.dtype}: "
                                  f"expected ({B},) bool, True = replace with the null token")
        for name, value in (temperatures or {}).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"temperatures['{name}'] = {value!r}: a temperature must be a finite number > 0 "
                                  "(1 is neutral; about 0.4 to 10 is useful)")
        if not self.modalities and text_mask is not None and not bool(text_mask.any(dim=1).all()):
            raise ConfigError("a sample has no real text token and the conditioner has no spatial modality: "
                              "nothing to attend to")

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, text_states: Tensor, text_mask: Tensor | None, codes: dict[str, Tensor | None],
                drop: dict[str, Tensor] | None = None, temperatures: dict[str, float] | None = None, *,
                return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``(B, N, D_text)`` latents; with ``return_attention`` also the cross-attention ``(B, h, N, M)``.

        Keys are ordered as :meth:`key_segments` says: the T text tokens, then g*g tokens per modality.
        """
        self.check_inputs(text_states, text_mask, codes, drop, temperatures)
        B, T, _ = text_states.shape
        dtype = self.tokens.null.dtype
        text = text_states.to(dtype) + self.tokens.type_embed[0]  # (B, T, D)
        spatial, segments = self.tokens(codes, drop=drop, batch_size=B)  # (B, P*G, D), (P*G,)
        context = torch.cat([text, spatial], dim=1)  # (B, M, D)
        key_mask = None
        if text_mask is not None and not bool(text_mask.all()):
            ones = torch.ones(B, spatial.shape[1], dtype=torch.bool, device=text_mask.device)
            key_mask = torch.cat([text_mask, ones], dim=1).to(context.device)  # (B, M)
        key_scale = None
        if temperatures and any(float(v) != 1.0 for v in temperatures.values()):
            inv = torch.tensor([1.0 / float((temperatures or {}).get(k, 1.0)) for k in self.keys],
                               dtype=dtype, device=context.device)  # (1+P,)
            seg = torch.cat([torch.zeros(T, dtype=torch.long, device=context.device), segments])  # (M,)
            key_scale = inv[seg]  # (M,)
        return self.connector(context, key_mask=key_mask, key_scale=key_scale, return_attention=return_attention)

    # -- persistence ---------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_component(directory, kind="MultimodalConditioner", config=self.config, module=self)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MultimodalConditioner:
        model = cls(config=load_config(directory, kind="MultimodalConditioner", config_cls=ConditionerConfig))
        load_weights(directory, model)
        return model.eval()
