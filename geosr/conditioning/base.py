"""The one protocol every spatial extractor follows, and the georeferenced tile it is called with.

An extractor is a callable ``extractor(tile) -> (H, W) array`` on exactly the tile's grid: same shape, and the
tile's transform and CRS describe it. Extractors that read the user's files (DSM, land cover, vectors) are built
once per scene from a :class:`SceneGrid`, so scene-wide statistics (e.g. the height range) are shared by tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from affine import Affine

from .edges import canny_edges
from .segmentation import CLASSES, heuristic_segmentation


@dataclass(frozen=True, kw_only=True)
class SceneGrid:
    """Where a scene lies: enough to reproject anything onto it."""

    crs: "rasterio.crs.CRS | None"  # the scene's CRS; None for images without georeferencing  # noqa: F821
    transform: Affine  # pixel (0, 0) corner and pixel size of the scene
    height: int  # rows
    width: int  # columns

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in the scene's CRS (also for rotated transforms: the envelope)."""
        xs, ys = zip(*(self.transform @ (c, r) for c, r in ((0, 0), (self.width, 0), (0, self.height),
                                                             (self.width, self.height))))
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True, kw_only=True)
class TileContext:
    """A tile of the scene with its georeferencing. Every extractor gets one of these, never a bare array."""

    image: np.ndarray  # (C, H, W) float32, radiometrically scaled to about [0, 1], nodata filled
    transform: Affine  # of the tile's pixel (0, 0)
    crs: "rasterio.crs.CRS | None"  # the scene's CRS  # noqa: F821
    valid: np.ndarray | None = None  # (H, W) bool, False outside the scene's footprint; None: all valid
    row: int = 0  # scene row of the tile's pixel (0, 0)
    col: int = 0  # scene column of the tile's pixel (0, 0)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    @property
    def grid(self) -> SceneGrid:
        return SceneGrid(crs=self.crs, transform=self.transform, height=self.shape[0], width=self.shape[1])


@runtime_checkable
class Extractor(Protocol):
    """``extractor(tile) -> (H, W)`` array aligned to ``tile``; ``modality`` names what it produces."""

    modality: str  # "edges", "segmentation" or "depth"

    def __call__(self, tile: TileContext) -> np.ndarray: ...


@dataclass(frozen=True)
class ClassTable:
    """Class value -> name (and an optional RGBA colour), kept from the source into the written GeoTIFF."""

    names: dict[int, str]  # class value -> name
    colors: dict[int, tuple[int, int, int, int]] | None = None  # class value -> RGBA; None: no colour table


HEURISTIC_COLORS = ((128, 128, 128, 255), (40, 160, 40, 255), (30, 80, 200, 255), (20, 20, 20, 255),
                    (240, 240, 220, 255))


class CannyEdges:
    """Edges: :func:`canny_edges` on the tile (thresholds from the tile's gradient statistics)."""

    modality = "edges"

    def __init__(self, *, sigma: float = 1.0):
        self.sigma = sigma  # Gaussian smoothing before the gradient, in px

    def __call__(self, tile: TileContext) -> np.ndarray:
        return canny_edges(tile.image, sigma=self.sigma)  # (H, W) float32 in {0, 1}


class HeuristicSegmenter:
    """The offline default segmentation: :func:`heuristic_segmentation` (spectral rules)."""

    modality = "segmentation"
    classes = ClassTable(dict(enumerate(CLASSES)), dict(enumerate(HEURISTIC_COLORS)))

    def __call__(self, tile: TileContext) -> np.ndarray:
        return heuristic_segmentation(tile.image)  # (H, W) int64, classes of CLASSES


def check_aligned(tile: TileContext, array: np.ndarray, name: str) -> np.ndarray:
    """Every extractor's output goes through this: a map off the tile's grid is a bug, never user input."""
    if array.shape != tile.shape:
        raise RuntimeError(f"{name}: extractor returned shape {array.shape}, the tile is {tile.shape}")
    return array


def check_user_raster(path, scene: SceneGrid, what: str):
    """Open the user's raster ``path`` (read only) and check it can be put on ``scene``'s grid.

    Returns its ``(crs, bounds in the scene's CRS, nodata, dtype, band count)``. Raises :class:`ConditionError` naming the file
    when it is unreadable, has no CRS, or does not overlap the scene.
    """
    from pathlib import Path

    import rasterio
    from rasterio.warp import transform_bounds

    from ..errors import ConditionError

    path = Path(path)
    if not path.is_file():
        raise ConditionError(f"{path}: no such {what} file")
    if scene.crs is None:
        raise ConditionError(f"{path}: the scene has no CRS, so a {what} cannot be placed on it; georeference the scene")
    try:
        with rasterio.open(path) as src:
            crs, bounds, nodata, dtype, count = src.crs, src.bounds, src.nodata, src.dtypes[0], src.count
    except rasterio.errors.RasterioIOError as err:
        raise ConditionError(f"{path}: not a readable {what} raster ({' '.join(str(err).split())})") from err
    if crs is None:
        raise ConditionError(f"{path}: {what} has no CRS; assign one (e.g. gdal_edit.py -a_srs EPSG:...)")
    left, bottom, right, top = transform_bounds(crs, scene.crs, *bounds, densify_pts=21)
    s_left, s_bottom, s_right, s_top = scene.bounds
    if left >= s_right or right <= s_left or bottom >= s_top or top <= s_bottom:
        raise ConditionError(f"{path}: {what} does not overlap the scene ({what} covers {left:.6g}, {bottom:.6g}, "
                             f"{right:.6g}, {top:.6g}; the scene {s_left:.6g}, {s_bottom:.6g}, {s_right:.6g}, "
                             f"{s_top:.6g} in {scene.crs.to_string()})")
    return crs, (left, bottom, right, top), nodata, dtype, count


def reproject_band(path, tile_grid: SceneGrid, *, resampling: str, dtype, fill) -> np.ndarray:
    """Band 1 of the raster at ``path`` warped onto ``tile_grid`` -> ``(H, W)``; ``fill`` where it has no data."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    out = np.full((tile_grid.height, tile_grid.width), fill, dtype=dtype)
    with rasterio.open(path) as src:
        reproject(source=rasterio.band(src, 1), destination=out, src_nodata=src.nodata, dst_nodata=fill,
                  dst_transform=tile_grid.transform, dst_crs=tile_grid.crs, resampling=Resampling[resampling])
    return out
