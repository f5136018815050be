"""An honest heuristic land-cover segmenter: spectral indices and brightness, no learning.

It is a heuristic. It knows nothing of objects: a green roof is "vegetation", a dark roof "shadow", a grey
river "impervious". It stands in, offline, for a learned segmenter (none is available offline; see
WEIGHTS.md) and for the user's own land-cover raster, and the diffusion model learns what it means on the
training data.

Classes (index: name)::

    0 other        none of the rules below
    1 vegetation   NDVI > 0.2 with NIR, else excess green (2G - R - B) / (R + G + B) > 0.05
    2 water        bluish (blue over red and green by more than WATER_CHROMA) or NDWI-positive, dark and smooth
    3 shadow       very dark (luma under a tile-relative threshold)
    4 bright       bright and unsaturated: roofs, concrete, bare soil, road markings
"""

from __future__ import annotations

import numpy as np

CLASSES = ("other", "vegetation", "water", "shadow", "bright")
OTHER, VEGETATION, WATER, SHADOW, BRIGHT = range(len(CLASSES))
# how much bluer than red and green a pixel must be to be "bluish" (2 DN in 8 bit): near black, hue is noise, and
# asphalt half a DN bluer than grey would otherwise be water (geosr/checkpoints/MODEL_CARD.md, structure)
WATER_CHROMA = 2 / 255


def _local_std(x: np.ndarray, size: int = 5) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    mean = uniform_filter(x, size, mode="reflect")
    sq = uniform_filter(x * x, size, mode="reflect")
    return np.sqrt(np.maximum(sq - mean * mean, 0.0))


def heuristic_segmentation(image: np.ndarray, *, nir: np.ndarray | None = None) -> np.ndarray:
    """``(C, H, W)`` float in about [0, 1], R, G, B first (a 4th band is taken as NIR) -> ``(H, W)`` int64."""
    x = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if x.shape[0] < 3:
        x = np.repeat(x[:1], 3, axis=0)
    if nir is None and image.shape[0] >= 4:
        nir = x[3]
    r, g, b = np.clip(x[0], 0, None), np.clip(x[1], 0, None), np.clip(x[2], 0, None)
    total = r + g + b + 1e-6
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    saturation = (np.max(x[:3], axis=0) - np.min(x[:3], axis=0)) / (np.max(x[:3], axis=0) + 1e-6)
    dark = min(0.12, float(np.quantile(luma, 0.05)) + 0.04)  # tile-relative, capped at an absolute level
    bright = max(0.55, float(np.quantile(luma, 0.85)))

    labels = np.full(luma.shape, OTHER, dtype=np.int64)
    labels[(luma > bright) & (saturation < 0.25)] = BRIGHT
    labels[luma < dark] = SHADOW
    if nir is not None:
        nir = np.asarray(nir, dtype=np.float64)
        veg = (nir - r) / (nir + r + 1e-6) > 0.2
        wet = (g - nir) / (g + nir + 1e-6) > 0.1
    else:
        veg = (2 * g - r - b) / total > 0.05
        wet = (b - np.maximum(r, g) > WATER_CHROMA) & (luma < 0.35)
    labels[veg & (luma >= dark)] = VEGETATION
    labels[wet & ~veg & (_local_std(luma) < 0.02)] = WATER
    return labels
