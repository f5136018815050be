"""A structured, deterministic caption of a tile from what geosr knows: land cover, edges, GSD, place, date.

This is the offline caption (issue 4 adds learned captioners and LLM reasoning on top). It states only what is
measured, so it cannot suggest structures that are not there.
"""

from __future__ import annotations

import numpy as np

from .segmentation import CLASSES

NAMES = {"vegetation": "vegetation", "water": "water", "shadow": "shadow", "bright": "bright roofs or pavement",
         "other": "built-up or bare ground"}


def describe(segmentation: np.ndarray, *, edges: np.ndarray | None = None, gsd: float | None = None,
             place: str | None = None, date: str | None = None) -> str:
    """``(H, W)`` class map (+ optional edge map) -> e.g. "aerial image, 0.5 m per pixel; 40% built-up ..."."""
    counts = np.bincount(np.asarray(segmentation).ravel().clip(0, len(CLASSES) - 1), minlength=len(CLASSES))
    share = counts / max(1, counts.sum())
    parts = [f"{round(100 * s)}% {NAMES[CLASSES[i]]}" for i, s in sorted(enumerate(share), key=lambda kv: -kv[1])
             if s >= 0.05]
    head = "aerial image"
    if gsd is not None:
        head += f", {gsd:.2g} m per pixel"
    if place:
        head += f", {place}"
    if date:
        head += f", {date}"
    text = f"{head}; {', '.join(parts)}"
    if edges is not None:
        density = float(np.mean(edges))
        text += "; " + ("dense fine structure" if density > 0.12 else "some linear structure" if density > 0.04
                        else "mostly smooth surfaces")
    return text
