"""Training an MMSR bundle: tokenizers first, then the conditioner and the UNet (``train``).

Stage 1
    Each extractable modality's VQ tokenizer (edges, segmentation) is trained with
    :func:`~geosr.models.mmsr.tokenizer.train_tokenizer` on modality maps of HR crops (a pool of at most
    ``TOKENIZER_POOL`` batches, shared by the tokenizers), then frozen and installed with
    :meth:`MMSRBundle.set_tokenizer` (which also initialises the conditioner's code table from its codebook).
    Checkpoint ``step-000000`` follows, so a resumed run never retrains them.
Stage 2
    Per step: HR crops -> :func:`~geosr.training.degrade.degrade` -> LR; ``cond = condition_image(LR)``,
    ``x0 = encode_target(HR, cond)``; modalities and captions from the HR crop (MMSR sec. 3); random t and noise,
    ``scheduler.add_noise``; the UNet reads ``concat(noisy, to_working(2*cond - 1))`` through the pipeline's own
    :func:`guided_denoiser` (unguided: one branch); MSE against the noise or the velocity, as the scheduler's
    ``prediction_type`` says. Conditions are dropped as the guidance modes need (:func:`draw_drop_flags`).
    AdamW with linear warm-up, gradient clipping, an EMA of the trained weights (the EMA is what is saved as the
    model). The text encoder and the tokenizers stay frozen.

Output folder::

    train_log.jsonl                 one JSON line per log_every steps: step, loss, lr, samples_per_s, seconds
    checkpoints/step-XXXXXX/        an MMSR bundle (EMA weights; MMSRBundle.load reads it) + training/:
        training/model.safetensors  raw trained weights ("unet.*", "conditioner.*")
        training/ema.safetensors    EMA weights
        training/rng.safetensors    torch RNG states (global CPU, CUDA, the training generator)
        training/optimizer.pt       AdamW state: torch.save, read back only with torch.load(weights_only=True)
        training/state.json         step, seconds, numpy/python RNG states, data sampler, degradation generator
    final/                          the EMA bundle, meta = steps, data, seconds, final loss, config

Resuming (``resume=True``) restores all of that from the newest checkpoint, so N steps in one run and N/2 +
N/2 resumed give bit-identical weights on the same device and thread count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import data_dir
from ..errors import ConfigError
from ..models.mmsr.bundle import MMSRBundle, MMSRConfig, build_bundle
from ..models.mmsr.pipeline import MultimodalGuider, guided_denoiser
from .data import CropSampler
from .degrade import DegradationConfig, degrade_batch

log = logging.getLogger(__name__)

TOKENIZER_POOL = 64  # at most this many batches of modality maps are extracted for stage 1 (reused cyclically)
CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"
LOG_NAME = "train_log.jsonl"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("no", "fp16", "bf16")
UNGUIDED = MultimodalGuider()  # one branch: guided_denoiser is then exactly the UNet on concat(noisy, cond)


# ----------------------------------------------------------------------------------------------------------
# configuration


def _from_dict(cls, values: dict | None, what: str):
    """``cls(**values)`` with unknown keys refused by name."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values or {}) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} settings {unknown}; known: {known}")
    return cls(**(values or {}))


@dataclass
class TrainConfig:
    """Everything a training run needs; YAML in (:meth:`from_yaml`) and out (:meth:`to_yaml`)."""

    model: MMSRConfig = field(default_factory=MMSRConfig)  # architecture (nested `model:` mapping)
    data: str | None = None  # folder of training images (recursive); None: <data_dir()>/train
    # stored stage-1 pairs (geosr.training.stage1: HR, LR and the prior's output): the diffusion trains on them
    # instead of fresh crops and degradations, so an expensive prior runs once per pair, not once per step
    pairs: str | None = None
    crop: int | None = None  # HR crop side in px; None: model.tile * model.scale
    batch_size: int = 4  # HR crops per step
    steps: int = 1000  # diffusion training steps (stage 2)
    lr: float = 1e-4  # AdamW learning rate after warm-up
    warmup_steps: int = 100  # linear learning-rate warm-up from 0
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    tokenizer_steps: int = 500  # stage 1: Adam steps per modality tokenizer (0: keep them untrained)
    tokenizer_lr: float = 2e-4  # stage 1 learning rate
    p_modality_drop: float = 0.1  # per sample and modality: replace its codes by the null token
    p_text_drop: float = 0.1  # per sample: mask the caption out entirely
    p_uncond: float = 0.1  # per sample: drop every condition together (the cfg guidance branch)
    # few-step training: only the timesteps a sampler of this many steps visits (trailing spacing, as inference
    # uses them); None: every one of the schedule's timesteps. 1 is a one-step model (t = T only)
    timesteps: int | None = None
    # LPIPS (AlexNet v0.1) between the image decoded from the model's x0 estimate and the HR crop, added to the
    # diffusion MSE with this weight; 0: off. With timesteps 1 this trains a one-step model for perception
    lpips_weight: float = 0.0
    ema_decay: float = 0.999  # EMA decay of the trained weights (warmed up as min(decay, (1+n)/(10+n)))
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    log_every: int = 10  # steps between log lines / train_log.jsonl entries
    seed: int = 0  # seeds the model init, the data sampler, the degradations, t, noise and drops
    output: str = "runs/mmsr"  # run folder: checkpoints/, final/, train_log.jsonl
    device: str = "auto"  # "auto" (CUDA if available), "cpu" or "cuda"
    mixed_precision: str = "no"  # accelerate mixed precision: "no", "fp16" or "bf16" (CUDA)
    threads: int | None = None  # torch CPU threads; None: torch's default
    cache_mb: float = 512.0  # LRU cache of decoded training images, MiB
    degradation: DegradationConfig = field(default_factory=DegradationConfig)  # nested `degradation:` mapping

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = MMSRConfig.from_dict(self.model)
        if isinstance(self.degradation, dict):
            self.degradation = _from_dict(DegradationConfig, self.degradation, "degradation")
        m = self.model
        crop = self.hr_crop
        multiple = m.unshuffle * 2 ** (len(m.unet_channels) - 1)
        if crop % m.scale or crop % multiple:
            raise ConfigError(f"crop={crop}: the HR crop must be divisible by scale={m.scale} and by {multiple} "
                              "(unshuffle x UNet downsampling)")
        for name in ("batch_size", "steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.tokenizer_steps < 0 or self.warmup_steps < 0:
            raise ConfigError("tokenizer_steps and warmup_steps must be >= 0")
        if self.timesteps is not None and not 1 <= self.timesteps <= m.num_train_timesteps:
            raise ConfigError(f"timesteps={self.timesteps}: give a step count from 1 to {m.num_train_timesteps}, "
                              "or null for all")
        if self.lpips_weight < 0:
            raise ConfigError(f"lpips_weight={self.lpips_weight}: must be >= 0")
        for name in ("p_modality_drop", "p_text_drop", "p_uncond"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)}: a probability must lie in [0, 1]")
        if not m.modalities and (self.p_text_drop > 0 or self.p_uncond > 0):
            raise ConfigError("a model without spatial modalities cannot drop the caption (nothing left to attend "
                              "to): set p_text_drop and p_uncond to 0")
        if self.pairs is not None and m.prior is None:
            raise ConfigError("pairs: stored stage-1 pairs hold a prior's output: set model.prior to the model that "
                              "made them (e.g. aerial-x4), so that inference conditions on the same image")
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r}: choose one of {', '.join(DEVICES)}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: choose one of {', '.join(PRECISIONS)}")

    @property
    def hr_crop(self) -> int:
        return self.crop if self.crop is not None else self.model.tile * self.model.scale

    @property
    def data_folder(self) -> Path:
        return Path(self.data) if self.data is not None else data_dir() / "train"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = self.model.to_dict()
        d["degradation"] = {k: list(v) if isinstance(v, tuple) else v
                            for k, v in dataclasses.asdict(self.degradation).items()}
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return _from_dict(cls, values, "training")

    @classmethod
    def from_yaml(cls, text: str) -> TrainConfig:
        import yaml

        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError("training config: expected a YAML mapping of settings at the top level")
        return cls.from_dict(raw)


@dataclass
class TrainResult:
    steps: int  # diffusion steps done in total (this run and the runs it resumed)
    final_loss: float  # mean training loss over the last logging window
    seconds: float  # wall-clock training time, resumed runs included
    output: Path  # the run folder
    checkpoint: Path | None  # newest checkpoint written (None: stopped during stage 1)
    final: Path | None  # the final EMA bundle (None when stopped early)
    stopped: bool  # True when should_stop() ended the run


# ----------------------------------------------------------------------------------------------------------
# building blocks


@dataclass
class DropFlags:
    modalities: dict[str, Tensor]  # name -> (B,) bool, True = the modality's codes replaced by its null token
    text: Tensor  # (B,) bool, True = caption masked out entirely (text_mask all False)


def draw_drop_flags(batch: int, modalities: tuple[str, ...], *, p_modality: float, p_text: float, p_uncond: float,
                    generator: torch.Generator | None = None) -> DropFlags:
    """Independent per-sample drops; with ``p_uncond`` every condition of the sample is dropped together.

    Always draws ``(2 + P) * batch`` uniforms, so the generator advances the same whatever the probabilities.
    """
    u = torch.rand(2 + len(modalities), batch, generator=generator)  # (2+P, B)
    uncond = u[0] < p_uncond  # (B,)
    mods = {m: (u[2 + i] < p_modality) | uncond for i, m in enumerate(modalities)}
    return DropFlags(modalities=mods, text=(u[1] < p_text) | uncond)


def estimate_x0(scheduler, noisy: Tensor, pred: Tensor, t: Tensor) -> Tensor:
    """The model's estimate of the clean sample from its output ``pred`` (noise or velocity) at timesteps ``t``."""
    ab = scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, *[1] * (noisy.dim() - 1))  # (B, 1, 1, 1)
    if scheduler.config.prediction_type == "epsilon":
        return (noisy - (1 - ab).sqrt() * pred) / ab.sqrt()
    return ab.sqrt() * noisy - (1 - ab).sqrt() * pred


class EMA:
    """Exponential moving average of a module's state (float tensors averaged, the others copied)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - d)  # d * shadow + (1 - d) * v
            else:
                self.shadow[k].copy_(v)

    @contextmanager
    def applied(self, module: nn.Module):
        """Within the block ``module`` holds the EMA weights; its own weights are restored exactly after."""
        raw = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield module
        finally:
            module.load_state_dict(raw)


class Denoiser(nn.Module):
    """The trained modules in one: conditioner latents, then the UNet exactly as the pipeline calls it."""

    def __init__(self, unet: nn.Module, conditioner: nn.Module):
        super().__init__()
        self.unet, self.conditioner = unet, conditioner

    def forward(self, noisy: Tensor, t: Tensor, cond_w: Tensor, text_states: Tensor, text_mask: Tensor,
                codes: dict[str, Tensor | None], drop: dict[str, Tensor] | None) -> Tensor:
        """``noisy``, ``cond_w`` (B, C, h, w); ``t`` (B,); text (B, T, D) and (B, T) -> prediction (B, C, h, w)."""
        context = self.conditioner(text_states, text_mask, codes, drop=drop)  # (B, N, D)
        return guided_denoiser(self.unet, UNGUIDED, cond_w, context.to(cond_w.dtype))(noisy, t)


@dataclass
class Batch:
    """One training batch, prepared (no gradient) from HR and LR crops."""

    x0: Tensor  # (B, C, h, w) diffusion target in working space (encode_target)
    cond_w: Tensor  # (B, C, h, w) conditioning image in working space, from [-1, 1]
    text_states: Tensor  # (B, T, D) caption states
    text_mask: Tensor  # (B, T) bool, True = real token
    codes: dict[str, Tensor | None]  # modality -> (B, g, g) long codes, None = missing


def checkpoint_dirs(output: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output) / CHECKPOINTS
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def _json_state(state):
    """numpy/python RNG states -> JSON-able (arrays and tuples become lists)."""
    if isinstance(state, dict):
        return {k: _json_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_json_state(v) for v in state]
    return state.tolist() if isinstance(state, np.ndarray) else state


# ----------------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Model, data, optimizer, EMA and every random generator of one run; :func:`train` drives it.

    Example (one step by hand)::

        trainer = Trainer(TrainConfig.from_yaml(text))
        hr, lr = trainer.next_crops()  # (B, 3, H, W), (B, 3, H/s, W/s) in [0, 1]
        loss = trainer.step(trainer.prepare(hr, lr))
    """

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator

        self.config = cfg = config
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA device: use device: cpu (or auto)")
        self.accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
        if self.accelerator.num_processes > 1:
            raise ConfigError(f"launched on {self.accelerator.num_processes} processes: geosr training runs on one "
                              "device (the data sampler is not sharded); launch it without accelerate launch")
        self.device = self.accelerator.device
        self.sampler = CropSampler(cfg.data_folder, crop=cfg.hr_crop, seed=cfg.seed, cache_mb=cfg.cache_mb)
        self.pairs = None
        if cfg.pairs is not None:
            from .stage1 import PairSampler

            self.pairs = PairSampler(cfg.pairs, crop=cfg.hr_crop, scale=cfg.model.scale, seed=cfg.seed)
        self.bundle: MMSRBundle = build_bundle(cfg.model, seed=cfg.seed, device=str(self.device))
        pipe = self.pipeline = self.bundle.pipeline
        if isinstance(pipe.text_encoder, nn.Module):
            pipe.text_encoder.requires_grad_(False).eval()
        self.model = Denoiser(pipe.unet, pipe.conditioner).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.ema = EMA(self.raw_model, cfg.ema_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # t, noise and drop flags
        self.train_timesteps = None  # (n,) the timesteps trained on; None: all
        if cfg.timesteps is not None:
            pipe.scheduler.set_timesteps(cfg.timesteps)
            self.train_timesteps = pipe.scheduler.timesteps.clone()
        self.lpips = None
        if cfg.lpips_weight > 0:
            from ..config import weights_dir
            from ..scoring.lpips import FILENAME, LPIPS

            self.lpips = LPIPS.from_file(weights_dir() / FILENAME, device=self.device).requires_grad_(False).eval()
        self.degrade_rng = np.random.default_rng([cfg.seed, 2])
        self.step_count, self.seconds, self.last_loss = 0, 0.0, float("nan")  # last_loss: last logged window

    @property
    def raw_model(self) -> Denoiser:
        return self.accelerator.unwrap_model(self.model)

    # -- data --------------------------------------------------------------------------------------------------

    def next_crops(self) -> tuple[Tensor, ...]:
        """HR crops ``(B, 3, H, W)`` and their degraded LR ``(B, 3, H/s, W/s)``, both on the training device; with
        stored ``pairs``, also the stored prior output ``(B, 3, H, W)``."""
        if self.pairs is not None:
            return tuple(t.to(self.device) for t in self.pairs.sample(self.config.batch_size))
        hr = self.sampler.sample(self.config.batch_size)  # (B, 3, H, W) CPU
        lr = degrade_batch(hr, scale=self.config.model.scale, config=self.config.degradation, rng=self.degrade_rng)
        return hr.to(self.device), lr.to(self.device)

    @torch.no_grad()
    def prepare(self, hr: Tensor, lr: Tensor, prior: Tensor | None = None) -> Batch:
        """Target, conditioning image, caption states and modality codes, all from the HR/LR pair (and the stored
        prior output, if given)."""
        pipe, bundle = self.pipeline, self.bundle
        # (B, 3, H, W) in [0, 1]: bicubic LR, or the stage-1 prior's output
        cond = bundle.condition_image(lr) if prior is None else prior.clamp(0, 1)
        maps, captions = bundle.conditions(hr)  # from HR in training (MMSR sec. 3)
        states, mask = pipe.encode_text(captions, device=self.device)  # (B, T, D), (B, T)
        codes = {m: None if c is None else c.to(self.device) for m, c in bundle.encode_maps(maps).items()}  # (B, g, g)
        return Batch(x0=pipe.encode_target(hr, cond), cond_w=pipe.to_working(2 * cond - 1), text_states=states,
                     text_mask=mask, codes=codes)

    # -- objective ---------------------------------------------------------------------------------------------

    def draw(self, batch: Batch) -> tuple[Tensor, Tensor, DropFlags]:
        """Random timesteps ``(B,)``, noise like ``x0`` and drop flags, from the run's generator."""
        cfg, B = self.config, batch.x0.shape[0]
        if self.train_timesteps is None:
            t = torch.randint(0, self.pipeline.scheduler.config.num_train_timesteps, (B,), generator=self.generator)
        else:
            t = self.train_timesteps[torch.randint(0, len(self.train_timesteps), (B,), generator=self.generator)]
        noise = torch.randn(batch.x0.shape, generator=self.generator, dtype=batch.x0.dtype)  # (B, C, h, w)
        flags = draw_drop_flags(B, tuple(batch.codes), p_modality=cfg.p_modality_drop, p_text=cfg.p_text_drop,
                                p_uncond=cfg.p_uncond, generator=self.generator)
        return t.to(self.device), noise.to(self.device), flags

    def loss(self, batch: Batch, t: Tensor, noise: Tensor, flags: DropFlags | None = None) -> Tensor:
        """MSE between the model output and the scheduler's target (noise or velocity) at timesteps ``t``."""
        scheduler = self.pipeline.scheduler
        noisy = scheduler.add_noise(batch.x0, noise, t)  # (B, C, h, w)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(batch.x0, noise, t)
        mask, drop = batch.text_mask, None
        if flags is not None:
            mask = mask & ~flags.text.to(mask.device)[:, None]  # (B, T)
            drop = {m: f.to(self.device) for m, f in flags.modalities.items() if batch.codes.get(m) is not None}
        with self.accelerator.autocast():
            pred = self.model(noisy, t, batch.cond_w, batch.text_states, mask, batch.codes, drop)
        loss = F.mse_loss(pred.float(), target.float())
        if self.lpips is not None:
            x0 = estimate_x0(scheduler, noisy, pred.float(), t)  # (B, C, h, w)
            image = self.pipeline.working_image
            loss = loss + self.config.lpips_weight * self.lpips(image(x0, batch.cond_w).clamp(-1, 1),
                                                                image(batch.x0, batch.cond_w)).mean()
        return loss

    def learning_rate(self, step: int) -> float:
        warm = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warm) if warm else self.config.lr

    def step(self, batch: Batch) -> float:
        """One optimizer step (random t, noise and drops) and an EMA update; returns the loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step_count)
        loss = self.loss(batch, *self.draw(batch))
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.ema.update(self.raw_model)
        self.step_count += 1
        return float(loss.detach())

    # -- stage 1 -----------------------------------------------------------------------------------------------

    def train_tokenizers(self, progress=None, should_stop=None) -> bool:
        """Train, freeze and install every extractable modality's tokenizer; False if stopped early."""
        from ..models.mmsr.tokenizer import train_tokenizer

        cfg, names = self.config, sorted(self.bundle.tokenizers)
        if not names or cfg.tokenizer_steps == 0:
            return True
        n = min(cfg.tokenizer_steps, TOKENIZER_POOL)
        log.info("stage 1: extracting %d batches of modality maps for %s", n, ", ".join(names))
        pool = [self.bundle.modality_maps(self.sampler.sample(cfg.batch_size)) for _ in range(n)]
        for i, name in enumerate(names):
            def report(done: int, total: int, message: str, offset=i * cfg.tokenizer_steps, name=name) -> None:
                if progress is not None:
                    progress(offset + done, self.total_progress, f"tokenizer {name}: {message}")

            tok, history = train_tokenizer([m[name] for m in pool], config=self.bundle.tokenizers[name].config,
                                           steps=cfg.tokenizer_steps, lr=cfg.tokenizer_lr, seed=cfg.seed + 10 + i,
                                           device=str(self.device), progress=report, should_stop=should_stop)
            if len(history["loss"]) < cfg.tokenizer_steps:
                return False
            self.bundle.set_tokenizer(name, tok)
        self.ema = EMA(self.raw_model, cfg.ema_decay)  # the conditioner's code tables changed
        return True

    @property
    def total_progress(self) -> int:
        return len(self.bundle.tokenizers) * self.config.tokenizer_steps + self.config.steps

    # -- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path, meta: dict | None = None) -> Path:
        """Write the EMA bundle and the training state (written beside, then renamed: never half a checkpoint)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_bundle(tmp, meta)
        state_dir = tmp / "training"
        state_dir.mkdir()

        def tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.detach().contiguous().cpu() for k, v in state.items()}

        save_file(tensors(self.raw_model.state_dict()), str(state_dir / "model.safetensors"))
        save_file(tensors(self.ema.shadow), str(state_dir / "ema.safetensors"))
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(tensors(rng), str(state_dir / "rng.safetensors"))
        torch.save(self.optimizer.state_dict(), state_dir / "optimizer.pt")
        state = {"step": self.step_count, "seconds": self.seconds, "loss": self.last_loss,
                 "ema_updates": self.ema.updates, "sampler": self.sampler.state_dict(),
                 "pairs": None if self.pairs is None else self.pairs.state_dict(),
                 "degradation": self.degrade_rng.bit_generator.state, "numpy": _json_state(np.random.get_state()),
                 "python": _json_state(random.getstate()), "config": self.config.to_dict()}
        (state_dir / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
        log.info("checkpoint at step %d: %s", self.step_count, directory)
        return directory

    def meta(self, loss: float) -> dict:
        """Provenance recorded in a saved bundle."""
        return {"trained_steps": self.step_count, "data": str(self.config.data_folder.resolve()),
                "seconds": round(self.seconds, 1), "final_loss": loss, "train_config": self.config.to_dict()}

    def save_bundle(self, directory: str | Path, meta: dict | None = None) -> Path:
        """The bundle with the EMA weights (the model as it should be used)."""
        with self.ema.applied(self.raw_model):
            self.bundle.meta = dict(meta or {})
            return self.bundle.save(directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`; refuses one of another model config."""
        from safetensors.torch import load_file

        from ..models.mmsr.tokenizer import ModalityTokenizer

        directory = Path(directory)
        saved = json.loads((directory / "mmsr.json").read_text())["config"]
        given = self.config.model.to_dict()
        diff = sorted(k for k in set(saved) | set(given) if saved.get(k) != given.get(k))
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} there, {given.get(k)!r} here" for k in diff)
            raise ConfigError(f"cannot resume from {directory}: its model config differs ({details}); use the "
                              "config it was trained with, or choose another output")
        for name in self.bundle.tokenizers:
            tok = ModalityTokenizer.from_pretrained(directory / "tokenizers" / name).to(self.device)
            self.bundle.set_tokenizer(name, tok)
        state_dir = directory / "training"
        self.raw_model.load_state_dict(load_file(str(state_dir / "model.safetensors")))
        self.ema.shadow = {k: v.to(self.device) for k, v in load_file(str(state_dir / "ema.safetensors")).items()}
        self.optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True))
        rng = load_file(str(state_dir / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        if torch.cuda.is_available():
            cuda = [rng[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in rng]
            torch.cuda.set_rng_state_all(cuda)
        state = json.loads((state_dir / "state.json").read_text())
        now = self.config.to_dict()
        changed = sorted(k for k in now if k != "model" and state["config"].get(k) != now[k])
        if changed:
            log.warning("resuming with training settings changed since the checkpoint: %s", ", ".join(changed))
        self.step_count, self.seconds, self.ema.updates = state["step"], state["seconds"], state["ema_updates"]
        self.last_loss = state["loss"]
        self.sampler.load_state_dict(state["sampler"])
        if self.pairs is not None and state.get("pairs") is not None:
            self.pairs.load_state_dict(state["pairs"])
        self.degrade_rng.bit_generator.state = state["degradation"]
        kind, key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        log.info("resumed from %s (step %d)", directory, self.step_count)


# ----------------------------------------------------------------------------------------------------------
# the run


def _trim_log(path: Path, step: int) -> None:
    """Drop log entries past ``step`` (written after the checkpoint a resumed run restarts from)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def train(config: TrainConfig, *, resume: bool = False, progress: Callable[[int, int, str], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train an MMSR bundle as ``config`` says (module docstring); ``resume`` continues the newest checkpoint."""
    cfg, output = config, Path(config.output)
    existing = checkpoint_dirs(output)
    if resume and not existing:
        raise ConfigError(f"--resume: no checkpoint in {output / CHECKPOINTS}; start without --resume")
    if existing and not resume:
        raise ConfigError(f"{output} already holds checkpoints (newest {existing[-1].name}): pass --resume, or "
                          "choose another output")
    trainer = Trainer(cfg)
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / LOG_NAME
    stop = should_stop or (lambda: False)

    def step_dir() -> Path:
        return output / CHECKPOINTS / f"{STEP_PREFIX}{trainer.step_count:06d}"

    total = trainer.total_progress
    checkpoint: Path | None = None
    if resume:
        checkpoint = existing[-1]
        trainer.load_checkpoint(checkpoint)
        _trim_log(log_path, trainer.step_count)
    else:
        log.info("training %s on %s for %d steps (crop %d, batch %d) into %s", cfg.model.text_encoder,
                 cfg.data_folder, cfg.steps, cfg.hr_crop, cfg.batch_size, output)
        t0 = time.perf_counter()
        if not trainer.train_tokenizers(progress, stop):
            log.info("stopped during tokenizer training: nothing saved, the next run starts afresh")
            return TrainResult(0, float("nan"), 0.0, output, None, None, True)
        trainer.seconds = time.perf_counter() - t0
        checkpoint = trainer.save_checkpoint(step_dir(), trainer.meta(float("nan")))

    offset = total - cfg.steps
    window: list[float] = []
    t_window = t_last = time.perf_counter()
    stopped = False
    while trainer.step_count < cfg.steps:
        loss = trainer.step(trainer.prepare(*trainer.next_crops()))
        now = time.perf_counter()
        trainer.seconds += now - t_last
        t_last = now
        window.append(loss)
        step = trainer.step_count
        if progress is not None:
            progress(offset + step, total, f"step {step}/{cfg.steps} loss {loss:.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"step": step, "loss": float(np.mean(window)), "lr": trainer.learning_rate(step - 1),
                     "samples_per_s": len(window) * cfg.batch_size / max(now - t_window, 1e-9),
                     "seconds": trainer.seconds}
            log.info("step %d/%d  loss %.4f  lr %.2e  %.2f samples/s", step, cfg.steps, entry["loss"], entry["lr"],
                     entry["samples_per_s"])
            with log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            trainer.last_loss, window, t_window = entry["loss"], [], now
        stopped = step < cfg.steps and stop()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped:
            loss_now = float(np.mean(window)) if window else trainer.last_loss
            checkpoint = trainer.save_checkpoint(step_dir(), trainer.meta(loss_now))
            spent = time.perf_counter() - now  # checkpoint time is neither training time nor throughput
            t_last, t_window = t_last + spent, t_window + spent
        if stopped:
            log.info("stopped at step %d of %d; continue with --resume", step, cfg.steps)
            break

    final_loss = float(np.mean(window)) if window else trainer.last_loss
    final = None
    if not stopped:
        final = trainer.save_bundle(output / "final", trainer.meta(final_loss))
        log.info("done: %d steps in %.0f s, final loss %.4f; model in %s", trainer.step_count, trainer.seconds,
                 final_loss, final)
    return TrainResult(trainer.step_count, final_loss, trainer.seconds, output, checkpoint, final, stopped)
