"""Segmentation from the user's land-cover raster, or from a learned segmenter (transformers, online).

A land-cover raster (any CRS and resolution) is warped onto each tile's grid with nearest resampling, so class
values are never mixed, and its class table travels with it into the written GeoTIFF. A class table is one of:
a colour table, a raster attribute table or category names (the last two as GDAL keeps them, in the file's
``.aux.xml``). A raster without one is refused: geosr cannot tell what its numbers mean.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import ConditionError
from .base import ClassTable, SceneGrid, TileContext, check_user_raster, reproject_band
from .height import load_pipeline, to_pil

log = logging.getLogger(__name__)

UNLABELLED = 0  # class value of pixels the land-cover raster does not cover (or marks nodata)


def read_class_table(path: Path) -> ClassTable | None:
    """Band 1's class table: category names / attribute table from ``.aux.xml``, colours from the colour table."""
    import rasterio

    names: dict[int, str] = {}
    colors = None
    with rasterio.open(path) as src:
        try:
            cmap = src.colormap(1)
        except ValueError:  # no colour table
            cmap = None
    aux = path.with_name(path.name + ".aux.xml")
    if aux.is_file():
        names = _aux_names(aux)
    if cmap:
        colors = {int(k): tuple(int(c) for c in v) for k, v in cmap.items()}
    if not names and not colors:
        return None
    if not names:  # a colour table alone: name the entries that were given a colour (GDAL pads with black)
        names = {k: f"class {k}" for k, v in colors.items() if tuple(v[:3]) != (0, 0, 0) and v[3] > 0}
    return ClassTable(names, colors)


def _aux_names(aux: Path) -> dict[int, str]:
    """Class names of band 1 from GDAL's PAM sidecar: ``<CategoryNames>`` or ``<GDALRasterAttributeTable>``."""
    try:
        root = ET.parse(aux).getroot()
    except ET.ParseError:
        return {}
    band = next((b for b in root.iter("PAMRasterBand") if b.get("band", "1") == "1"), None)
    if band is None:
        return {}
    cats = band.find("CategoryNames")
    if cats is not None:
        return {i: c.text.strip() for i, c in enumerate(cats.findall("Category")) if c.text and c.text.strip()}
    rat = band.find("GDALRasterAttributeTable")
    if rat is None:
        return {}
    fields = [(f.findtext("Name") or "", f.findtext("Usage") or "") for f in rat.findall("FieldDefn")]
    # GDAL usage codes: 0 generic, 2 name, 5 min-max "value"; take the value column and the name column
    value_col = next((i for i, (n, u) in enumerate(fields) if u == "5" or n.lower() in ("value", "class")), 0)
    name_col = next((i for i, (n, u) in enumerate(fields) if u == "2" or n.lower() in ("name", "class_name",
                                                                                        "label")), None)
    if name_col is None:
        return {}
    out = {}
    for row in rat.findall("Row"):
        cells = [f.text or "" for f in row.findall("F")]
        try:
            out[int(float(cells[value_col]))] = cells[name_col].strip()
        except (IndexError, ValueError):
            continue
    return out


class LandcoverRaster:
    """``--landcover raster.tif``: the user's classes on the tile grid (nearest), class table kept."""

    modality = "segmentation"

    def __init__(self, path, *, scene: SceneGrid):
        self.path = Path(path)
        _, _, self.nodata, dtype, _ = check_user_raster(self.path, scene, "land-cover raster")
        if np.dtype(dtype).kind not in "iu":
            raise ConditionError(f"{self.path}: land-cover raster has data type {dtype}; classes must be integers")
        table = read_class_table(self.path)
        if table is None:
            raise ConditionError(f"{self.path}: land-cover raster has no class table (colour table, raster attribute "
                                 "table or category names); add one so its classes can be named")
        self.classes = table

    def __call__(self, tile: TileContext) -> np.ndarray:
        fill = UNLABELLED if self.nodata is None else int(self.nodata)
        return reproject_band(self.path, tile.grid, resampling="nearest", dtype=np.int64, fill=fill)


class TransformersSegmenter:
    """A transformers ``image-segmentation`` pipeline (SegFormer, Mask2Former, ...), for users with the Hub.

    Classes are the model's labels, numbered from 1 in the order the model defines them (0: no label).
    """

    modality = "segmentation"

    def __init__(self, model_id: str, *, device: str = "cpu"):
        self.model_id = model_id  # Hugging Face Hub id or local folder
        self.device = device  # "cpu" or "cuda"
        self._pipe = None
        self.classes = ClassTable({UNLABELLED: "unlabelled"})

    def __call__(self, tile: TileContext) -> np.ndarray:
        if self._pipe is None:
            self._pipe = load_pipeline("image-segmentation", self.model_id, self.device)
            labels = self._pipe.model.config.id2label
            self.classes = ClassTable({UNLABELLED: "unlabelled", **{int(k) + 1: v for k, v in labels.items()}})
        index = {v: k for k, v in self.classes.names.items()}
        out = np.full(tile.shape, UNLABELLED, dtype=np.int64)
        for seg in self._pipe(to_pil(tile.image)):
            mask = np.asarray(seg["mask"]) > 0
            out[mask] = index.get(seg["label"], UNLABELLED)
        return out
