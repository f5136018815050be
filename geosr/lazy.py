"""The lazy engine: a scene's enhancement as a dask array, one task per tile and one per output chunk.

``enhance_scene`` streams tiles in raster order through :func:`geosr.scene.run_tiles`; this module builds the
same computation as a dask graph, from the same per-tile and per-cell functions, so both give the same bits:

1. the scene is opened (a path, or an xarray DataArray: file-backed, dask-backed or in memory) and its
   radiometric scaling fixed once (``io.read``); the model is configured, loaded, and its ``begin_scene`` runs
   once, now, with the scene's overview (the mmsr caption) -- on a private copy, so later runs with other
   settings cannot change this graph's model;
2. one task per tile: its pixels (a slice of the scene's dask array: only the input chunks it overlaps) ->
   :func:`~geosr.scene.enhance_tile` (scaled, ``begin_tile``, the model);
3. one task per output chunk: the output cells whose last tile (in raster order) is that tile, the tile's
   *core*; each cell blended from its tiles' results (:func:`~geosr.scene.blend_cell`, the order
   :func:`~geosr.scene.run_tiles` adds them in) and converted to the output dtype and nodata
   (:func:`~geosr.scene.finish_cell`).

A chunk needs at most 2 x 2 tiles, so computing the array streams: each task holds a few tiles, never the
scene. Keys are deterministic (``geosr-tile-<token>``, ``geosr-core-<token>``, indexed by tile row and column),
so a distributed runner can run the tile tasks on workers and store finished cores (e.g. in a Zarr store whose
chunks are the cores, :attr:`LazyEnhancement.chunks`) and resume from them. Tasks get the scene's dask array
(file-backed arrays from rioxarray reopen the file by path in each worker) and a detached
:class:`~geosr.scene.TileRun`: scene metadata and the prepared model, one graph key that every tile depends on.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import EnhanceConfig
from .io.read import Scene
from .scene import (TileResult, TileRun, _set_threads, blend_cell, edge_mode, enhance_tile, finish_cell,
                    output_tags, plan, scene_grid, scene_overview)
from .tiling import TileGrid, output_transform

log = logging.getLogger(__name__)

INPUT_CHUNK = 512  # px per side of the dask chunks an in-memory (numpy) input is cut into


@dataclass
class LazyEnhancement:
    """A scene's enhanced output, not computed yet, and everything needed to georeference it."""

    array: "dask.array.Array"  # (band, y, x) in the input's dtype; chunks = tile cores  # noqa: F821
    scene: Scene  # the input, opened
    grid: TileGrid  # the tile grid
    run: TileRun  # what every tile task shares (detached scene, prepared model)
    transform: "affine.Affine | None"  # output transform; None without georeferencing  # noqa: F821
    crs: "rasterio.crs.CRS | None"  # noqa: F821
    nodata: float | None
    tags: dict[str, str]  # what the CLI writes into the output's tags
    config: EnhanceConfig

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """The output chunks (band, y, x): one per tile core."""
        return self.array.chunks


def core_spans(grid: TileGrid) -> tuple[list[tuple[int, int, list]], list[tuple[int, int, list]]]:
    """Per axis, the tile cores: for each tile index ``i`` whose core is not empty, ``(a, b, segments)`` with
    ``[a, b)`` the output px of the segments whose last tile is ``i``, and those segments ``(a, b, cover)``."""

    def axis(plan):
        spans: dict[int, list] = {}
        for seg in plan.segments:
            spans.setdefault(max(seg[2]), []).append(seg)
        return [(i, segs[0][0], segs[-1][1], segs) for i, segs in sorted(spans.items())]

    return axis(grid.rows), axis(grid.cols)


def _tile_task(run: TileRun, tile, block: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> TileResult:
    """One tile: ``block`` is the scene's window around it, ``rows``/``cols`` index it (reflections included)."""
    return enhance_tile(run, tile, np.asarray(block)[:, rows][:, :, cols])


def _core_task(run: TileRun, row_segs: list, col_segs: list, *results: TileResult) -> np.ndarray:
    """One output chunk: the cells ``row_segs x col_segs`` blended from their tiles' ``results``."""
    by_tile = {(r.tile.row, r.tile.col): r for r in results}
    y0, x0 = row_segs[0][0], col_segs[0][0]
    out = np.empty((run.scene.count, row_segs[-1][1] - y0, col_segs[-1][1] - x0), dtype=run.scene.dtype)
    for ya, yb, ycover in row_segs:
        for xa, xb, xcover in col_segs:
            value = blend_cell(run.grid, by_tile, ya, yb, ycover, xa, xb, xcover)
            last = by_tile[(max(ycover), max(xcover))]
            out[:, ya - y0:yb - y0, xa - x0:xb - x0] = finish_cell(run.scene, value, last, ya, yb, xa, xb)
    return out


def prepare(scene: Scene, config: EnhanceConfig) -> TileRun:
    """Configure and load the model, plan the grid, run the model's ``begin_scene`` once for this scene.

    The model is a private shallow copy of the registry's (loaded weights are shared, settings and the scene's
    state -- e.g. the mmsr caption -- are this run's own).
    """
    from .models import get_model

    shared = get_model(config.model, device=config.device)
    shared.configure(config)  # before planning: a checkpoint may set the model's scale and tile
    grid = plan((scene.height, scene.width), shared, config)
    shared.prepare()
    model = copy.copy(shared)
    _set_threads(config)
    gsd = float(np.mean(scene.gsd)) / config.scale if scene.georeferenced else None
    model.begin_scene(scene_overview(scene), gsd=gsd, grid=scene_grid(scene))
    return TileRun.create(scene, model, grid, edge_mode(model, config))


def _input_array(scene: Scene):
    """The scene's pixels as a dask array (in-memory arrays are cut into chunks, not copied)."""
    import dask.array as da

    data = scene.data.data
    if isinstance(data, da.Array):
        return data
    return da.from_array(np.asarray(data), chunks=(1, INPUT_CHUNK, INPUT_CHUNK))


def enhance_lazy(scene: Scene, config: EnhanceConfig | None = None) -> LazyEnhancement:
    """The enhanced ``scene`` as a dask array; nothing beyond the model's ``begin_scene`` is computed now.

    ``array.compute()`` equals, bit for bit, what :func:`geosr.enhance_scene` writes for the same scene and
    ``config``.
    """
    import dask
    import dask.array as da
    from dask.base import tokenize

    config = config or EnhanceConfig()
    run = prepare(scene, config)
    grid = run.grid
    pixels = _input_array(scene)
    token = tokenize(pixels.name, scene.bands, scene.nodata, scene.scaling, config.to_dict(), run.model.name,
                     getattr(run.model, "caption", ""))
    task_run = TileRun.create(scene.detached(), run.model, grid, run.edge)
    run_key = dask.delayed(task_run, name=f"geosr-run-{token}", traverse=False)

    tiles = {}
    for tile in grid.tiles():
        rows, cols = task_run.source(tile)
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        tiles[(tile.row, tile.col)] = dask.delayed(_tile_task, pure=True)(
            run_key, tile, pixels[:, r0:r1, c0:c1], rows - r0, cols - c0,
            dask_key_name=(f"geosr-tile-{token}", tile.row, tile.col))

    row_cores, col_cores = core_spans(grid)
    blocks = []
    for i, ya, yb, row_segs in row_cores:
        line = []
        needed_rows = sorted({r for seg in row_segs for r in seg[2]})
        for j, xa, xb, col_segs in col_cores:
            needed_cols = sorted({c for seg in col_segs for c in seg[2]})
            deps = [tiles[(r, c)] for r in needed_rows for c in needed_cols]
            core = dask.delayed(_core_task, pure=True)(run_key, row_segs, col_segs, *deps,
                                                      dask_key_name=(f"geosr-core-{token}", i, j))
            line.append(da.from_delayed(core, shape=(scene.count, yb - ya, xb - xa), dtype=scene.dtype))
        blocks.append(line)
    array = da.block(blocks)  # chunks: one per tile core
    transform = output_transform(scene.transform, config.scale) if scene.georeferenced else None
    tags = output_tags(run.model, config, scene.path)
    log.info("lazy enhancement of %s (%dx%d, %d bands) x%d with %s: %d tiles, %d output chunks",
             scene.path or "an array", scene.width, scene.height, scene.count, config.scale, run.model.name,
             len(grid), len(row_cores) * len(col_cores))
    return LazyEnhancement(array=array, scene=scene, grid=grid, run=task_run, transform=transform, crs=scene.crs,
                           nodata=scene.nodata, tags=tags, config=config)


def open_source(src, *, bands=None, nodata=None) -> Scene:
    """A path (opened lazily) or an xarray DataArray (see :func:`geosr.io.read.scene_from_dataarray`)."""
    from .io.read import open_scene, scene_from_dataarray

    if isinstance(src, (str, Path)):
        return open_scene(src, bands=bands, nodata=nodata)
    return scene_from_dataarray(src, nodata=nodata)


def to_dataarray(result: LazyEnhancement, *, band_coords=None):
    """The lazy output as an xarray DataArray: x/y coordinates of the output pixel centres, ``rio`` CRS,
    transform and nodata as the CLI writes them, the CLI's tags as attributes."""
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    scene = result.scene
    out_h, out_w = result.array.shape[1:]
    bands = list(band_coords) if band_coords is not None else list(scene.bands)
    coords = {"band": bands}
    t = result.transform
    if t is not None and t.is_rectilinear and t.b == 0 and t.d == 0:
        coords["x"] = t.c + t.a * (np.arange(out_w) + 0.5)
        coords["y"] = t.f + t.e * (np.arange(out_h) + 0.5)
    da = xr.DataArray(result.array, dims=("band", "y", "x"), coords=coords, attrs=dict(result.tags))
    descriptions = [d or "" for d in scene.descriptions]
    if any(descriptions):
        da.attrs["long_name"] = tuple(descriptions)
    if t is not None:
        da = da.rio.write_crs(result.crs).rio.write_transform(t)
    if result.nodata is not None:
        da = da.rio.write_nodata(result.nodata, encoded=False)
    return da
