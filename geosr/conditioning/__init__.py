"""Conditions derived from an image tile: edges, segmentation and a caption (MMSR's modalities).

Every extractor takes the radiometrically scaled tile ``(C, H, W)`` float in about [0, 1] (bands R, G, B and
optionally NIR) and returns a map on the same grid ``(H, W)``: same shape, same pixels, so the tile's transform
and CRS describe it too. The functions below are what the diffusion core is trained against; ``base`` wraps them
in the :class:`~geosr.conditioning.base.Extractor` protocol (called with a georeferenced ``TileContext``) beside
the extractors of the user's data: ``height`` (DSM), ``landcover`` (land-cover raster), ``vectors`` (roads,
buildings, water), and ``geocontext`` + ``reasoning`` (caption and reconstruction hypothesis). Without a DSM,
depth is missing and the model reads its null token.
"""

from __future__ import annotations

from .caption import describe
from .edges import canny_edges
from .segmentation import CLASSES, heuristic_segmentation

__all__ = ["CLASSES", "canny_edges", "describe", "heuristic_segmentation"]
