"""Edges: Canny on the tile's luminance, thresholds from the tile's own gradient statistics."""

from __future__ import annotations

import numpy as np

LOW_QUANTILE = 0.80  # gradient magnitudes below this quantile of the tile never start or continue an edge
HIGH_QUANTILE = 0.92  # ... above this one always start an edge (hysteresis between the two)


def luminance(image: np.ndarray) -> np.ndarray:
    """``(C >= 3, H, W)`` R, G, B first -> BT.601 luma ``(H, W)``; a 1- or 2-band image -> its first band."""
    if image.shape[0] >= 3:
        return 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    return image[0]


def canny_edges(image: np.ndarray, *, sigma: float = 1.0) -> np.ndarray:
    """``(C, H, W)`` float -> ``(H, W)`` float32 in {0, 1}: 1 on an edge.

    The hysteresis thresholds are quantiles of the tile's gradient magnitude, so a dim tile and a bright one get
    the same share of edge candidates; a flat tile (no gradient) has no edges.
    """
    from skimage.feature import canny

    gray = luminance(np.asarray(image, dtype=np.float64))
    if not np.isfinite(gray).all():
        gray = np.nan_to_num(gray, nan=float(np.nanmean(gray)) if np.isfinite(gray).any() else 0.0)
    if float(gray.max() - gray.min()) < 1e-6:
        return np.zeros(gray.shape, dtype=np.float32)
    edges = canny(gray, sigma=sigma, low_threshold=LOW_QUANTILE, high_threshold=HIGH_QUANTILE, use_quantiles=True)
    return edges.astype(np.float32)
