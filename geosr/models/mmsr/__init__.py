"""MMSR conditioning stack (arXiv 2503.14503, "The Power of Context").

Data flow: modality map (depth, segmentation, edges) --tokenizer--> 16x16 discrete codes
--ModalityTokens--> tokens of the text width --+
caption --TextEncoder--> token states ---------+--> MultimodalLatentConnector --> (B, N, D) latents

Light on purpose: the submodules import only torch; the MiniLM text encoder imports its package lazily.
"""

from __future__ import annotations

from .connector import (
    ConditionerConfig,
    ModalityTokens,
    MultimodalConditioner,
    MultimodalLatentConnector,
    UnknownModalityError,
)
from .text import HashTextConfig, HashTextEncoder, MiniLMTextEncoder, TextEncoder
from .tokenizer import ModalityTokenizer, TokenizerConfig, TokenizerOutput, train_tokenizer

__all__ = [
    "ConditionerConfig",
    "HashTextConfig",
    "HashTextEncoder",
    "MiniLMTextEncoder",
    "ModalityTokenizer",
    "ModalityTokens",
    "MultimodalConditioner",
    "MultimodalLatentConnector",
    "TextEncoder",
    "TokenizerConfig",
    "TokenizerOutput",
    "UnknownModalityError",
    "train_tokenizer",
]
