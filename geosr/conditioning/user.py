"""The user's own geodata as conditions of a trained model: DSM, land-cover raster and vector layers.

A trained MMSR checkpoint knows one segmentation vocabulary, the heuristic's (:data:`CLASSES`: other, vegetation,
water, shadow, bright), and it has a depth tokenizer only if it was trained with depth. So the user's data is put
into the model's terms, tile by tile, on the tile's georeferenced grid at the output resolution:

1. **Segmentation.** Each user class is mapped by its name onto the model's vocabulary (:func:`model_class`:
   ``"Tree canopy"`` -> vegetation, ``"Building"`` -> bright, ``"Road"`` -> other, ...). The map starts as the
   heuristic's segmentation of the conditioning image; the land-cover raster is laid over it, then the vector
   layers (most precise last). Pixels the user's data does not label, and classes whose names match no rule, keep
   the heuristic's class.
2. **Depth.** The DSM is warped and normalised over the scene's height range (as ``geosr modalities`` writes it).
   It reaches the model only when the checkpoint has a depth tokenizer; otherwise the depth null token stands in,
   and the run says so once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

from .base import ClassTable, SceneGrid, TileContext
from .segmentation import CLASSES

log = logging.getLogger(__name__)

UNMAPPED = -1  # a user class with no counterpart in the model's vocabulary: the heuristic's class is kept

NO_LABEL = re.compile(r"^(none|unlabel+ed|unclassified|no ?data|background|unknown)$", re.I)  # -> UNMAPPED
# class-name rules, first match wins; a name matching none stays UNMAPPED
CLASS_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("water", re.compile(r"water|river|lake|sea\b|ocean|pond|reservoir|canal|stream|lagoon", re.I)),
    ("vegetation", re.compile(r"veget|tree|forest|wood|grass|crop|shrub|scrub|park\b|meadow|lawn|cultivat|"
                              r"herbac|mangrove|moss|lichen|wetland|orchard|vineyard|agri|pasture", re.I)),
    ("shadow", re.compile(r"shadow", re.I)),
    ("other", re.compile(r"road|street|highway|rail|parking|asphalt|impervious|paved|track|path", re.I)),
    ("bright", re.compile(r"build|roof|concrete|bare|soil|sand|rock|snow|glacier", re.I)),
)


def model_class(name: str) -> int:
    """A user class name -> the index of its model class in :data:`CLASSES`, or :data:`UNMAPPED`."""
    name = name.strip()
    if NO_LABEL.search(name):
        return UNMAPPED
    for target, rule in CLASS_RULES:
        if rule.search(name):
            return CLASSES.index(target)
    return UNMAPPED


def class_lookup(classes: ClassTable) -> dict[int, int]:
    """User class value -> model class index, for every named class that maps."""
    return {int(v): c for v, name in classes.names.items() if (c := model_class(name)) != UNMAPPED}


def relabel(user: np.ndarray, lookup: dict[int, int]) -> np.ndarray:
    """User class values -> model classes, :data:`UNMAPPED` where a value has no counterpart."""
    out = np.full(user.shape, UNMAPPED, dtype=np.int64)
    for value, target in lookup.items():
        out[user == value] = target
    return out


@dataclass(frozen=True)
class UserMaps:
    """What the user's data gave one tile, on the grid it was asked for."""

    segmentation: np.ndarray  # (H, W) int64 model classes: the heuristic's where the user's data says nothing
    user_fraction: float  # share of pixels whose class came from the user's data
    depth: np.ndarray | None  # (H, W) float32 in [0, 1], NaN without data; None: no DSM given


class UserConditions:
    """The user's DSM / land cover / vectors, opened and checked once per scene, queried per tile."""

    def __init__(self, *, scene: SceneGrid, dsm=None, landcover=None, vectors=None):
        from .height import DsmHeight
        from .landcover import LandcoverRaster
        from .vectors import VectorLayers

        self.dsm = DsmHeight(dsm, scene=scene) if dsm else None
        self.landcover = LandcoverRaster(landcover, scene=scene) if landcover else None
        self.vectors = VectorLayers(vectors, scene=scene) if vectors else None
        self.layers = [(layer, class_lookup(layer.classes)) for layer in (self.landcover, self.vectors)
                       if layer is not None]
        for layer, lookup in self.layers:
            names = layer.classes.names
            kept = sorted(names[v] for v in names if v not in lookup and model_class(names[v]) == UNMAPPED
                          and not NO_LABEL.search(names[v]))
            if kept:
                log.info("%s: classes %s have no counterpart among the model's (%s); the heuristic's class is "
                         "kept there", layer.path, ", ".join(kept), ", ".join(CLASSES))

    @property
    def empty(self) -> bool:
        return self.dsm is None and not self.layers

    def sources(self) -> dict[str, str]:
        """Modality -> the user file it comes from (for the output's tags)."""
        out = {}
        if self.layers:
            out["segmentation"] = " + ".join(str(layer.path) for layer, _ in self.layers) + " over heuristic"
        if self.dsm is not None:
            out["depth"] = str(self.dsm.path)
        return out

    def maps(self, tile: TileContext, heuristic: np.ndarray) -> UserMaps:
        """The user's maps on ``tile``'s grid; ``heuristic`` is the heuristic segmentation of the same grid."""
        seg = np.asarray(heuristic, dtype=np.int64).copy()
        from_user = np.zeros(seg.shape, dtype=bool)
        for layer, lookup in self.layers:
            mapped = relabel(layer(tile), lookup)
            hit = mapped != UNMAPPED
            seg[hit] = mapped[hit]
            from_user |= hit
        depth = self.dsm(tile) if self.dsm is not None else None
        return UserMaps(segmentation=seg, user_fraction=float(from_user.mean()) if from_user.size else 0.0,
                        depth=depth)
