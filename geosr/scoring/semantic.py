"""Semantic agreement: per-class IoU between the land-cover heuristic on the SR and on the reference.

The segmenter is :func:`geosr.conditioning.segmentation.heuristic_segmentation` (spectral rules, no learning),
so the score says whether the output keeps the *kind* of surface (vegetation, water, shadow, bright) where the
reference has it, by that heuristic. Without an HR reference the LR is segmented and its labels repeated onto
the SR grid (nearest), which asks whether the output changed what the input showed.
"""

from __future__ import annotations

import numpy as np

from ..conditioning.segmentation import CLASSES, heuristic_segmentation


def segment(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(H, W)`` int64 class indices of :data:`CLASSES`."""
    return heuristic_segmentation(np.moveaxis(rgb, -1, 0).astype(np.float64) / 255.0)


def upsample_labels(labels: np.ndarray, scale: int) -> np.ndarray:
    """``(h, w)`` -> ``(h * scale, w * scale)``, each label repeated (no new classes in between)."""
    return np.repeat(np.repeat(labels, scale, axis=0), scale, axis=1)


def class_iou(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Per-class IoU (``None`` for a class absent from both), their mean and the pixel agreement."""
    if pred.shape != ref.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {ref.shape}")
    per_class = {}
    for k, name in enumerate(CLASSES):
        a, b = pred == k, ref == k
        union = int(np.count_nonzero(a | b))
        per_class[name] = None if union == 0 else int(np.count_nonzero(a & b)) / union
    present = [v for v in per_class.values() if v is not None]
    return {"iou": per_class, "mean_iou": float(np.mean(present)) if present else None,
            "pixel_agreement": float(np.mean(pred == ref))}
