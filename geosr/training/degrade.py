"""Second-order Real-ESRGAN-style degradation: HR ``(3, H, W)`` in [0, 1] -> LR ``(3, H/s, W/s)`` in [0, 1].

Two rounds of ``blur -> random resize -> noise -> JPEG`` (Wang et al. 2021, "Real-ESRGAN", sec. 3), the
first round's resize relative to the HR size, the second's relative to the LR size; then a final resize to
exactly ``H/s x W/s`` with a random interpolation, placed before or after the second round's JPEG (so the LR
sometimes carries blocking on its own 8x8 grid, as the benchmark's ``real`` LR does). The result is
quantised to 8 bits, as real inputs are. With probability ``p_clean`` the LR is instead the benchmark's
``clean`` degradation, an antialiased PIL bicubic downscale of the 8-bit HR (bit-identical to
``geosr.bench.degrade(hr, "clean", i)``). Not implemented from Real-ESRGAN: the sinc (ringing) filter and
generalised-Gaussian / plateau kernels.

Every random draw comes from the ``numpy.random.Generator`` passed in; the operations themselves are
deterministic (CPU torch and PIL), so an LR is a function of (HR, config, generator state).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

RESIZE_MODES = ("area", "bilinear", "bicubic")
Range = tuple[float, float]


@dataclass
class DegradationConfig:
    """Ranges are ``(low, high)``, drawn uniformly; ``_1``/``_2`` fields belong to the first/second round.

    Defaults are a little milder than Real-ESRGAN's (noted per field): remote-sensing inputs are rarely as
    damaged as web photos, and a model trained on heavy damage invents detail on clean inputs.
    """

    p_clean: float = 0.1  # probability of the benchmark's clean LR only (PIL antialiased bicubic downscale)
    blur_prob_1: float = 1.0  # probability of a Gaussian blur in round 1 (Real-ESRGAN 1.0)
    blur_prob_2: float = 0.8  # ... in round 2 (Real-ESRGAN 0.8)
    blur_sigma_1: Range = (0.2, 2.5)  # blur sigma in px of the image being blurred (Real-ESRGAN 0.2-3)
    blur_sigma_2: Range = (0.2, 1.5)  # (Real-ESRGAN 0.2-1.5)
    p_anisotropic: float = 0.5  # probability that a blur has two sigmas and a random angle, else isotropic
    resize_probs_1: tuple[float, float, float] = (0.2, 0.7, 0.1)  # probabilities of up / down / keep, round 1
    resize_probs_2: tuple[float, float, float] = (0.3, 0.4, 0.3)  # ... round 2
    resize_range_1: Range = (0.15, 1.5)  # resize factor relative to the HR size (up draws > 1, down < 1)
    resize_range_2: Range = (0.3, 1.2)  # resize factor relative to the final LR size
    p_poisson: float = 0.5  # probability that a round's noise is Poisson-like instead of Gaussian
    p_gray_noise: float = 0.4  # probability that the noise is the same in the three channels
    noise_sigma_1: Range = (1.0, 20.0)  # Gaussian noise sigma, 8-bit units (Real-ESRGAN 1-30)
    noise_sigma_2: Range = (1.0, 15.0)  # (Real-ESRGAN 1-25)
    poisson_scale_1: Range = (0.05, 2.0)  # Poisson noise multiplier, 1 = shot noise of 256 levels (R-E 0.05-3)
    poisson_scale_2: Range = (0.05, 1.5)  # (Real-ESRGAN 0.05-2.5)
    jpeg_quality_1: Range = (40, 95)  # JPEG quality, round 1 (Real-ESRGAN 30-95)
    jpeg_quality_2: Range = (40, 95)  # JPEG quality, round 2
    p_resize_before_jpeg: float = 0.5  # probability that the final resize comes before round 2's JPEG
    max_kernel: int = 21  # largest blur kernel side (odd); a kernel covers +-3 sigma up to this

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # YAML gives lists
                setattr(self, f.name, value := tuple(value))
            if f.name.startswith("p_") or f.name.startswith("blur_prob"):
                if not 0.0 <= value <= 1.0:
                    raise ConfigError(f"degradation {f.name}={value}: a probability must lie in [0, 1]")
            elif f.name.startswith("resize_probs"):
                if len(value) != 3 or min(value) < 0 or sum(value) <= 0:
                    raise ConfigError(f"degradation {f.name}={value}: give 3 non-negative weights (up, down, keep)")
            elif isinstance(value, tuple) and (len(value) != 2 or not 0 <= value[0] <= value[1]):
                raise ConfigError(f"degradation {f.name}={value}: give a range (low, high) with 0 <= low <= high")
        if self.max_kernel < 3 or self.max_kernel % 2 == 0:
            raise ConfigError(f"degradation max_kernel={self.max_kernel}: give an odd number >= 3")
        if not (self.resize_range_1[0] > 0 and self.resize_range_2[0] > 0):
            raise ConfigError("degradation resize ranges must start above 0")


# ----------------------------------------------------------------------------------------------------------
# deterministic operations on (1, 3, h, w) float tensors in [0, 1]


def to_uint8(x: Tensor) -> np.ndarray:
    """``(3, h, w)`` float in [0, 1] -> ``(h, w, 3)`` uint8, rounded."""
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def from_uint8(a: np.ndarray) -> Tensor:
    """``(h, w, 3)`` uint8 -> ``(3, h, w)`` float32 in [0, 1]."""
    return torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def clean_downscale(hr: Tensor, scale: int) -> Tensor:
    """The benchmark's clean LR: 8-bit HR ``(3, H, W)`` -> PIL antialiased bicubic ``(3, H/s, W/s)``."""
    from PIL import Image

    _, H, W = hr.shape
    return from_uint8(np.asarray(Image.fromarray(to_uint8(hr)).resize((W // scale, H // scale), Image.BICUBIC)))


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float, max_size: int) -> Tensor:
    """Normalised ``(k, k)`` Gaussian with axis sigmas (px) rotated by ``theta`` (rad); k covers +-3 sigma."""
    k = min(max_size, 2 * math.ceil(3 * max(sigma_x, sigma_y)) + 1)
    r = torch.arange(k, dtype=torch.float64) - k // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")  # (k, k)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy  # coordinates along the kernel's axes
    kernel = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (kernel / kernel.sum()).float()


def blur(x: Tensor, kernel: Tensor) -> Tensor:
    """``(1, 3, h, w)`` convolved per channel with ``kernel (k, k)``, edges replicated."""
    k = kernel.shape[-1]
    padded = F.pad(x, (k // 2,) * 4, mode="replicate")
    return F.conv2d(padded, kernel.expand(x.shape[1], 1, k, k), groups=x.shape[1])


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``(1, 3, h, w)`` -> ``(1, 3, *size)``; bilinear/bicubic are antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kwargs = {} if mode == "area" else {"align_corners": False, "antialias": True}
    return F.interpolate(x, size=size, mode=mode, **kwargs).clamp(0, 1)


def jpeg(x: Tensor, quality: int) -> Tensor:
    """Round-trip ``(1, 3, h, w)`` through an 8-bit PIL JPEG of the given quality."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(x[0])).save(buf, format="JPEG", quality=int(quality))
    return from_uint8(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))[None]


# ----------------------------------------------------------------------------------------------------------
# random draws


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def random_kernel(rng: np.random.Generator, sigma: Range, p_anisotropic: float, max_size: int) -> Tensor:
    if rng.random() < p_anisotropic:
        return gaussian_kernel(_uniform(rng, sigma), _uniform(rng, sigma), _uniform(rng, (0.0, math.pi)), max_size)
    s = _uniform(rng, sigma)
    return gaussian_kernel(s, s, 0.0, max_size)


def random_resize(x: Tensor, base: tuple[int, int], probs: tuple[float, float, float], bounds: Range,
                  rng: np.random.Generator) -> Tensor:
    """Resize to ``base * f``, f drawn above 1 (up), below 1 (down) or 1 (keep); random interpolation."""
    p = np.asarray(probs, dtype=np.float64)
    kind = int(rng.choice(3, p=p / p.sum()))
    f = (_uniform(rng, (1.0, max(1.0, bounds[1]))) if kind == 0
         else _uniform(rng, (min(1.0, bounds[0]), 1.0)) if kind == 1 else 1.0)
    mode = RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]
    return resize(x, (max(2, round(base[0] * f)), max(2, round(base[1] * f))), mode)


def random_noise(x: Tensor, rng: np.random.Generator, sigma: Range, poisson_scale: Range,
                 config: DegradationConfig) -> Tensor:
    """Add Gaussian (sigma in 8-bit units) or Poisson-like noise (shot noise of 256 levels, scaled)."""
    gray = rng.random() < config.p_gray_noise
    _, C, h, w = x.shape
    if rng.random() < config.p_poisson:
        scale = _uniform(rng, poisson_scale)
        img = x.mean(dim=1, keepdim=True) if gray else x  # (1, 1|3, h, w)
        lam = img.double().numpy() * 256.0
        noise = torch.from_numpy(rng.poisson(lam) / 256.0).float() - img
        noise = noise * scale
    else:
        shape = (1, 1 if gray else C, h, w)
        noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) * (_uniform(rng, sigma) / 255.0)
    return (x + noise).clamp(0, 1)  # gray noise (1, 1, h, w) broadcasts over the channels


# ----------------------------------------------------------------------------------------------------------


def degrade(hr: Tensor, *, scale: int, config: DegradationConfig, rng: np.random.Generator) -> Tensor:
    """HR ``(3, H, W)`` float in [0, 1] (H, W divisible by ``scale``) -> LR ``(3, H/s, W/s)`` in [0, 1], 8-bit."""
    C, H, W = hr.shape
    if C != 3 or H % scale or W % scale:
        raise ConfigError(f"degrade: HR of shape {tuple(hr.shape)} with scale={scale}: expected (3, H, W) with "
                          f"H and W divisible by {scale}")
    hr = hr.detach().float().cpu()
    if rng.random() < config.p_clean:
        return clean_downscale(hr, scale)
    cfg, lr_size = config, (H // scale, W // scale)
    x = hr[None]  # (1, 3, H, W)
    rounds = ((cfg.blur_prob_1, cfg.blur_sigma_1, cfg.resize_probs_1, cfg.resize_range_1, (H, W),
               cfg.noise_sigma_1, cfg.poisson_scale_1, cfg.jpeg_quality_1),
              (cfg.blur_prob_2, cfg.blur_sigma_2, cfg.resize_probs_2, cfg.resize_range_2, lr_size,
               cfg.noise_sigma_2, cfg.poisson_scale_2, cfg.jpeg_quality_2))
    for i, (p_blur, sigma, probs, bounds, base, noise_sigma, poisson_scale, quality) in enumerate(rounds):
        if rng.random() < p_blur:
            x = blur(x, random_kernel(rng, sigma, cfg.p_anisotropic, cfg.max_kernel))
        x = random_resize(x, base, probs, bounds, rng)
        x = random_noise(x, rng, noise_sigma, poisson_scale, cfg)
        q = round(_uniform(rng, quality))
        if i == 0:
            x = jpeg(x, q)
            continue
        final_mode = RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]
        if rng.random() < cfg.p_resize_before_jpeg:
            x = jpeg(resize(x, lr_size, final_mode), q)
        else:
            x = resize(jpeg(x, q), lr_size, final_mode)
    return from_uint8(to_uint8(x[0]))  # (3, H/s, W/s), quantised to 8 bits


def degrade_batch(hr: Tensor, *, scale: int, config: DegradationConfig, rng: np.random.Generator) -> Tensor:
    """``(B, 3, H, W)`` -> ``(B, 3, H/s, W/s)``, samples drawn in order from ``rng`` (on ``hr``'s device)."""
    return torch.stack([degrade(x, scale=scale, config=config, rng=rng) for x in hr]).to(hr.device)
