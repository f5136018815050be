"""Human-readable descriptions of scenes and runs (``geosr info``)."""

from __future__ import annotations

import os

import numpy as np

from .config import EnhanceConfig
from .io.write import BLOCK

BASE_RSS_MB = 450  # python + numpy + rasterio + torch, measured on this project's machines


def scene_info(path, config: EnhanceConfig) -> list[str]:
    """Lines describing ``path`` and the cost of enhancing it with ``config``."""
    from .io.read import open_scene
    from .models import get_model
    from .scene import band_groups, plan

    scene = open_scene(path, bands=config.bands, nodata=config.nodata)
    model = get_model(config.model, device=config.device)
    model.configure(config)  # a checkpoint sets the tile of a diffusion model
    grid = plan((scene.height, scene.width), model, config)
    out_h, out_w = grid.out_shape
    gsd_x, gsd_y = scene.gsd
    groups = band_groups(model, scene.alpha)
    passes = sum(1 for _, mode in groups if mode != "nearest")
    tile = grid.rows.tile
    in_px = len(grid) * tile * tile * passes
    itemsize = np.dtype(scene.dtype).itemsize
    # memory: ~2 rows of partly written blocks + the overlap strip being blended (float64) + one tile in and out
    ramp_out = grid.rows.ramp * config.scale
    mem = (2 * BLOCK * out_w * scene.count * itemsize
           + ramp_out * out_w * scene.count * 8
           + tile * tile * scene.count * 4 * (1 + 3 * config.scale ** 2)) / 2**20 + BASE_RSS_MB
    seconds = getattr(model, "seconds_per_mpx", None)
    threads = config.threads or os.cpu_count()
    time_line = (f"~{in_px / 1e6 * seconds:.0f} s on {threads} CPU threads" if seconds is not None
                 else "unknown for this model")
    crs = scene.crs.to_string() if scene.crs else "none (not georeferenced)"
    return [
        f"file:        {scene.path}",
        f"size:        {scene.width} x {scene.height} px, {scene.count} band(s) {list(scene.bands)}",
        f"dtype:       {scene.dtype}; nodata: {scene.nodata}",
        f"CRS:         {crs}",
        f"GSD:         {gsd_x:.4g} x {gsd_y:.4g} (CRS units per px)",
        f"bands:       " + "; ".join(f"{[scene.bands[b] for b in bs]} {mode}" for bs, mode in groups),
        f"model:       {model.name} x{config.scale}, tile {tile} px, overlap {grid.rows.overlap} px",
        f"tiles:       {len(grid)} ({grid.shape[0]} rows x {grid.shape[1]} cols)",
        f"output:      {out_w} x {out_h} px, GSD {gsd_x / config.scale:.4g} x {gsd_y / config.scale:.4g}",
        f"est. memory: ~{mem:.0f} MB peak",
        f"est. time:   {time_line}",
    ]
