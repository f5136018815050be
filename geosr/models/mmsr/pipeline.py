"""MMSR diffusion super-resolution pipeline (arXiv 2503.14503): LR image + caption + depth/segmentation/edges.

Working space (``to_working``/``from_working``), one of two:

* Pixel space (no ``vae``, the default), folded by pixel-unshuffle: an image ``(B, 3, H, W)`` in [-1, 1]
  becomes ``(B, 3*f*f, H/f, W/f)`` (``f = config.unshuffle``), so the UNet runs at 1/f of the output resolution
  without a VAE (nothing is lost: pixel-shuffle inverts it exactly). The initial noise is drawn at the output
  resolution and unshuffled.
* Latent space (a diffusers ``AutoencoderKL`` given as ``vae``): an image in [-1, 1] becomes
  ``vae.encode(image).latent_dist.mean * scaling_factor`` ``(B, c, H/v, W/v)`` (the mean: deterministic;
  ``c = latent_channels``, ``v = 2**(len(vae block_out_channels) - 1)``) and a latent decodes as
  ``vae.decode(z / scaling_factor).sample``. ``unshuffle`` is ignored (kept in the config, unused). The initial
  noise is drawn directly in latent shape. This is how a Stable Diffusion UNet (4 latent channels) is used:
  ``unet_from_sd2(path, extra_in_channels=4)`` gives the 8 input channels.

The conditioning image is the LR image bicubic-upsampled to the output size (or a stage-1 result given as
``cond_image``, e.g. Real-ESRGAN's), mapped to [-1, 1] and brought to the working space the same way. The UNet
reads ``concat(noisy sample, conditioning)`` (``in_channels = 2*C``, ``out_channels = C`` with ``C = 3*f*f`` or
``c``, as InstructPix2Pix and the SD x4 upscaler do) and cross-attends to the conditioner's latents ``(B, N, D)``.
Output sides must be multiples of :attr:`MMSRPipeline.size_multiple` (``f`` or ``v`` times the UNet's
downsampling).

Residual mode (``config.residual``), with ``W(image) = to_working(image)``:
    False: the diffusion sample is the HR image, ``x0 = W(2*hr - 1)``, and the output is
    ``(from_working(x0) + 1) / 2``.
    True: the diffusion sample is the residual over the conditioning image, ``x0 = W(2*hr - 1) - W(2*cond - 1)``,
    and the output is ``(from_working(W(2*cond - 1) + x0) + 1) / 2``. In pixel space W is linear, so this is
    ``x0 = W(2*(hr - cond))`` and an output ``cond + from_working(x0)/2`` (the factor 2 keeps the units of the
    non-residual mode); in latent space it is the difference of the two latents. A good stage-1 image leaves the
    model only the high-frequency detail to add. x0 then spans [-2, 2] in pixel space: give DDIM
    ``clip_sample=False`` or ``clip_sample_range=2.0`` (its default clips x0 to [-1, 1]). ``residual_scale`` k
    multiplies the residual before diffusion and divides the sample after (``x0 = k * (...)``): a stage-1 residual
    is small (std ~0.15), and k ~ 1/std gives it unit variance, so errors in reproducing the noise are divided by
    k in the image.
    :meth:`MMSRPipeline.encode_target` and :meth:`MMSRPipeline.decode_sample` are the two directions, for
    training code to use as they are.

Guidance (``guidance_mode``), all three as ``eps = (1 + w) * eps_pos - w * eps_neg``, w = ``guidance_scale``
(w = 0: no guidance and a single branch). Positive and negative branches go through the conditioner in one
batched call and through the UNet in one batched forward ``[pos (B); neg (B)]``, as InstructPix2Pix does.
The positive branch is always (caption, real modalities). The negative branch:

* ``"m-cfg"``: (negative caption, the REAL modalities): guidance moves only along the text direction.
* ``"m0-cfg"``: (negative caption, every modality replaced by its learned null token ``m_null``): the
  modality tokens stay in the conditioner's sequence, as nulls, and the negative caption is read.
* ``"cfg"``: the standard unconditional branch, every condition dropped: no caption at all (all text keys
  are masked out of the conditioner's attention, so not even an empty caption's start token is read) and
  every modality null. Concretely, versus m0-cfg, the conditioner receives ``text_mask`` all False in the
  negative half; the only keys left are the null tokens. A ``negative_prompt`` would therefore be ignored,
  so it is refused with cfg. (Our conditioner has no "modality absent" state distinct from its null token:
  missing and dropped modalities are the same input to it, so the caption is where the two modes differ.)
  Training must drop the caption the same way (``text_mask`` all False, together with ``drop`` on every
  modality) for this branch to be one the model has seen.

The guidance rule lives in :class:`MultimodalGuider`; the sampling loop only calls ``denoise(z, t)``.

Generators: ``generator`` may be one ``torch.Generator`` (draws the whole batch's noise in one call: the
result depends on the batch composition) or a list of one generator per sample (each sample's noise comes
from its own generator, so a batch gives the same images as its samples run one by one, up to float rounding:
exactly in float64; in float32 to ~1e-4, because few-step DDIM divides eps by a small sqrt(alpha_bar)).
DDIM with eta = 0 draws noise only once, at the start.

SAMSR (arXiv 2505.07071), off by default: segmentation-guided sampling. The paper builds on ResShift; this is
an adaptation of its two inference-time ideas to our DDIM sampler (its training-time parts are not implemented):

* Segmentation-weighted noise (``segmentation`` (B, H, W) integer classes at the output resolution, negative =
  unknown, and ``samsr_noise`` = alpha > 0): the initial noise becomes ``(eps + alpha * n_seg) / sqrt(1 + alpha^2)``
  (:func:`segment_noise`), ``n_seg`` one standard normal per (sample, segment, channel) drawn from the same
  generator(s) after eps. Per pixel it is still N(0, 1), but within a segment pixels correlate by
  ``alpha^2 / (1 + alpha^2)``, so the sampler's noise carries the segmentation's structure. Unknown pixels keep
  eps. In latent space the class of each latent pixel is the class of the centre of its v x v block.
* Pixel-wise sampling strength (``samsr_strength``: per-class strengths ``{class: s}`` looked up in
  ``segmentation``, classes not named get 1, or a (B, H, W) float map), s in (0, 1]: a pixel
  starts, as in img2img, from the conditioning target ``x_cond = encode_target(cond, cond)`` (zeros in residual
  mode, the conditioning image otherwise) noised to where its denoising begins. Before each step at timestep t,
  every working-space value with ``t > s * num_train_timesteps`` is replaced by ``scheduler.add_noise(x_cond,
  eps', t)`` with the initial noise eps' (RePaint-style known-region replacement with a per-pixel schedule);
  after that the sampler denoises it normally. A value whose denoising would begin after the last timestep is
  never denoised and ends as ``x_cond`` (img2img with strength below one step returns its input). s = 1
  everywhere is the plain sampler. The map reaches the working space exactly in pixel space (the (B, 1, H, W)
  map repeated to 3 channels and unshuffled) and average-pooled over each v x v block in latent space.

With ``samsr_noise=0`` and ``samsr_strength=None`` (or 1) the result is bit-identical to the plain sampler.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ...errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

GUIDANCE_MODES = ("cfg", "m0-cfg", "m-cfg")
OUTPUT_TYPES = ("np", "pt")
IMAGE_CHANNELS = 3


class PipelineInputError(ConfigError, ValueError):
    """A bad argument to :class:`MMSRPipeline` (a ValueError too, for callers that catch that)."""


@dataclass
class MMSRPipelineOutput(BaseOutput):
    images: np.ndarray | Tensor  # (B, 3, H, W) float in [0, 1]; numpy for output_type="np"


# ----------------------------------------------------------------------------------------------------------
# guidance


@dataclass(frozen=True)
class MultimodalGuider:
    """Which conditions the negative branch keeps, and how the two branches combine (see module docstring)."""

    mode: str = "m-cfg"  # "cfg" | "m0-cfg" | "m-cfg"
    scale: float = 0.0  # w in (1 + w) * eps_pos - w * eps_neg; 0: unguided, one branch

    @property
    def num_branches(self) -> int:
        return 2 if self.scale > 0 else 1

    def conditioner_inputs(self, text_states: Tensor, text_mask: Tensor, neg_states: Tensor, neg_mask: Tensor,
                           codes: dict[str, Tensor | None]) -> dict:
        """Arguments of one batched conditioner call: the positive half, then (if guided) the negative half.

        ``text_states``/``neg_states`` (B, T, D) share T; masks (B, T) bool.
        """
        if self.num_branches == 1:
            return dict(text_states=text_states, text_mask=text_mask, codes=dict(codes), drop=None)
        B = text_states.shape[0]
        if self.mode == "cfg":
            neg_mask = torch.zeros_like(neg_mask)  # the caption is dropped entirely: no text key is attended
        states = torch.cat([text_states, neg_states])  # (2B, T, D)
        mask = torch.cat([text_mask, neg_mask])  # (2B, T)
        both = {m: None if c is None else torch.cat([c, c]) for m, c in codes.items()}  # (2B, g, g)
        drop = None
        if self.mode in ("cfg", "m0-cfg"):
            flags = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)])  # (2B,)
            drop = {m: flags.to(c.device) for m, c in both.items() if c is not None}
        return dict(text_states=states, text_mask=mask, codes=both, drop=drop)

    def combine(self, pred: Tensor) -> Tensor:
        """``(num_branches * B, ...)`` -> ``(B, ...)``: ``(1 + w) * pos - w * neg``."""
        if self.num_branches == 1:
            return pred
        pos, neg = pred.chunk(2)
        return pos + self.scale * (pos - neg)


def guided_denoiser(unet, guider: MultimodalGuider, cond: Tensor,
                    context: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``denoise(z (B, C, h, w), t) -> guided model output (B, C, h, w)`` in one batched UNet forward.

    ``cond`` (B, C, h, w) is the working-space conditioning image; ``context`` (n*B, N, D) the conditioner's
    latents for the n branches in the order of :meth:`MultimodalGuider.conditioner_inputs`.
    """
    n = guider.num_branches
    cond_n = torch.cat([cond] * n)  # (nB, C, h, w)

    def denoise(z: Tensor, t: Tensor) -> Tensor:
        x = torch.cat([torch.cat([z] * n), cond_n], dim=1)  # (nB, 2C, h, w)
        out = unet(x, t, encoder_hidden_states=context, return_dict=False)[0]  # (nB, C, h, w)
        return guider.combine(out)

    return denoise


# ----------------------------------------------------------------------------------------------------------
# SAMSR (see the module docstring)


def segment_noise(noise: Tensor, segmentation: Tensor, alpha: float, generator=None) -> Tensor:
    """``(eps + alpha * n_seg) / sqrt(1 + alpha^2)``: unit-variance noise correlated within each segment.

    ``noise`` (B, C, H, W) standard normal; ``segmentation`` (B, H, W) integer classes (negative = unknown: those
    pixels keep ``noise``); ``n_seg`` is one standard normal per (sample, segment, channel), drawn per sample from
    ``generator`` (one, or a list of one per sample, as for ``noise``).
    """
    shared = torch.zeros_like(noise)  # (B, C, H, W)
    for b in range(noise.shape[0]):
        ids, index = torch.unique(segmentation[b], return_inverse=True)  # (K,), (H, W)
        g = generator[b] if isinstance(generator, list) else generator
        table = randn_tensor((noise.shape[1], len(ids)), generator=g, device=noise.device, dtype=noise.dtype)
        shared[b] = table[:, index]  # (C, H, W)
    weight = alpha * (segmentation >= 0)[:, None].to(noise.dtype)  # (B, 1, H, W)
    return (noise + weight * shared) / torch.sqrt(1 + weight * weight)


def strength_map(strength: dict[int, float] | Tensor, segmentation: Tensor | None) -> Tensor:
    """Per-pixel strengths (B, H, W): a map as it is, or ``{class: s}`` looked up in ``segmentation`` (others 1)."""
    if isinstance(strength, Tensor):
        return strength.float()
    out = torch.ones(segmentation.shape, device=segmentation.device)  # (B, H, W)
    for cls, s in strength.items():
        out[segmentation == cls] = float(s)
    return out


# ----------------------------------------------------------------------------------------------------------
# the pipeline


class MMSRPipeline(DiffusionPipeline):
    """Multimodal diffusion SR: ``lr (B, 3, h, w)`` in [0, 1] -> ``(B, 3, h*scale, w*scale)`` in [0, 1].

    Components: ``unet`` (diffusers ``UNet2DConditionModel``, see the module docstring for its channels),
    ``scheduler`` (any diffusers scheduler with ``set_timesteps``/``step``; DDIM with ``timestep_spacing=
    "trailing"`` suits few steps), ``conditioner`` (:class:`~geosr.models.mmsr.connector.MultimodalConditioner`)
    and ``text_encoder`` (optional: anything with ``encode(list[str]) -> (states, mask)``; without one no caption
    can be given and the conditioner reads the modalities alone), ``vae`` (optional diffusers ``AutoencoderKL``:
    given, the working space is its latent space and ``unshuffle`` is ignored).
    """

    model_cpu_offload_seq = "conditioner->unet->vae"
    _optional_components = ["text_encoder", "vae"]
    _component_names = ("unet", "scheduler", "conditioner", "text_encoder", "vae")
    _config_keys = ("scale", "unshuffle", "residual", "residual_scale")

    def __init__(self, *, unet, scheduler, conditioner, text_encoder=None, vae=None, scale: int = 4,
                 unshuffle: int = 2, residual: bool = False, residual_scale: float = 1.0):
        super().__init__()
        if not (isinstance(residual_scale, (int, float)) and residual_scale > 0):
            raise PipelineInputError(f"residual_scale={residual_scale!r}: give a positive number (1 = unscaled)")
        if not (isinstance(scale, int) and scale >= 1):
            raise PipelineInputError(f"scale={scale!r}: give the SR factor as an int >= 1")
        if not (isinstance(unshuffle, int) and unshuffle >= 1):
            raise PipelineInputError(f"unshuffle={unshuffle!r}: give the pixel-unshuffle factor as an int >= 1")
        if vae is None:
            work, space = IMAGE_CHANNELS * unshuffle * unshuffle, f"unshuffle={unshuffle}"
        else:
            work = getattr(getattr(vae, "config", None), "latent_channels", None)
            if not hasattr(vae, "encode") or work is None:
                raise PipelineInputError(f"vae of type {type(vae).__name__}: pass a diffusers AutoencoderKL")
            space = f"a vae with latent_channels={work}"
        cfg = unet.config
        if cfg.in_channels != 2 * work or cfg.out_channels != work:
            raise PipelineInputError(f"unet has in_channels={cfg.in_channels}, out_channels={cfg.out_channels}; with "
                                     f"{space} they must be {2 * work} (sample + conditioning) and {work}")
        text_dim = conditioner.config.text_dim
        if cfg.cross_attention_dim != text_dim:
            raise PipelineInputError(f"unet cross_attention_dim={cfg.cross_attention_dim} differs from the "
                              f"conditioner's text_dim={text_dim}")
        if text_encoder is not None and getattr(text_encoder, "dim", text_dim) != text_dim:
            raise PipelineInputError(f"text_encoder dim={text_encoder.dim} differs from the conditioner's "
                                     f"text_dim={text_dim}")
        self.register_modules(unet=unet, scheduler=scheduler, conditioner=conditioner, text_encoder=text_encoder,
                              vae=vae)
        self.register_to_config(scale=scale, unshuffle=unshuffle, residual=bool(residual),
                                residual_scale=float(residual_scale))

    @property
    def device(self) -> torch.device:
        """The UNet's device (diffusers asks every component for ``.device``, which plain nn.Modules lack)."""
        return self.unet.device

    def to(self, *args, **kwargs) -> MMSRPipeline:
        """``module.to(*args, **kwargs)`` on every nn.Module component (device and/or dtype); returns self.

        diffusers' own ``to`` reads ``.dtype`` from every component, which plain nn.Modules lack.
        """
        for component in (self.unet, self.conditioner, self.text_encoder, self.vae):
            if isinstance(component, torch.nn.Module):
                component.to(*args, **kwargs)
        return self

    # -- working space -------------------------------------------------------------------------------------------

    def condition_image(self, lr: Tensor) -> Tensor:
        """``lr (B, 3, h, w)`` in [0, 1] -> bicubic ``(B, 3, h*scale, w*scale)``, clipped to [0, 1]."""
        s = self.config.scale
        return F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False).clamp(0, 1)

    def to_working(self, image: Tensor) -> Tensor:
        """Image ``(B, 3, H, W)`` in [-1, 1] -> ``(B, 3*f*f, H/f, W/f)``, or the scaled VAE latent mean
        ``(B, c, H/v, W/v)``."""
        if self.vae is None:
            return F.pixel_unshuffle(image, self.config.unshuffle)
        latent = self.vae.encode(image.to(self.vae.dtype)).latent_dist.mean  # (B, c, H/v, W/v)
        return (latent * self.vae.config.scaling_factor).to(image.dtype)

    def from_working(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`to_working` (the VAE decoder in latent space): -> ``(B, 3, H, W)``."""
        if self.vae is None:
            return F.pixel_shuffle(x, self.config.unshuffle)
        z = x.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(z).sample.to(x.dtype)

    def encode_target(self, hr: Tensor, cond: Tensor) -> Tensor:
        """Training target ``x0`` in working space from ``hr`` and ``cond`` (B, 3, H, W) in [0, 1]."""
        x0 = self.to_working(2 * hr - 1)  # (B, C, h, w)
        if not self.config.residual:
            return x0
        return (x0 - self.to_working(2 * cond - 1)) * self.config.residual_scale

    def decode_sample(self, x0: Tensor, cond: Tensor) -> Tensor:
        """Inverse of :meth:`encode_target`: working-space ``x0`` -> image (B, 3, H, W), clipped to [0, 1]."""
        cond_w = self.to_working(2 * cond - 1) if self.config.residual else None  # (B, C, h, w)
        return ((self.working_image(x0, cond_w) + 1) / 2).clamp(0, 1)

    def working_image(self, x0: Tensor, cond_w: Tensor | None) -> Tensor:
        """Working-space ``x0`` -> the image (B, 3, H, W) in [-1, 1] it stands for, unclipped; ``cond_w`` is the
        conditioning image in working space (``to_working(2 * cond - 1)``; unused outside residual mode)."""
        if self.config.residual:
            x0 = cond_w + x0 / self.config.residual_scale
        return self.from_working(x0)

    @property
    def working_factor(self) -> int:
        """Output pixels per working-space pixel along a side: ``unshuffle``, or the VAE's downsampling."""
        if self.vae is None:
            return self.config.unshuffle
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Output sides must be multiples of this (the working-space factor times the UNet's downsampling)."""
        return self.working_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def mask_to_working(self, mask: Tensor) -> Tensor:
        """Per-pixel values ``(B, H, W)`` -> working space: ``(B, 3*f*f, H/f, W/f)`` exactly, or ``(B, 1, H/v, W/v)``
        averaged over each v x v block."""
        if self.vae is None:
            return F.pixel_unshuffle(mask[:, None].expand(-1, IMAGE_CHANNELS, -1, -1), self.config.unshuffle)
        return F.avg_pool2d(mask[:, None], self.working_factor)

    def initial_noise(self, B: int, H: int, W: int, *, generator, device, dtype, segmentation: Tensor | None = None,
                      samsr_noise: float = 0.0) -> Tensor:
        """Standard normal noise in working space for an output of ``H x W``, segment-correlated if
        ``samsr_noise > 0`` (:func:`segment_noise`): drawn at the output resolution and unshuffled, or directly in
        latent shape (each latent pixel then takes the class at the centre of its block)."""
        f = self.working_factor
        if self.vae is None:
            shape = (B, IMAGE_CHANNELS, H, W)
        else:
            shape = (B, self.vae.config.latent_channels, H // f, W // f)
            segmentation = None if segmentation is None else segmentation[:, f // 2::f, f // 2::f]  # (B, h, w)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if samsr_noise > 0:
            noise = segment_noise(noise, segmentation.to(device), samsr_noise, generator)
        return self.to_working(noise) if self.vae is None else noise

    # -- inputs --------------------------------------------------------------------------------------------------

    def check_inputs(self, lr, modalities, prompt, negative_prompt, num_inference_steps, guidance_scale,
                     guidance_mode, temperatures, generator, callback, output_type, cond_image,
                     segmentation=None, samsr_noise=0.0, samsr_strength=None) -> None:
        def bad(message: str):
            raise PipelineInputError(message)

        if not isinstance(lr, (Tensor, np.ndarray)):
            bad(f"lr of type {type(lr).__name__}: pass a (B, 3, h, w) torch.Tensor or numpy array in [0, 1]")
        if lr.ndim != 4 or lr.shape[1] != IMAGE_CHANNELS or min(lr.shape) < 1:
            bad(f"lr of shape {tuple(lr.shape)}: expected (B, 3, h, w)")
        kind = lr.dtype.is_floating_point if isinstance(lr, Tensor) else np.issubdtype(lr.dtype, np.floating)
        if not kind:
            bad(f"lr of dtype {lr.dtype}: pass floats in [0, 1] (divide 8-bit data by 255)")
        B, _, h, w = lr.shape
        H, W, m = h * self.config.scale, w * self.config.scale, self.size_multiple
        if H % m or W % m:
            bad(f"lr of shape {tuple(lr.shape)}: the output {H}x{W} must have sides divisible by {m} "
                f"(working-space factor x UNet downsampling); pad the tile")
        if cond_image is not None and (not isinstance(cond_image, (Tensor, np.ndarray))
                                       or tuple(cond_image.shape) != (B, IMAGE_CHANNELS, H, W)):
            bad(f"cond_image of shape {tuple(getattr(cond_image, 'shape', ()))}: expected {(B, IMAGE_CHANNELS, H, W)}")
        known = tuple(self.conditioner.modalities)
        if modalities is not None and not isinstance(modalities, dict):
            bad(f"modalities of type {type(modalities).__name__}: pass a dict modality -> (B, g, g) codes or None")
        for name, codes in (modalities or {}).items():
            if name not in known:
                bad(f"modalities: unknown modality '{name}'; known: {', '.join(known)}")
            if codes is not None and (not isinstance(codes, Tensor) or codes.ndim != 3 or codes.shape[0] != B
                                      or codes.dtype.is_floating_point or codes.dtype == torch.bool):
                bad(f"modalities['{name}'] of shape {tuple(getattr(codes, 'shape', ()))}: expected ({B}, g, g) "
                    "integer code indices (or None for a missing modality)")
        for arg, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is None:
                continue
            if self.text_encoder is None:
                bad(f"{arg} given but the pipeline has no text_encoder: load one or pass {arg}=None")
            if not (isinstance(value, str) or (isinstance(value, list) and len(value) == B
                                               and all(isinstance(p, str) for p in value))):
                bad(f"{arg}={value!r:.80}: pass a string or a list of {B} strings (one per sample)")
        if not (isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool)
                and 1 <= num_inference_steps <= self.scheduler.config.num_train_timesteps):
            bad(f"num_inference_steps={num_inference_steps!r}: give an int in "
                f"[1, {self.scheduler.config.num_train_timesteps}]")
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            bad(f"guidance_scale={guidance_scale!r}: give a finite number >= 0 (0 = no guidance)")
        if guidance_mode not in GUIDANCE_MODES:
            bad(f"guidance_mode={guidance_mode!r}: choose one of {', '.join(GUIDANCE_MODES)}")
        if guidance_mode == "cfg" and negative_prompt is not None and guidance_scale > 0:
            bad("negative_prompt with guidance_mode='cfg': cfg drops the caption entirely in its negative branch, "
                "so the negative prompt would be ignored; use 'm0-cfg' or 'm-cfg'")
        if temperatures is not None and not isinstance(temperatures, dict):
            bad(f"temperatures of type {type(temperatures).__name__}: pass a dict name -> float")
        for name, value in (temperatures or {}).items():
            if name not in self.conditioner.keys:
                bad(f"temperatures: unknown key '{name}'; known: {', '.join(self.conditioner.keys)}")
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                bad(f"temperatures['{name}']={value!r}: give a finite number > 0 (1 is neutral)")
        if isinstance(generator, list):
            if len(generator) != B or not all(isinstance(g, torch.Generator) for g in generator):
                bad(f"generator: a list of {len(generator)} items for a batch of {B}; pass one torch.Generator "
                    "per sample (or a single one)")
        elif generator is not None and not isinstance(generator, torch.Generator):
            bad(f"generator of type {type(generator).__name__}: pass a torch.Generator or a list of them")
        if callback is not None and not callable(callback):
            bad("callback is not callable: pass callback(done, total, message)")
        if output_type not in OUTPUT_TYPES:
            bad(f"output_type={output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
        if segmentation is not None:
            kind = torch.as_tensor(segmentation).dtype if isinstance(segmentation, (Tensor, np.ndarray)) else None
            if kind is None or kind.is_floating_point or kind == torch.bool or tuple(segmentation.shape) != (B, H, W):
                bad(f"segmentation of shape {tuple(getattr(segmentation, 'shape', ()))} and dtype {kind}: expected "
                    f"({B}, {H}, {W}) integer classes at the output resolution (negative = unknown)")
        if not (isinstance(samsr_noise, (int, float)) and math.isfinite(samsr_noise) and samsr_noise >= 0):
            bad(f"samsr_noise={samsr_noise!r}: give a finite number >= 0 (0 = off)")
        if samsr_noise > 0 and segmentation is None:
            bad(f"samsr_noise={samsr_noise!r} needs a segmentation ({B}, {H}, {W}) to correlate the noise with")
        if isinstance(samsr_strength, dict):
            if segmentation is None:
                bad(f"samsr_strength given per class needs a segmentation ({B}, {H}, {W}) to look the classes up")
            for cls, value in samsr_strength.items():
                if not (isinstance(cls, int) and isinstance(value, (int, float)) and 0 < value <= 1):
                    bad(f"samsr_strength[{cls!r}]={value!r}: give int class -> strength in (0, 1]")
        elif isinstance(samsr_strength, Tensor):
            if tuple(samsr_strength.shape) != (B, H, W) or not samsr_strength.dtype.is_floating_point:
                bad(f"samsr_strength of shape {tuple(samsr_strength.shape)} and dtype {samsr_strength.dtype}: "
                    f"expected a ({B}, {H}, {W}) float map")
            if not bool(((samsr_strength > 0) & (samsr_strength <= 1)).all()):
                bad("samsr_strength: every value must be in (0, 1]")
        elif samsr_strength is not None:
            bad(f"samsr_strength of type {type(samsr_strength).__name__}: pass None, a dict class -> strength in "
                f"(0, 1] or a ({B}, {H}, {W}) float tensor")

    def encode_text(self, prompts: list[str], *, device) -> tuple[Tensor, Tensor]:
        """Captions -> states ``(B, T, D)`` and mask ``(B, T)``; without a text encoder, one masked-out token."""
        if self.text_encoder is None:
            states = torch.zeros(len(prompts), 1, self.conditioner.config.text_dim, device=device)
            return states, torch.zeros(len(prompts), 1, dtype=torch.bool, device=device)
        states, mask = self.text_encoder.encode(prompts)
        return states.to(device), mask.to(device=device, dtype=torch.bool)

    # -- sampling ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, lr, modalities: dict[str, Tensor | None] | None = None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, num_inference_steps: int = 4,
                 guidance_scale: float = 0.0, guidance_mode: str = "m-cfg",
                 temperatures: dict[str, float] | None = None, generator=None, callback=None,
                 output_type: str = "np", cond_image=None, segmentation=None, samsr_noise: float = 0.0,
                 samsr_strength: dict[int, float] | Tensor | None = None, drop_text: bool = False,
                 return_dict: bool = True):
        """Super-resolve ``lr``.

        Args:
            lr: (B, 3, h, w) float in [0, 1], torch or numpy.
            modalities: modality name -> (B, g, g) integer codes, or None / left out for a missing modality.
            prompt, negative_prompt: a caption for all samples or one per sample; None = empty caption.
            num_inference_steps: scheduler steps (few-step works with a trailing-spaced DDIM).
            guidance_scale: w of ``(1 + w) * eps_pos - w * eps_neg``; 0 = unguided (half the UNet work).
            guidance_mode: "cfg", "m0-cfg" or "m-cfg": what the negative branch keeps (module docstring).
            temperatures: name ("text" or a modality) -> attention temperature of the conditioner; 1 = neutral.
            generator: a torch.Generator, or one per sample for batch-independent results.
            callback: ``callback(done, total, message)`` after every step.
            output_type: "np" (numpy) or "pt" (torch); both (B, 3, H, W) float32 in [0, 1].
            cond_image: (B, 3, H, W) in [0, 1] to condition on instead of bicubic(lr), e.g. a stage-1 SR result.
            segmentation: SAMSR, (B, H, W) integer classes at the output resolution (negative = unknown).
            samsr_noise: SAMSR alpha >= 0: initial noise correlated within segments (module docstring); 0 = off.
            samsr_strength: SAMSR pixel-wise strength in (0, 1]: ``{class: s}`` (needs ``segmentation``; other
                classes 1) or a (B, H, W) float map; a pixel with strength s starts from the noised conditioning
                target and is denoised only from timestep ``s * num_train_timesteps`` on. None (or 1) = off.
            drop_text: the positive branch reads no caption at all (every text key masked, as training's text
                drop does); for ablations. A modality is dropped by passing None for it.
        """
        # 0. validate every argument
        self.check_inputs(lr, modalities, prompt, negative_prompt, num_inference_steps, guidance_scale,
                          guidance_mode, temperatures, generator, callback, output_type, cond_image,
                          segmentation, samsr_noise, samsr_strength)
        device, dtype = self._execution_device, self.unet.dtype
        B = lr.shape[0]
        guider = MultimodalGuider(mode=guidance_mode, scale=float(guidance_scale))

        # 1. conditioning image: bicubic LR (or the stage-1 image) at the output size, then working space
        lr = torch.as_tensor(np.asarray(lr) if isinstance(lr, np.ndarray) else lr).to(device, torch.float32)
        if cond_image is None:
            cond = self.condition_image(lr)  # (B, 3, H, W) in [0, 1]
        else:
            cond = torch.as_tensor(cond_image).to(device, torch.float32)  # (B, 3, H, W)
        cond_w = self.to_working(2 * cond - 1).to(dtype)  # (B, C, h, w)

        # 2. captions -> token states, positive and negative in one call so they share T
        pos = [prompt] * B if isinstance(prompt, str) else (prompt or [""] * B)
        neg = [negative_prompt] * B if isinstance(negative_prompt, str) else (negative_prompt or [""] * B)
        states, mask = self.encode_text(pos + neg, device=device)  # (2B, T, D), (2B, T)
        if drop_text:
            mask[:B] = False

        # 3. conditioner latents for the positive and negative branches in one batched call
        codes = {m: None for m in self.conditioner.modalities}
        codes.update({m: c.to(device) if c is not None else None for m, c in (modalities or {}).items()})
        inputs = guider.conditioner_inputs(states[:B], mask[:B], states[B:], mask[B:], codes)
        context = self.conditioner(**inputs, temperatures=temperatures).to(dtype)  # (nB, N, D)
        denoise = guided_denoiser(self.unet, guider, cond_w, context)

        # 4. timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. initial noise (per sample when given one generator per sample), segment-correlated with SAMSR
        H, W = cond.shape[-2:]
        if segmentation is not None:
            segmentation = torch.as_tensor(segmentation).to(device)  # (B, H, W)
        noise = self.initial_noise(B, H, W, generator=generator, device=device, dtype=dtype,
                                   segmentation=segmentation, samsr_noise=samsr_noise)  # (B, C, h, w)
        z = noise * self.scheduler.init_noise_sigma

        # 6. SAMSR pixel-wise strength: the start timestep of every working-space value, and its known target
        start = None
        if samsr_strength is not None:
            strength = strength_map(samsr_strength, segmentation).to(device)  # (B, H, W)
            start = self.mask_to_working(strength) * self.scheduler.config.num_train_timesteps  # (B, C or 1, h, w)
            x_cond = torch.zeros_like(cond_w) if self.config.residual else cond_w  # = encode_target(cond, cond)

        def not_started(z: Tensor, t: Tensor, target: Tensor) -> Tensor:
            """``z`` with ``target`` wherever denoising has not begun at ``t`` (z itself, untouched, if nowhere)."""
            waiting = t > start  # (B, C or 1, h, w)
            return torch.where(waiting, target, z) if bool(waiting.any()) else z

        # 7. denoising loop: the sampler sees only denoise(z, t)
        for i, t in enumerate(self.progress_bar(timesteps)):
            if start is not None:  # values not started yet: the conditioning target noised to t
                z = not_started(z, t, self.scheduler.add_noise(x_cond, noise, t.reshape(1)))
            eps = denoise(self.scheduler.scale_model_input(z, t), t)  # (B, C, h, w)
            z = self.scheduler.step(eps, t, z, return_dict=False)[0]
            if callback is not None:
                callback(i + 1, len(timesteps), f"denoising step {i + 1}/{len(timesteps)}")
        if start is not None:  # values whose start lies after the last timestep were never denoised
            z = not_started(z, timesteps[-1], x_cond)

        # 8. back to image space (adding the conditioning image in residual mode)
        image = self.decode_sample(z.float(), cond)  # (B, 3, H, W) in [0, 1]
        if output_type == "np":
            image = image.cpu().numpy()
        self.maybe_free_model_hooks()
        return MMSRPipelineOutput(images=image) if return_dict else (image,)

    # -- persistence ---------------------------------------------------------------------------------------------
    # diffusers saves and loads only ModelMixin/SchedulerMixin/transformers components; the geosr components are
    # plain nn.Modules with their own save_pretrained/from_pretrained (config.json + model.safetensors), so the
    # pipeline does both itself: one folder per component and a model_index.json in the diffusers layout.

    def save_pretrained(self, save_directory: str | Path, *, safe_serialization: bool = True) -> Path:
        """Write every component to ``save_directory/<name>`` (safetensors) and ``model_index.json``."""
        if not safe_serialization:
            raise PipelineInputError("safe_serialization=False: geosr writes safetensors only")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": type(self).__name__, **{k: self.config[k] for k in self._config_keys}}
        for name in self._component_names:
            component = getattr(self, name, None)
            if component is None or not hasattr(component, "save_pretrained"):
                if component is not None:
                    log.warning("%s (%s) has no save_pretrained: not saved; pass it to from_pretrained",
                                name, type(component).__name__)
                index[name] = [None, None]
                continue
            kwargs = {"safe_serialization": True} if name in ("unet", "vae") else {}
            component.save_pretrained(directory / name, **kwargs)
            index[name] = [type(component).__module__, type(component).__name__]
        (directory / self.config_name).write_text(json.dumps(index, indent=2) + "\n")
        log.info("saved %s to %s", type(self).__name__, directory)
        return directory

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **components) -> MMSRPipeline:
        """Load from a folder written by :meth:`save_pretrained`; a component passed by name replaces the saved one.

        Only classes from ``diffusers`` and ``geosr`` are imported. Nothing is downloaded.
        """
        directory = Path(pretrained_model_name_or_path)
        index_path = directory / cls.config_name
        if not index_path.is_file():
            raise WeightsError(f"no {cls.config_name} in {directory}: save the pipeline there with save_pretrained()")
        index = json.loads(index_path.read_text())
        kwargs = {k: index[k] for k in cls._config_keys if k in index}
        for name in cls._component_names:
            if name in components:
                kwargs[name] = components.pop(name)
                continue
            module_name, class_name = index.get(name) or (None, None)
            if module_name is None:
                if name not in cls._optional_components:
                    raise WeightsError(f"{index_path} names no {name}: pass {name}=... to from_pretrained")
                continue
            if module_name.split(".")[0] not in ("diffusers", "geosr"):
                raise WeightsError(f"{index_path}: {name} class {module_name}.{class_name} is not from diffusers or "
                                   f"geosr; pass {name}=... to from_pretrained")
            klass = getattr(importlib.import_module(module_name), class_name)
            kwargs[name] = klass.from_pretrained(directory / name)
        if components:
            raise PipelineInputError(f"from_pretrained: unknown arguments {sorted(components)}")
        return cls(**kwargs)
