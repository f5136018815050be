"""LR-consistency projection: make an output agree with its own input after downscaling.

The protocol of ``shared/BENCHMARK.md`` scores invention as the disagreement between the output downscaled
×s (antialiased bicubic, as PIL does it) and the LR input. Downscaling is linear and separable: a
``(C, H, W)`` image ``x`` maps to ``R_h x R_wᵀ`` with one resampling matrix per axis. The projection adds the
minimum-norm correction that removes a share ``strength`` of the disagreement::

    x ← x + strength · R_h⁺ (y − R_h x R_wᵀ) R_w⁺ᵀ,        R⁺ = Rᵀ (R Rᵀ)⁻¹

With ``strength = 1`` the output downscales to the input exactly (up to float rounding); what the model added
that the input cannot see (the null space of the downscale) is kept as it is. This is the range/null-space
split that DDNM (Wang et al. 2023) applies inside diffusion sampling, here with the protocol's own operator.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# BT.601 full-range RGB -> (Y, Cb, Cr), on values in [0, 1]
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_RGB = np.linalg.inv(_YCBCR)


@lru_cache(maxsize=64)
def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix of PIL's antialiased bicubic resize along one axis (``Image.resize``
    with ``BICUBIC``): the filter is stretched by the scale when shrinking, and the weights are renormalised
    where the support leaves the image."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = _bicubic((taps - center + 0.5) / filterscale)
        m[i, lo:hi] = w / w.sum()
    m.setflags(write=False)
    return m


@lru_cache(maxsize=64)
def _pinv(n_in: int, n_out: int) -> np.ndarray:
    r = resample_matrix(n_in, n_out)
    p = r.T @ np.linalg.inv(r @ r.T)
    p.setflags(write=False)
    return p


def downscale(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(C, H, W)`` -> ``(C, h, w)`` as PIL's antialiased bicubic resize, in float64."""
    rh, rw = resample_matrix(x.shape[-2], shape[0]), resample_matrix(x.shape[-1], shape[1])
    return np.einsum("ih,chw,jw->cij", rh, x.astype(np.float64, copy=False), rw, optimize=True)


def project(sr: np.ndarray, lr: np.ndarray, strength: float = 1.0, chroma: float | None = None) -> np.ndarray:
    """``sr`` ``(C, H, W)`` moved towards agreement with ``lr`` ``(C, h, w)``; same dtype as ``sr`` (float).

    ``strength`` in [0, 1]: 0 returns ``sr``; 1 makes ``downscale(result, (h, w))`` equal ``lr``. ``chroma``: for a
    3-band (RGB) image, the strength for its colour (BT.601 Cb, Cr), ``strength`` then being its luma's; None:
    ``strength`` for everything. The correction is linear, so luma and colour can take different shares of it."""
    for s in (strength, 0.0 if chroma is None else chroma):
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"consistency strength must be in [0, 1], not {s}")
    if chroma is not None and sr.shape[0] != 3:
        raise ValueError(f"a separate colour strength needs 3 bands (RGB), got {sr.shape[0]}")
    if chroma == strength:
        chroma = None
    if strength == 0.0 and not chroma:
        return sr
    h, w = lr.shape[-2:]
    H, W = sr.shape[-2:]
    residual = lr.astype(np.float64) - downscale(sr, (h, w))
    correction = np.einsum("hi,cij,wj->chw", _pinv(H, h), residual, _pinv(W, w), optimize=True)
    if chroma is None:
        return (sr + strength * correction).astype(sr.dtype, copy=False)
    ycc = np.einsum("ij,jhw->ihw", _YCBCR, correction)
    ycc[0] *= strength
    ycc[1:] *= chroma
    return (sr + np.einsum("ij,jhw->ihw", _RGB, ycc)).astype(sr.dtype, copy=False)


def limit_chroma(x: np.ndarray, factor: int) -> np.ndarray:
    """``(3, H, W)`` RGB with its luma kept as it is and its chroma (Cb, Cr) no finer than ``1/factor`` of the grid:
    downscaled by ``factor`` with :func:`downscale`, brought back with bicubic interpolation. Same dtype.

    An x4 network may add luma detail the input cannot show, but colour detail at the output's own resolution is
    mostly invention: aerial imagery carries colour at a coarser resolution than luma (pan-sharpening, JPEG's
    chroma subsampling), and the networks' colour noise in dark areas raises saturation (asphalt stops looking
    like asphalt)."""
    import torch
    import torch.nn.functional as F

    if factor <= 1:
        return x
    if x.shape[0] != 3:
        raise ValueError(f"limit_chroma needs 3 bands (RGB), got {x.shape[0]}")
    H, W = x.shape[-2:]
    ycc = np.einsum("ij,jhw->ihw", _YCBCR, x.astype(np.float64, copy=False))
    small = downscale(ycc[1:], (max(1, H // factor), max(1, W // factor)))
    chroma = F.interpolate(torch.from_numpy(small)[None], size=(H, W), mode="bicubic", align_corners=False)[0]
    ycc[1:] = chroma.numpy()
    return np.einsum("ij,jhw->ihw", _RGB, ycc).astype(x.dtype, copy=False)
