"""Depth / height: the user's DSM or nDSM warped onto the tile grid, or a monocular depth model (online).

Without either, depth is missing and the diffusion core reads its learned null token. Heights are normalised with
one range for the whole scene (percentiles of the DSM inside the scene), so neighbouring tiles agree:
``(h - lo) / (hi - lo)`` clipped to [0, 1], NaN where the DSM has no data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from affine import Affine

from ..errors import BackendError, ConditionError
from .base import SceneGrid, TileContext, check_user_raster, reproject_band

log = logging.getLogger(__name__)

RANGE_PERCENTILES = (1.0, 99.0)  # the scene's height range: robust to a few spikes (cranes, birds, noise)
STATS_SIDE = 512  # the range comes from the DSM warped onto a grid of at most this many px per side


class DsmHeight:
    """``--dsm raster.tif``: any CRS and resolution, reprojected and resampled to each tile's grid."""

    modality = "depth"

    def __init__(self, path, *, scene: SceneGrid, resampling: str = "bilinear"):
        self.path = Path(path)
        self.resampling = resampling  # rasterio Resampling name used to warp the DSM onto tiles
        _, _, _, dtype, _ = check_user_raster(self.path, scene, "DSM")
        if np.dtype(dtype).kind not in "iuf":
            raise ConditionError(f"{self.path}: DSM has data type {dtype}; heights must be numbers")
        self.lo, self.hi = self._scene_range(scene)

    def _scene_range(self, scene: SceneGrid) -> tuple[float, float]:
        f = max(1, -(-max(scene.height, scene.width) // STATS_SIDE))
        coarse = SceneGrid(crs=scene.crs, transform=scene.transform @ Affine.scale(f),
                           height=-(-scene.height // f), width=-(-scene.width // f))
        h = self.heights(coarse)
        values = h[np.isfinite(h)]
        if values.size == 0:
            raise ConditionError(f"{self.path}: DSM has no valid heights inside the scene (all nodata)")
        lo, hi = (float(v) for v in np.percentile(values, RANGE_PERCENTILES))
        if hi - lo < 1e-3:
            hi = lo + 1.0
        log.info("%s: scene height range %.2f..%.2f", self.path, lo, hi)
        return lo, hi

    def heights(self, grid: SceneGrid) -> np.ndarray:
        """Heights in the DSM's units on ``grid`` ``(H, W)`` float32, NaN where the DSM has no data."""
        return reproject_band(self.path, grid, resampling=self.resampling, dtype=np.float32, fill=np.nan)

    def normalise(self, h: np.ndarray) -> np.ndarray:
        return np.clip((h - self.lo) / (self.hi - self.lo), 0.0, 1.0).astype(np.float32)

    def __call__(self, tile: TileContext) -> np.ndarray:
        return self.normalise(self.heights(tile.grid))  # (H, W) float32 in [0, 1], NaN: no data


class TransformersDepth:
    """A transformers ``depth-estimation`` pipeline (e.g. Depth Anything), for users with the Hugging Face Hub.

    Relative depth per tile, normalised to [0, 1] within the tile (the model has no absolute scale).
    """

    modality = "depth"

    def __init__(self, model_id: str, *, device: str = "cpu"):
        self.model_id = model_id  # Hugging Face Hub id or local folder
        self.device = device  # "cpu" or "cuda"
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = load_pipeline("depth-estimation", self.model_id, self.device)
        return self._pipe

    def __call__(self, tile: TileContext) -> np.ndarray:
        import torch

        out = self._pipeline()(to_pil(tile.image))
        depth = out["predicted_depth"]
        depth = torch.as_tensor(depth, dtype=torch.float32).reshape(1, 1, *depth.shape[-2:])
        d = torch.nn.functional.interpolate(depth, size=tile.shape, mode="bilinear", align_corners=False)[0, 0]
        d = d.numpy()
        lo, hi = float(d.min()), float(d.max())
        return ((d - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


def to_pil(image: np.ndarray):
    """``(C, H, W)`` float in about [0, 1] -> an RGB PIL image (first three bands; fewer are repeated)."""
    from PIL import Image

    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    return Image.fromarray((np.clip(np.nan_to_num(rgb), 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0))


def load_pipeline(task: str, model_id: str, device: str = "cpu"):
    """A transformers pipeline, imported lazily; a clear error when transformers or the model is missing."""
    try:
        from transformers import pipeline
    except ImportError as err:
        raise BackendError(f"the {task} backend needs transformers: pip install 'geosr[mmsr]'") from err
    try:
        return pipeline(task, model=model_id, device=device)
    except (OSError, ValueError) as err:
        raise BackendError(f"{model_id}: cannot load a {task} model ({' '.join(str(err).split())[:200]}); "
                           "it needs the Hugging Face Hub (internet) or a local folder with the model") from err
