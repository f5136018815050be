"""One trained MMSR model on disk: the pipeline, the modality tokenizers and how conditions are made.

A bundle folder holds::

    mmsr.json           {"format": 1, "config": MMSRConfig, "meta": provenance (training data, steps, ...)}
    pipeline/           MMSRPipeline.save_pretrained (UNet, scheduler, conditioner, text encoder if it saves)
    tokenizers/<name>/  one ModalityTokenizer per modality that geosr can extract from the image

Training writes bundles (``geosr.training``); the ``mmsr`` model of the tiled engine loads them
(:mod:`geosr.models.mmsr.model`). Both make the conditions through the same three methods, so what the model
saw in training is what it sees at inference: :meth:`MMSRBundle.conditions` (image -> maps and caption) and
:meth:`MMSRBundle.encode_maps` (maps -> codes).
Training extracts them from the HR image, inference from the conditioning image (the LR upsampled), as in the
MMSR paper (sec. 3). Depth/height has no extractor: it is missing (null token) unless a caller supplies codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError, WeightsError
from .connector import ConditionerConfig, MultimodalConditioner
from .tokenizer import ModalityTokenizer, TokenizerConfig

log = logging.getLogger(__name__)

FORMAT = 1
INDEX = "mmsr.json"
TEXT_ENCODERS = ("minilm", "hash", "none", "base")
EXTRACTABLE = ("edges", "segmentation")  # modalities computed from the image itself
PRIOR_CACHE_BYTES = 64 * 2**20  # stage-1 outputs kept per bundle, by input tile (sweeps re-run the same tiles)


@dataclass
class MMSRConfig:
    """Architecture of an MMSR model (what ``build_bundle`` makes and a bundle records)."""

    scale: int = 4  # SR factor
    tile: int = 64  # LR tile side the model is trained on and run at (output tile = tile * scale)
    unshuffle: int = 2  # pixel-unshuffle factor of the working space
    residual: bool = True  # diffuse the residual over the conditioning image (see pipeline docstring)
    # the residual is multiplied by this before diffusion (and divided after sampling): a stage-1 residual has a
    # standard deviation of ~0.15 in working units, so at 1 the noise the model must reproduce dwarfs it and every
    # error in that reproduction lands in the image; ~1/std brings it to unit variance
    residual_scale: float = 1.0
    modalities: tuple[str, ...] = ("depth", "segmentation", "edges")  # spatial modalities, in sequence order
    text_encoder: str = "minilm"  # "minilm" (offline all-MiniLM-L6-v2, D=384), "hash" (tests), "none", "base"
    text_dim: int = 384  # D: width of text states, modality tokens and latents
    num_latents: int = 32  # N: latents of the connector
    connector_depth: int = 2  # L: self-attention blocks of the connector
    heads: int = 4  # attention heads of the connector
    codebook_size: int = 256  # K: codes per modality tokenizer
    code_dim: int = 64  # width of a code
    grid_size: int = 16  # code grid side per modality
    map_size: int = 128  # modality maps are resized to this side before tokenizing (tokenizer image_size)
    tokenizer_channels: int = 32  # first conv width of the tokenizers
    unet_channels: tuple[int, ...] = (64, 128)  # UNet block widths; the first block has no attention
    layers_per_block: int = 1  # resnet layers per UNet block
    attention_head_dim: int = 8  # channels per head in the UNet's cross-attention
    num_train_timesteps: int = 1000  # diffusion steps of the training schedule
    prediction_type: str = "v_prediction"  # "epsilon" or "v_prediction"
    beta_schedule: str = "linear"  # DDPM beta schedule of the scheduler
    # a Stable Diffusion 2 folder or Hugging Face id: latent space with its VAE, its UNet (conv_in widened,
    # zero-initialised) and, with text_encoder "base", its CLIP text encoder (text_dim must then be its width,
    # 1024 for SD2). unshuffle and the UNet sizes above are then unused. None: pixel space, a fresh UNet.
    base: str | None = None
    # stage-1 prior: a geosr model (see `geosr models`, e.g. "rrdn-gan") whose output is the conditioning image
    # instead of bicubic(LR), in training and inference alike; with ``residual`` the diffusion learns the detail
    # over it. None: bicubic.
    prior: str | None = None

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.unet_channels = tuple(self.unet_channels)
        if self.text_encoder not in TEXT_ENCODERS:
            raise ConfigError(f"text_encoder={self.text_encoder!r}: choose one of {', '.join(TEXT_ENCODERS)}")
        if self.text_encoder == "base" and not self.base:
            raise ConfigError("text_encoder='base' needs base: a Stable Diffusion 2 folder or Hugging Face id")
        if self.text_encoder == "minilm" and self.text_dim != 384:
            raise ConfigError(f"text_dim={self.text_dim}: the MiniLM text encoder gives 384-wide states")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type={self.prediction_type!r}: choose epsilon or v_prediction")
        multiple = self.unshuffle * 2 ** (len(self.unet_channels) - 1)
        if not self.base and (self.tile * self.scale) % multiple:
            raise ConfigError(f"tile={self.tile}: tile x scale must be divisible by {multiple} (unshuffle x UNet "
                              "downsampling)")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> MMSRConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown MMSR model settings {unknown}; known: {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------
# building blocks


def _tokenizer_config(cfg: MMSRConfig, modality: str) -> TokenizerConfig:
    from ...conditioning import CLASSES

    classes = {"num_classes": len(CLASSES)} if modality == "segmentation" else {"in_channels": 1}
    return TokenizerConfig(image_size=cfg.map_size, grid_size=cfg.grid_size, base_channels=cfg.tokenizer_channels,
                           max_channels=4 * cfg.tokenizer_channels, codebook_size=cfg.codebook_size,
                           code_dim=cfg.code_dim, **classes)


def _unet(cfg: MMSRConfig):
    from diffusers import UNet2DConditionModel

    work = 3 * cfg.unshuffle ** 2
    n = len(cfg.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    groups = math.gcd(32, *cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.tile * cfg.scale // cfg.unshuffle, in_channels=2 * work, out_channels=work,
        layers_per_block=cfg.layers_per_block, block_out_channels=cfg.unet_channels, down_block_types=down,
        up_block_types=up, cross_attention_dim=cfg.text_dim, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=groups)


def _scheduler(cfg: MMSRConfig):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, timestep_spacing="trailing", clip_sample=False)


def _local(name_or_path: str) -> bool:
    """Load only local files unless ``name_or_path`` is not a local folder (then it is a Hub id: allow downloads)."""
    return Path(name_or_path).exists()


def _from_base(cfg: MMSRConfig):
    """``(unet, vae)`` of the Stable Diffusion base: the VAE as is, the UNet with zero-initialised extra inputs."""
    from diffusers import AutoencoderKL

    from .sd2 import unet_from_sd2

    local = _local(cfg.base)
    try:
        vae = AutoencoderKL.from_pretrained(cfg.base, subfolder="vae", local_files_only=local, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise WeightsError(f"base={cfg.base}: cannot load its VAE from vae/ ({str(err).splitlines()[0]})") from err
    unet = unet_from_sd2(cfg.base, extra_in_channels=vae.config.latent_channels, local_files_only=local)
    return unet, vae.requires_grad_(False)


def _text_encoder(cfg: MMSRConfig, *, device: str = "cpu"):
    from .text import CLIPTextEncoder, HashTextConfig, HashTextEncoder, MiniLMTextEncoder

    if cfg.text_encoder == "base":
        return CLIPTextEncoder(cfg.base, device=device, local_files_only=_local(cfg.base))
    if cfg.text_encoder == "minilm":
        return MiniLMTextEncoder(device=device)
    if cfg.text_encoder == "hash":
        return HashTextEncoder(config=HashTextConfig(dim=cfg.text_dim))
    return None


@dataclass
class MMSRBundle:
    """A pipeline with the tokenizers and condition extractors it was trained with."""

    config: MMSRConfig
    pipeline: object  # MMSRPipeline
    tokenizers: dict[str, ModalityTokenizer]
    meta: dict = field(default_factory=dict)
    stage1: object = field(default=None, init=False, repr=False)  # the prior's SRModel, loaded on first use
    # stage-1 outputs by LR tile content, most recent last (guidance or temperature sweeps and ablations run the
    # same tiles again, and the prior costs more than a few diffusion steps); at most PRIOR_CACHE_BYTES
    _prior_cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _prior_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    # -- conditions ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def condition_image(self, lr: Tensor) -> Tensor:
        """``lr (B, 3, h, w)`` in [0, 1] -> the conditioning image ``(B, 3, h*s, w*s)`` in [0, 1]: the stage-1
        prior's output (``config.prior``), else the pipeline's bicubic."""
        if self.config.prior is None:
            return self.pipeline.condition_image(lr)
        arrays = lr.detach().float().clamp(0, 1).cpu().numpy()
        out = np.stack([self._prior_output(np.ascontiguousarray(a)) for a in arrays])  # (B, 3, H, W)
        return torch.from_numpy(out).to(lr.device)

    def _prior_output(self, lr: np.ndarray) -> np.ndarray:
        """The stage-1 prior's output for one LR tile ``(3, h, w)``, clipped to [0, 1]; cached by content."""
        key = (lr.shape, hashlib.blake2b(lr.tobytes(), digest_size=16).digest())
        with self._prior_lock:
            hit = self._prior_cache.get(key)
            if hit is not None:
                self._prior_cache.move_to_end(key)
                return hit
        out = np.clip(self._stage1().upscale(lr, self.config.scale), 0, 1).astype(np.float32)
        out.setflags(write=False)
        with self._prior_lock:
            self._prior_cache[key] = out
            while sum(v.nbytes for v in self._prior_cache.values()) > PRIOR_CACHE_BYTES and len(self._prior_cache) > 1:
                self._prior_cache.popitem(last=False)
        return out

    def _stage1(self):
        if self.stage1 is None:
            from .. import get_model

            prior = get_model(self.config.prior)
            if prior.reads_geodata or self.config.prior == "mmsr":
                raise ConfigError(f"prior={self.config.prior!r}: a stage-1 prior must be a plain SR model")
            prior.check_scale(self.config.scale)
            prior.prepare()
            self.stage1 = prior
        return self.stage1

    @staticmethod
    def _numpy(images: Tensor) -> np.ndarray:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ConfigError(f"images of shape {tuple(images.shape)}: expected (B, 3, H, W) in [0, 1]")
        return images.detach().float().cpu().numpy()

    def conditions(self, images: Tensor, *, segmentation: np.ndarray | None = None
                   ) -> tuple[dict[str, Tensor], list[str]]:
        """``(B, 3, H, W)`` in [0, 1] -> (tokenizer inputs, captions), each map extracted once per image.

        Maps are resized to ``map_size``: edges ``(B, 1, S, S)`` float (edge density after area resizing),
        segmentation ``(B, S, S)`` long (nearest); only the modalities the model has. Captions describe each
        image's own segmentation and edges (no GSD: usually unknown in training data). ``segmentation``
        ``(B, H, W)`` (classes of :data:`~geosr.conditioning.CLASSES`, e.g. the user's land cover put into them)
        replaces the heuristic's.
        """
        from ...conditioning import canny_edges, describe, heuristic_segmentation

        arrays, size = self._numpy(images), self.config.map_size
        edges = np.stack([canny_edges(a) for a in arrays])  # (B, H, W)
        if segmentation is None:
            seg = np.stack([heuristic_segmentation(a) for a in arrays])  # (B, H, W)
        else:
            seg = np.asarray(segmentation, dtype=np.int64)
            if seg.shape != edges.shape:
                raise ConfigError(f"segmentation of shape {seg.shape}: expected {edges.shape}, the images' grid")
        captions = [describe(s, edges=e) for s, e in zip(seg, edges)]
        maps: dict[str, Tensor] = {}
        if "edges" in self.tokenizers:
            maps["edges"] = F.interpolate(torch.from_numpy(edges)[:, None], size=(size, size), mode="area")
        if "segmentation" in self.tokenizers:
            grid = F.interpolate(torch.from_numpy(seg)[:, None].float(), size=(size, size), mode="nearest")
            maps["segmentation"] = grid[:, 0].long()
        return maps, captions

    def modality_maps(self, images: Tensor) -> dict[str, Tensor]:
        """The tokenizer inputs of :meth:`conditions`."""
        return self.conditions(images)[0]

    def captions(self, images: Tensor) -> list[str]:
        """The captions of :meth:`conditions`."""
        return self.conditions(images)[1]

    @torch.no_grad()
    def encode_maps(self, maps: dict[str, Tensor]) -> dict[str, Tensor | None]:
        """Maps -> ``{modality: (B, g, g) long codes or None}`` for every modality of the conditioner."""
        codes: dict[str, Tensor | None] = {m: None for m in self.config.modalities}
        for name, value in maps.items():
            if name not in self.tokenizers:
                raise ConfigError(f"no tokenizer for modality '{name}'; this model has {sorted(self.tokenizers)}")
            tok = self.tokenizers[name]
            codes[name] = tok.encode(value.to(tok.codebook.device))
        return codes

    def set_tokenizer(self, name: str, tokenizer: ModalityTokenizer) -> None:
        """Use a (trained) tokenizer for ``name`` and initialise the conditioner's code table from its codebook."""
        if name not in self.tokenizers:
            raise ConfigError(f"no modality '{name}' to set a tokenizer for; this model has {sorted(self.tokenizers)}")
        tokenizer.eval().requires_grad_(False)
        self.tokenizers[name] = tokenizer
        self.pipeline.conditioner.tokens.load_codebook(name, tokenizer.codebook.detach().to(
            self.pipeline.conditioner.tokens.null.device))

    def to(self, device) -> MMSRBundle:
        self.pipeline.to(device)
        for tok in self.tokenizers.values():
            tok.to(device)
        return self

    # -- persistence ---------------------------------------------------------------------------------------------

    def save(self, directory: str | Path, *, half: bool = False) -> Path:
        """Write the bundle folder; ``half`` stores float weights as float16 (half the size; loading casts them
        back to the models' float32)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.pipeline.save_pretrained(directory / "pipeline")
        for name, tok in self.tokenizers.items():
            tok.save_pretrained(directory / "tokenizers" / name)
        if half:
            from safetensors.torch import load_file, save_file

            for path in sorted(directory.rglob("*.safetensors")):
                state = load_file(path)
                save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
        digest = hashlib.sha256()
        for path in sorted(directory.rglob("*.safetensors")):
            digest.update(path.relative_to(directory).as_posix().encode())
            digest.update(path.read_bytes())
        self.meta["sha256"] = digest.hexdigest()  # of every weights file: the checkpoint's provenance
        index = {"format": FORMAT, "config": self.config.to_dict(), "meta": self.meta}
        (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu") -> MMSRBundle:
        """Load a bundle folder (nothing is downloaded; see :func:`resolve_checkpoint` for Hub ids)."""
        from .pipeline import MMSRPipeline

        directory = Path(directory)
        path = directory / INDEX
        if not path.is_file():
            raise WeightsError(f"{directory}: not an MMSR checkpoint (no {INDEX}); train one with `geosr train`")
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT:
            raise WeightsError(f"{path}: format {index.get('format')!r}, this geosr reads format {FORMAT}")
        cfg = MMSRConfig.from_dict(index["config"])
        extra = {} if cfg.text_encoder == "hash" else {"text_encoder": _text_encoder(cfg, device=device)}
        if extra.get("text_encoder") is None:
            extra.pop("text_encoder", None)
        pipe = MMSRPipeline.from_pretrained(directory / "pipeline", **extra)
        tokenizers = {m: ModalityTokenizer.from_pretrained(directory / "tokenizers" / m)
                      for m in cfg.modalities if m in EXTRACTABLE}
        bundle = cls(config=cfg, pipeline=pipe, tokenizers=tokenizers, meta=index.get("meta", {}))
        for tok in tokenizers.values():
            tok.requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)
        return bundle.to(device)


def build_bundle(config: MMSRConfig, *, seed: int = 0, device: str = "cpu") -> MMSRBundle:
    """A fresh, randomly initialised model (tokenizers untrained) for ``config``."""
    from .pipeline import MMSRPipeline

    torch.manual_seed(seed)
    tokenizers = {m: ModalityTokenizer(config=_tokenizer_config(config, m)) for m in config.modalities
                  if m in EXTRACTABLE}
    conditioner = MultimodalConditioner(config=ConditionerConfig(
        modalities=config.modalities, text_dim=config.text_dim, num_latents=config.num_latents,
        depth=config.connector_depth, heads=config.heads, codebook_size=config.codebook_size,
        code_dim=config.code_dim, grid_size=config.grid_size))
    unet, vae = _from_base(config) if config.base else (_unet(config), None)
    pipe = MMSRPipeline(unet=unet, vae=vae, scheduler=_scheduler(config), conditioner=conditioner,
                        text_encoder=_text_encoder(config, device=device), scale=config.scale,
                        unshuffle=config.unshuffle, residual=config.residual,
                        residual_scale=config.residual_scale)
    pipe.set_progress_bar_config(disable=True)
    return MMSRBundle(config=config, pipeline=pipe, tokenizers=tokenizers).to(device)


def resolve_checkpoint(name_or_path: str | Path, *, local_files_only: bool = False) -> Path:
    """A local bundle folder as is; an ``owner/name`` Hugging Face id downloaded (only then) to the HF cache."""
    path = Path(name_or_path)
    if path.exists():
        return path
    text = str(name_or_path)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise WeightsError(f"--checkpoint {text}: no such folder (give a folder written by `geosr train`, or a "
                           "Hugging Face id owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise WeightsError(f"--checkpoint {text}: loading from the Hub needs huggingface_hub ({err})") from err
    try:
        return Path(snapshot_download(repo_id=text, local_files_only=local_files_only))
    except Exception as err:  # offline, unknown repo, ...: one line naming the id
        raise WeightsError(f"--checkpoint {text}: cannot get it from the Hugging Face Hub "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
