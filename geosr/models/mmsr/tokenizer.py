"""Spatial modality tokenizer: a VQGAN-style autoencoder that turns a modality map into a grid of codes.

A depth/height map, an edge map or a segmentation map ``(B, C_m, H, W)`` goes through a conv encoder that
halves the resolution ``log2(image_size / grid_size)`` times, then a vector quantizer snaps every cell to
its nearest codebook entry: the result is a ``(B, grid_size, grid_size)`` LongTensor of code indices,
16x16 by default. The decoder mirrors the encoder and exists only to train the codebook (reconstruction
loss); the conditioner needs :meth:`ModalityTokenizer.encode` alone.

Segmentation is fed as **class indices** ``(B, H, W)`` or ``(B, 1, H, W)`` (integer dtype) and one-hot
encoded inside (``num_classes`` channels); an index outside ``[0, num_classes)`` (nodata) becomes an
all-zero vector and is ignored by the loss. A float ``(B, num_classes, H, W)`` tensor of one-hot or soft
class probabilities is accepted as is. Its decoder returns class logits.

Training objective (van den Oord et al. 2017, Esser et al. 2021 without the GAN and perceptual terms):
``recon + ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2`` with the straight-through estimator
``z_q = z_e + sg[e - z_e]`` carrying the decoder's gradient to the encoder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

C = TypeVar("C")


# ----------------------------------------------------------------------------------------------------------
# config JSON + safetensors, shared by every component of this package


def save_component(directory: str | Path, *, kind: str, config: Any, module: nn.Module) -> Path:
    """Write ``config.json`` (the dataclass, tagged with ``kind``) and ``model.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"_kind": kind, **dataclasses.asdict(config)}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"kind": kind})
    log.info("saved %s to %s", kind, directory)
    return directory


def load_config(directory: str | Path, *, kind: str, config_cls: type[C]) -> C:
    """Read ``config.json`` written by :func:`save_component`; JSON lists become tuples where the field is one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise WeightsError(f"no {CONFIG_NAME} in {directory}: save the {kind} there with save_pretrained() first")
    payload = json.loads(path.read_text())
    found = payload.pop("_kind", None)
    if found != kind:
        raise WeightsError(f"{path} holds a '{found}', not a '{kind}': point from_pretrained at the right folder")
    names = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(payload) - set(names))
    if unknown:
        raise WeightsError(f"{path}: unknown config keys {unknown}; it was written by another version of geosr")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in payload.items()}
    return config_cls(**values)


def load_weights(directory: str | Path, module: nn.Module) -> None:
    """Load ``model.safetensors`` strictly into ``module`` (every key present, none extra)."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise WeightsError(f"no {WEIGHTS_NAME} in {directory}: save the model there with save_pretrained() first")
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ----------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    in_channels: int = 1  # channels of a continuous map (1 for depth/height and edges); unused if num_classes is set
    num_classes: int | None = None  # segmentation: number of classes of the index map, one-hot encoded inside
    image_size: int = 256  # side of the square input map (H == W); must be grid_size * 2**k
    grid_size: int = 16  # side of the code grid that encode() returns
    base_channels: int = 64  # width of the first conv stage; doubles at every downsampling
    max_channels: int = 256  # cap on a stage's width
    num_res_blocks: int = 1  # residual blocks per resolution stage
    codebook_size: int = 1024  # K, number of codebook entries
    code_dim: int = 256  # width of a codebook entry
    commitment_beta: float = 0.25  # weight of the commitment loss ||z_e - sg[e]||^2

    def __post_init__(self) -> None:
        ratio = self.image_size / self.grid_size
        if self.grid_size < 1 or ratio < 1 or not float(ratio).is_integer() or int(ratio) & (int(ratio) - 1):
            raise ConfigError(f"image_size={self.image_size}, grid_size={self.grid_size}: image_size must be "
                              "grid_size times a power of two (e.g. 256 and 16)")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"num_classes={self.num_classes}: a segmentation map needs at least 2 classes")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ConfigError(f"codebook_size={self.codebook_size}, code_dim={self.code_dim}: both must be positive "
                              "and the codebook needs at least 2 entries")

    @property
    def channels(self) -> int:
        """Channels the encoder sees and the decoder produces."""
        return self.num_classes if self.num_classes is not None else self.in_channels

    @property
    def num_downsamples(self) -> int:
        return int(math.log2(self.image_size // self.grid_size))


@dataclass
class TokenizerOutput:
    recon: Tensor  # (B, C, H, W) reconstruction; class logits for segmentation
    codes: Tensor  # (B, g, g) long code indices
    loss: Tensor  # () recon_loss + codebook_loss + commitment_loss, the training objective
    recon_loss: Tensor  # () L1 for continuous maps, cross-entropy for segmentation
    codebook_loss: Tensor  # () ||sg[z_e] - e||^2, moves the codebook towards the encoder
    commitment_loss: Tensor  # () beta * ||z_e - sg[e]||^2, keeps the encoder near the codebook


def _groups(channels: int, limit: int = 32) -> int:
    return math.gcd(channels, limit)


class ResBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, code_dim, g, g), halving the resolution ``num_downsamples`` times."""

    def __init__(self, *, config: TokenizerConfig):
        super().__init__()
        widths = [min(config.base_channels * 2**i, config.max_channels) for i in range(config.num_downsamples + 1)]
        self.conv_in = nn.Conv2d(config.channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(config.num_downsamples):
            for j in range(config.num_res_blocks):
                layers.append(ResBlock(in_channels=widths[i], out_channels=widths[i]))
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1))  # downsample x2
        layers.append(ResBlock(in_channels=widths[-1], out_channels=widths[-1]))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(widths[-1]), widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.code_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self.conv_in(x))  # (B, W_last, g, g)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, code_dim, g, g)


class Decoder(nn.Module):
    """(B, code_dim, g, g) -> (B, C, H, W); used only to train the codebook."""

    def __init__(self, *, config: TokenizerConfig):
        super().__init__()
        widths = [min(config.base_channels * 2**i, config.max_channels) for i in range(config.num_downsamples + 1)]
        self.conv_in = nn.Conv2d(config.code_dim, widths[-1], 3, padding=1)
        layers: list[nn.Module] = [ResBlock(in_channels=widths[-1], out_channels=widths[-1])]
        for i in reversed(range(config.num_downsamples)):
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1))
            for j in range(config.num_res_blocks):
                layers.append(ResBlock(in_channels=widths[i], out_channels=widths[i]))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(widths[0]), widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.body(self.conv_in(z))  # (B, W_0, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer with the straight-through estimator."""

    def __init__(self, *, codebook_size: int, code_dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(codebook_size, code_dim)  # (K, D)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: Tensor) -> Tensor:
        """(B, D, g, g) -> (B, g, g) index of the closest entry (squared L2)."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*g*g, D)
        e = self.codebook.weight  # (K, D)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]  # (B*g*g, K)
        return dist.argmin(dim=1).view(B, h, w)

    def lookup(self, codes: Tensor) -> Tensor:
        """(B, g, g) long -> (B, D, g, g) codebook vectors."""
        return self.codebook(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        codes = self.nearest(z)  # (B, g, g)
        z_q = self.lookup(codes)  # (B, D, g, g)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = self.beta * F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()  # straight-through: forward value z_q, gradient of identity to z
        return z_st, codes, codebook_loss, commitment_loss


class ModalityTokenizer(nn.Module):
    """VQ autoencoder for one spatial modality: ``encode`` gives codes, ``decode`` maps them back.

    Example::

        tok = ModalityTokenizer(config=TokenizerConfig(image_size=256))
        codes = tok.encode(depth)  # (B, 1, 256, 256) float -> (B, 16, 16) long
    """

    def __init__(self, *, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config=config)
        self.quantizer = VectorQuantizer(codebook_size=config.codebook_size, code_dim=config.code_dim,
                                         beta=config.commitment_beta)
        self.decoder = Decoder(config=config)

    @property
    def codebook(self) -> Tensor:
        """(K, code_dim) codebook, e.g. to initialise the conditioner's code embedding."""
        return self.quantizer.codebook.weight

    # -- input handling ----------------------------------------------------------------------------------------

    def _prepare(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Check the map and return ``(encoder input (B, C, H, W) float, class targets (B, H, W) or None)``."""
        cfg = self.config
        size = cfg.image_size
        target = None
        if cfg.num_classes is not None and not torch.is_floating_point(x):
            if x.dim() == 4 and x.shape[1] == 1:
                x = x[:, 0]
            if x.dim() != 3:
                raise ConfigError(f"segmentation map of shape {tuple(x.shape)}: pass class indices (B, H, W) "
                                  f"or (B, 1, H, W), or float probabilities (B, {cfg.num_classes}, H, W)")
            valid = (x >= 0) & (x < cfg.num_classes)
            target = torch.where(valid, x.long(), torch.full_like(x, -100, dtype=torch.long))  # (B, H, W)
            onehot = F.one_hot(target.clamp(min=0), cfg.num_classes).permute(0, 3, 1, 2)  # (B, K_cls, H, W)
            x = onehot.to(self.codebook.dtype) * valid[:, None]
        if x.dim() != 4 or x.shape[1] != cfg.channels or x.shape[2] != size or x.shape[3] != size:
            raise ConfigError(f"modality map of shape {tuple(x.shape)}: this tokenizer expects "
                              f"(B, {cfg.channels}, {size}, {size}); resize the map or build the tokenizer "
                              "with a matching TokenizerConfig(in_channels=..., num_classes=..., image_size=...)")
        return x.to(self.codebook.dtype), target

    # -- public API ----------------------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Modality map -> code indices ``(B, grid_size, grid_size)`` long."""
        x, _ = self._prepare(x)
        return self.quantizer.nearest(self.encoder(x))

    def decode(self, codes: Tensor) -> Tensor:
        """Code indices ``(B, g, g)`` -> map ``(B, C, H, W)`` (class logits for segmentation)."""
        g = self.config.grid_size
        if codes.dim() != 3 or codes.shape[1:] != (g, g) or torch.is_floating_point(codes):
            raise ConfigError(f"codes of shape {tuple(codes.shape)} and dtype {codes.dtype}: expected "
                              f"(B, {g}, {g}) integer indices")
        return self.decoder(self.quantizer.lookup(codes.long()))

    def forward(self, x: Tensor) -> TokenizerOutput:
        inputs, target = self._prepare(x)
        z = self.encoder(inputs)  # (B, D, g, g)
        z_q, codes, codebook_loss, commitment_loss = self.quantizer(z)
        recon = self.decoder(z_q)  # (B, C, H, W)
        if self.config.num_classes is None:
            recon_loss = F.l1_loss(recon, inputs)
        elif target is not None:
            recon_loss = F.cross_entropy(recon, target, ignore_index=-100)
        else:  # float class probabilities: soft-target cross-entropy
            recon_loss = -(inputs * F.log_softmax(recon, dim=1)).sum(1).mean()
        loss = recon_loss + codebook_loss + commitment_loss
        return TokenizerOutput(recon=recon, codes=codes, loss=loss, recon_loss=recon_loss,
                               codebook_loss=codebook_loss, commitment_loss=commitment_loss)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_component(directory, kind="ModalityTokenizer", config=self.config, module=self)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ModalityTokenizer:
        model = cls(config=load_config(directory, kind="ModalityTokenizer", config_cls=TokenizerConfig))
        load_weights(directory, model)
        return model.eval()


def train_tokenizer(maps: Iterable[Tensor], *, config: TokenizerConfig, steps: int, lr: float = 2e-4,
                    seed: int = 0, device: str = "cpu",
                    progress: Callable[[int, int, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    ) -> tuple[ModalityTokenizer, dict[str, list[float]]]:
    """Train a fresh tokenizer for ``steps`` Adam steps on batches of modality maps.

    ``maps`` yields batches ``(B, C, H, W)`` (or class-index maps for segmentation); it is iterated again
    from the start when exhausted, so a list of a few batches is enough. Returns the model in eval mode and
    the per-step losses ``{"loss", "recon", "codebook", "commitment"}``.
    """
    if steps < 1:
        raise ConfigError(f"steps={steps}: train for at least one step")
    torch.manual_seed(seed)
    model = ModalityTokenizer(config=config).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    history: dict[str, list[float]] = {"loss": [], "recon": [], "codebook": [], "commitment": []}
    it = iter(maps)
    for step in range(steps):
        if should_stop is not None and should_stop():
            log.info("tokenizer training stopped at step %d of %d", step, steps)
            break
        try:
            batch = next(it)
        except StopIteration:
            it = iter(maps)
            try:
                batch = next(it)
            except StopIteration:
                raise ConfigError(f"train_tokenizer: 'maps' ran out after {step} steps and cannot be iterated "
                                  "again (a generator?); pass a list or another re-iterable collection") from None
        out = model(batch.to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        for key, value in (("loss", out.loss), ("recon", out.recon_loss), ("codebook", out.codebook_loss),
                           ("commitment", out.commitment_loss)):
            history[key].append(float(value.detach()))
        if progress is not None:
            progress(step + 1, steps, f"recon {history['recon'][-1]:.4f}")
    log.info("trained tokenizer for %d steps: recon %.4f -> %.4f", len(history["recon"]),
             history["recon"][0] if history["recon"] else float("nan"),
             history["recon"][-1] if history["recon"] else float("nan"))
    return model.eval(), history
