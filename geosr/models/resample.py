"""Interpolation baselines (bicubic, Lanczos) and the exact pixel-replication model used by tests.

Separable polyphase resampling in torch: for an integer factor ``s`` every output pixel is one of ``s`` phases,
each a fixed small filter over the neighbouring input pixels, so one conv per axis does it exactly and fast.
"""

from __future__ import annotations


import numpy as np

from .base import SRModel


def cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5, as PIL and GDAL use)."""
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def lanczos(x: np.ndarray, a: int = 3) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.sinc(x) * np.sinc(x / a)
    return np.where(np.abs(x) < a, out, 0.0)


def phase_filters(kernel, support: int, scale: int) -> tuple[np.ndarray, int]:
    """Filters ``(scale, taps)`` and the left padding for upsampling by ``scale`` with ``kernel``.

    Output pixel ``o`` sits at input coordinate ``(o + 0.5) / scale - 0.5`` (pixel-centre convention).
    """
    taps = 2 * support + 1
    pad = support
    filters = np.zeros((scale, taps))
    for p in range(scale):
        centre = (p + 0.5) / scale - 0.5  # relative to input pixel o // scale
        offsets = np.arange(-support, support + 1)
        w = kernel(offsets - centre)
        filters[p] = w / w.sum()
    return filters, pad


class Resampler(SRModel):
    channels = None
    scales = tuple(range(2, 9))

    def __init__(self, *, name: str, kernel, support: int, description: str):
        self.name, self._kernel, self._support, self.description = name, kernel, support, description
        self.receptive_field = support
        self.default_tile = 256
        self._cache: dict[int, tuple] = {}

    def _filters(self, scale: int):
        if scale not in self._cache:
            import torch

            f, pad = phase_filters(self._kernel, self._support, scale)
            self._cache[scale] = (torch.from_numpy(f).float(), pad)
        return self._cache[scale]

    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        filters, pad = self._filters(scale)
        c, h, w = x.shape
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(c, 1, h, w)
        # columns: (C, 1, H, W + 2 pad) -> (C, s, H, W) -> (C, 1, H, W * s)
        t = F.pad(t, (pad, pad, 0, 0), mode="replicate")
        t = F.conv2d(t, filters.view(scale, 1, 1, -1))
        t = t.permute(0, 2, 3, 1).reshape(c, 1, h, w * scale)
        # rows: (C, 1, H + 2 pad, W s) -> (C, s, H, W s) -> (C, H s, W s)
        t = F.pad(t, (0, 0, pad, pad), mode="replicate")
        t = F.conv2d(t, filters.view(scale, 1, -1, 1))
        t = t.permute(0, 2, 1, 3).reshape(c, h * scale, w * scale)
        return t.numpy()


class Replicate(SRModel):
    """Nearest-neighbour pixel replication: exact, used for masks and as the tiling test model."""

    name = "nearest"
    channels = None
    scales = tuple(range(1, 17))
    receptive_field = 0
    default_tile = 512
    description = "pixel replication (exact; for masks and tests)"

    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray:
        return np.repeat(np.repeat(x, scale, axis=1), scale, axis=2)


def bicubic() -> Resampler:
    return Resampler(name="bicubic", kernel=cubic, support=2, description="bicubic interpolation (Keys, a = -0.5)")


def lanczos3() -> Resampler:
    return Resampler(name="lanczos", kernel=lanczos, support=3, description="Lanczos-3 interpolation")


