"""The lazy engine: a scene's enhancement as a dask array, one task per tile and one per output cell.

``enhance_scene`` streams tiles in raster order through :func:`geosr.scene.run_tiles`; this module builds the
same computation as a dask graph from the same per-tile and per-cell functions, so both give the same bits:

1. the scene is opened (a path, or an xarray DataArray: file-backed, dask-backed or in memory) and its
   radiometric scaling fixed once (``io.read``); the model is configured and loaded and its ``begin_scene`` runs
   once, now, with the scene's overview (the mmsr caption), on a private copy of the model, so a later run with
   other settings cannot change this graph's model;
2. one task per tile (``geosr-tile-<token>``, row, col): its window assembled from the input chunks it
   overlaps, then :func:`~geosr.scene.enhance_tile` (scaled, ``begin_tile``, the model);
3. the output's chunks are its *cells* (:attr:`geosr.tiling.AxisPlan.segments`: rectangles under one fixed set
   of tiles: a tile's body, or an overlap strip or corner); for each cell a copied piece of each of its tiles,
   then one task (``geosr-enhance-<token>``, 0, p, q) that blends them in raster order
   (:func:`~geosr.scene.blend_cell`) and converts to the output dtype and nodata (:func:`~geosr.scene.finish_cell`).

Why cells and pieces: a tile's result is freed as soon as its pieces are copied out, and a body cell needs only
its own tile, so whatever order dask runs tasks in, only the small overlap pieces wait for neighbouring tiles.
Computing the array therefore streams: tasks hold a few tiles and strips, never the scene.

Keys are deterministic (the token hashes the input's dask name, the scaling, the settings and the caption),
so a distributed runner can run the tile tasks on workers, store finished cells and resume. Tasks get the
input's chunks (rioxarray-backed chunks reopen the file by path in each worker) and a detached
:class:`~geosr.scene.TileRun` (scene metadata and the prepared model: one graph key every tile depends on).

Progress and cancel (``progress``, ``should_stop``, as :func:`geosr.enhance_scene` takes them): each tile task then
also holds a :class:`TileProgress`, which checks ``should_stop`` before the tile's model runs (raising
:class:`~geosr.scene.Cancelled`) and counts the tile when it is done (a lock makes the count and the callback's
calls ordered under dask's threaded scheduler), and depends on one more task that starts the count once per
compute. The tile, piece and cell keys and the output's bits stay the same.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .config import EnhanceConfig
from .io.read import Scene
from .models.base import SRModel
from .errors import ConfigError
from .scene import (Cancelled, Progress, TileResult, TileRun, blend_cell, enhance_tile, finish_cell, output_tags,
                    prepare_run, scene_overview, scene_sample)
from .tiling import TileGrid, output_transform

log = logging.getLogger(__name__)

INPUT_CHUNK = 512  # px per side of the dask chunks an in-memory (numpy) input is cut into


@dataclass
class LazyEnhancement:
    """A scene's enhanced output, not computed yet, and everything needed to georeference it."""

    array: "dask.array.Array"  # (band, y, x) in the input's dtype; chunks = the tiling's cells  # noqa: F821
    scene: Scene  # the input, opened
    grid: TileGrid  # the tile grid
    run: TileRun  # what every tile task shares (detached scene, prepared model)
    transform: "affine.Affine | None"  # output transform; None without georeferencing  # noqa: F821
    crs: "rasterio.crs.CRS | None"  # noqa: F821
    nodata: float | None
    tags: dict[str, str]  # what the CLI writes into the output's tags
    config: EnhanceConfig

    @property
    def piece_name(self) -> str:
        """Key prefix of the graph's piece tasks: ``(piece_name, row, col, p, q)`` is tile ``(row, col)``'s
        :class:`~geosr.scene.TileResult` on output cell ``(p, q)`` (its ``seconds``: the tile's model time)."""
        return self.array.name.replace("geosr-enhance-", "geosr-piece-", 1)

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """The output chunks (band, y, x): one per output cell (see :func:`geosr.tiling.AxisPlan.segments`)."""
        return self.array.chunks


def _window(blocks: list, places: np.ndarray, shape: tuple[int, int, int], dtype: str, rows: np.ndarray,
            cols: np.ndarray) -> np.ndarray:
    """A tile's pixels from the input chunks it overlaps: ``places[k]`` = (band, row, column offsets in the
    window; row, column offsets in chunk ``k``; band count, height, width of the overlap); then indexed by the
    tile's ``rows``/``cols`` (reflections included)."""
    window = np.empty(shape, dtype=dtype)
    for block, (b0, y0, x0, by, bx, nb, h, w) in zip(blocks, places):
        window[b0:b0 + nb, y0:y0 + h, x0:x0 + w] = np.asarray(block)[:, by:by + h, bx:bx + w]
    return window[:, rows][:, :, cols]


def _tile_task(run: TileRun, tile, window: np.ndarray) -> TileResult:
    """One tile through the model (:func:`geosr.scene.enhance_tile`)."""
    return enhance_tile(run, tile, window)


class TileProgress:
    """The progress and cancel hooks of one lazy graph's tile tasks (see the module docstring).

    Each compute is one *pass*: the graph's pass task (``geosr-pass-<token>-<id>``), which every tile task depends
    on, runs once per compute before any tile, starts the count at 0 and calls ``progress(0, total, "starting")``;
    then each tile done calls ``progress(k, total, "tile k/total")``, ``total`` being the scene's tile count (a
    compute of a window runs only the tiles under it, so its count stops short of ``total``). ``should_stop()`` is
    asked before each tile's model runs; True raises :class:`~geosr.scene.Cancelled` in that task, which ends the
    compute (tiles already running in other threads finish, without reporting: the pass is over).

    Both run where the tasks run: in this process under dask's threaded (the default) and synchronous
    schedulers. Under ``processes`` or dask.distributed each worker gets its own copy: use dask's diagnostics there.
    """

    def __init__(self, total: int, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None):
        self.total = int(total)
        self.progress = progress
        self.should_stop = should_stop
        self.passes = 0  # passes begun (computes of the graph)
        self.done = 0  # tiles done in the current pass
        self.stopped = 0  # the last pass should_stop ended
        self._lock = threading.Lock()

    def __getstate__(self):  # a process scheduler pickles the graph: the lock is per process
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def new_pass(self) -> int:
        """The pass task: a compute begins. Returns the pass number the tile tasks of this compute get."""
        with self._lock:
            self.passes += 1
            self.done = 0
            if self.progress is not None:
                self.progress(0, self.total, "starting")
            return self.passes

    def begin(self, number: int) -> None:
        """Before a tile of pass ``number`` runs its model: the cancel check."""
        if self.should_stop is not None and self.should_stop():
            with self._lock:
                self.stopped = max(self.stopped, number)
            raise Cancelled("cancelled")

    def end(self, number: int) -> None:
        """A tile of pass ``number`` is done: count it and report (unless a later pass has begun)."""
        if self.progress is None:
            return
        with self._lock:
            if number != self.passes or number == self.stopped:  # a later compute began, or this one was stopped
                return
            self.done += 1
            self.progress(self.done, self.total, f"tile {self.done}/{self.total}")


def tqdm_progress(desc: str = "geosr") -> Progress:
    """A progress callback drawing a ``tqdm.auto`` bar (a widget in notebooks), one bar per pass over the tiles."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ConfigError("progress=True needs tqdm; install it (pip install tqdm) or pass a callback") from None
    bar = None

    def progress(done: int, total: int, message: str) -> None:
        nonlocal bar
        if bar is None or done == 0:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, unit="tile", desc=desc)
        bar.n = done
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            bar = None

    return progress


def _pass_task(hooks: TileProgress) -> int:
    return hooks.new_pass()


def _tracked_tile_task(hooks: TileProgress, number: int, run: TileRun, tile, window: np.ndarray) -> TileResult:
    """:func:`_tile_task` between ``hooks.begin()`` (cancel check) and ``hooks.end()`` (progress) in pass
    ``number``."""
    hooks.begin(number)
    result = _tile_task(run, tile, window)
    hooks.end(number)
    return result


def _piece_task(result: TileResult, ya: int, yb: int, xa: int, xb: int) -> TileResult:
    """A tile's result on one output cell ``[ya, yb) x [xa, xb)``, copied: once every cell has its piece the
    whole tile result is freed, and only the pieces of overlap cells wait for the cell's other tiles."""
    valid = result.valid_part(ya, yb, xa, xb)
    return TileResult(tile=result.tile, values=result.part(ya, yb, xa, xb).copy(),
                      valid=None if valid is None else valid.copy(), origin=(ya, xa), seconds=result.seconds)


def _cell_task(run: TileRun, ya: int, yb: int, ycover: list, xa: int, xb: int, xcover: list,
               pieces: list) -> np.ndarray:
    """One output cell, blended from its tiles' pieces and converted to the output dtype (the chunk)."""
    by_tile = {(p.tile.row, p.tile.col): p for p in pieces}
    value = blend_cell(run.grid, by_tile, ya, yb, ycover, xa, xb, xcover)
    return finish_cell(run.scene, value, by_tile[(max(ycover), max(xcover))], ya, yb, xa, xb)


def _overlaps(bounds: np.ndarray, a: int, b: int) -> list[tuple[int, int, int]]:
    """Chunks (index, start, stop in the array) that ``[a, b)`` overlaps, along an axis with chunk ``bounds``."""
    first = int(np.searchsorted(bounds, a, side="right")) - 1
    out = []
    k = first
    while k < len(bounds) - 1 and bounds[k] < b:
        out.append((k, max(a, int(bounds[k])), min(b, int(bounds[k + 1]))))
        k += 1
    return out


def _input_array(scene: Scene):
    """The scene's pixels as a dask array (in-memory arrays are cut into chunks, not copied)."""
    import dask.array as da

    data = scene.data.data
    if isinstance(data, da.Array):
        return data
    return da.from_array(np.asarray(data), chunks=(1, INPUT_CHUNK, INPUT_CHUNK))


def enhance_lazy(scene: Scene, config: EnhanceConfig | None = None, *, model: SRModel | None = None,
                 remote: bool = False, progress: Progress | bool | None = None,
                 should_stop: Callable[[], bool] | None = None) -> LazyEnhancement:
    """The enhanced ``scene`` as a dask array; nothing beyond the model's ``begin_scene`` is computed now.

    ``array.compute()`` equals, bit for bit, what :func:`geosr.enhance_scene` writes for the same scene and
    ``config`` (and :func:`geosr.enhance_array` for an in-memory scene). ``model`` overrides ``config.model``
    with a model object (e.g. one built in a test). ``remote=True`` builds the graph for dask.distributed
    workers: the run key is then a task that builds the model on each worker once (:mod:`geosr.worker`).

    ``progress`` (a callback ``(done, total, message)``, or True for a ``tqdm.auto`` bar) is called as tiles are
    done while the array computes; ``should_stop()`` is asked before each tile and True raises
    :class:`~geosr.scene.Cancelled` from the compute (see :class:`TileProgress`). Neither changes the output.
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    config = config or EnhanceConfig()
    if remote and (progress or should_stop is not None):
        raise ConfigError("progress/should_stop: not for a distributed graph (its engine reports progress itself)")
    if progress is True:
        progress = tqdm_progress()
    elif progress is not None and progress is not False and not callable(progress):
        raise ConfigError(f"progress={progress!r}: give a callback (done, total, message), True for a bar, or None")
    run = prepare_run(scene, config, model, private=True)
    grid = run.grid
    pixels = _input_array(scene)
    token = tokenize(pixels.name, scene.bands, scene.nodata, scene.scaling, config.to_dict(), run.model.name,
                     getattr(run.model, "caption", ""), getattr(run.model, "route", ""))
    task_run = TileRun.create(scene.detached(), run.model, grid, run.edge)
    name = f"geosr-enhance-{token}"
    run_key, tile_name, piece_name = f"geosr-run-{token}", f"geosr-tile-{token}", f"geosr-piece-{token}"
    dsk: dict = {run_key: task_run}
    if remote:  # models do not pickle: each worker builds its own from a small spec (geosr.worker)
        from .worker import remote_run_task

        gsd = float(np.mean(scene.gsd)) / config.scale if scene.georeferenced else None
        sample = scene_sample(scene) if run.model.reads_sample else None
        dsk[run_key] = remote_run_task(token, task_run, scene_overview(scene), gsd, config, sample)

    hooks = pass_key = None
    if progress or should_stop is not None:
        hooks = TileProgress(len(grid), progress or None, should_stop)
        pass_key = f"geosr-pass-{token}-{id(hooks):x}"  # this array's own: another's hooks never run its pass
        dsk[pass_key] = (_pass_task, hooks)

    # 1. one task per tile: its window assembled from the input chunks it overlaps, then the model
    bands_b, rows_b, cols_b = (np.cumsum((0,) + c) for c in pixels.chunks)
    for tile in grid.tiles():
        rows, cols = task_run.source(tile)
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        keys, places = [], []
        for kb, b0, b1 in _overlaps(bands_b, 0, scene.count):
            for ky, y0, y1 in _overlaps(rows_b, r0, r1):
                for kx, x0, x1 in _overlaps(cols_b, c0, c1):
                    keys.append((pixels.name, kb, ky, kx))
                    places.append((b0, y0 - r0, x0 - c0, y0 - rows_b[ky], x0 - cols_b[kx], b1 - b0, y1 - y0, x1 - x0))
        window = (_window, keys, np.array(places, dtype=np.int64), (scene.count, r1 - r0, c1 - c0), scene.dtype,
                  rows - r0, cols - c0)
        dsk[(tile_name, tile.row, tile.col)] = ((_tile_task, run_key, tile, window) if hooks is None else
                                                (_tracked_tile_task, hooks, pass_key, run_key, tile, window))

    # 2. one task per output cell (the chunks), from a piece of each of its tiles
    for p, (ya, yb, ycover) in enumerate(grid.rows.segments):
        for q, (xa, xb, xcover) in enumerate(grid.cols.segments):
            pieces = []
            for r in ycover:
                for c in xcover:
                    dsk[(piece_name, r, c, p, q)] = (_piece_task, (tile_name, r, c), ya, yb, xa, xb)
                    pieces.append((piece_name, r, c, p, q))
            dsk[(name, 0, p, q)] = (_cell_task, run_key, ya, yb, list(ycover), xa, xb, list(xcover), pieces)
    chunks = ((scene.count,), tuple(b - a for a, b, _ in grid.rows.segments),
              tuple(b - a for a, b, _ in grid.cols.segments))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[pixels])
    array = da.Array(graph, name, chunks=chunks, dtype=scene.dtype)
    transform = output_transform(scene.transform, config.scale) if scene.georeferenced else None
    tags = output_tags(run.model, config, scene.path)
    log.info("lazy enhancement of %s (%dx%d, %d bands) x%d with %s: %d tiles, %d output chunks",
             scene.path or "an array", scene.width, scene.height, scene.count, config.scale, run.model.name,
             len(grid), len(grid.rows.segments) * len(grid.cols.segments))
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
