"""Whether an image went through JPEG: the evidence its 8×8 DCT coefficients leave.

JPEG stores each 8×8 block's DCT coefficients divided by a step and rounded, so after decoding, the coefficients of
a block on JPEG's grid sit close to multiples of that step. A picture that never went through JPEG (or was resampled
after it) has no such comb. :func:`jpeg_evidence` searches the 64 grid offsets (a tile is cut anywhere in the scene)
and, for a few low frequencies, the step that best explains the coefficients; the score is the mean over those
frequencies of ``mean(cos(2π c / q))`` over the coefficients ``c`` larger than half the step ``q``: about 0.9 on JPEG
output at quality 70, about 0.1 on a clean downscale (measured on ``shared/BENCHMARK.md``'s crops).

What it does not see: noise or blur without compression, JPEG at quality 95 and above (steps of 1–2; quality 90
scores about 0.7, 70 about 0.95), and JPEG undone by resampling (a reprojected or rescaled JPEG).
"""

from __future__ import annotations

import numpy as np

# low AC frequencies (row, column): large enough steps at every common quality, and populated on most textures
FREQUENCIES = ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), (2, 1), (2, 2), (0, 3), (3, 0))
STEPS = np.arange(2, 41, dtype=np.float64)  # candidate quantiser steps, 8-bit DCT units
MIN_COEFFICIENTS = 20  # fewer coefficients above half a step than this: that step is not judged
JPEG_THRESHOLD = 0.5  # evidence at or above this: treat the input as JPEG-compressed


def _dct_matrix() -> np.ndarray:
    n = np.arange(8)
    m = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 16) * np.sqrt(2 / 8)
    m[0] /= np.sqrt(2)
    return m  # orthonormal DCT-II, JPEG's


_DCT = _dct_matrix()


def _luma(x: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` in model units (0..1) or ``(H, W)`` -> JPEG's level-shifted luma in 8-bit units."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        y = x
    elif x.shape[0] >= 3:
        y = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    else:
        y = x[0]
    return y * 255.0 - 128.0


def _comb(coefficients: np.ndarray) -> float:
    """The best step's ``mean(cos(2π c / q))`` over coefficients above half the step (0 when none qualifies)."""
    c = np.abs(coefficients)[:, None]
    big = c > STEPS[None, :] / 2
    count = big.sum(axis=0)
    score = np.where(big, np.cos(2 * np.pi * c / STEPS[None, :]), 0.0).sum(axis=0) / np.maximum(count, 1)
    score[count < MIN_COEFFICIENTS] = 0.0
    return float(score.max())


def jpeg_evidence(x: np.ndarray) -> float:
    """Evidence (about 0 to 1) that ``x`` is a decoded JPEG, at its best grid offset.

    ``x``: ``(C, H, W)`` float in model units (an 8-bit source divided by 255), or ``(H, W)``; at least 16 px a side.
    A 128 px tile takes about 0.1 s.
    """
    y = _luma(x)
    if min(y.shape) < 16:
        return 0.0
    best = 0.0
    for dy in range(8):
        for dx in range(8):
            h, w = (y.shape[0] - dy) // 8 * 8, (y.shape[1] - dx) // 8 * 8
            blocks = y[dy:dy + h, dx:dx + w].reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)
            coef = np.einsum("ki,abij,lj->abkl", _DCT, blocks, _DCT, optimize=True)
            score = float(np.mean([_comb(coef[..., u, v].ravel()) for u, v in FREQUENCIES]))
            best = max(best, score)
    return best


def looks_jpeg(x: np.ndarray, threshold: float = JPEG_THRESHOLD) -> bool:
    return jpeg_evidence(x) >= threshold
