"""``enhance_scene``: the single entry point every interface (CLI, accessor, QGIS) calls.

Read scene -> cut tiles -> run the model -> blend -> write, streamed tile by tile:

1. open the scene lazily and fix its radiometric scaling once (``io.read``);
2. plan the tile grid (``tiling``);
3. for each tile in raster order: read it (cut or reflect-padded at the scene edge), scale it, run the model
   band group by band group, weight it by its blend weights;
4. every output cell whose last contributing tile is done is converted back to the input's value range and
   dtype, masked where the input was nodata, and handed to the writer, which writes each GeoTIFF block as
   soon as it is complete (``io.write``), and (``config.resume``, the default) written to the partial store beside
   the output (``store``), so that the same call after a kill, crash or Ctrl-C skips the cells already done.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .config import EnhanceConfig
from .errors import ConfigError, GeosrError, Terminated
from .io.read import Scene, open_scene
from .models import get_model
from .models.base import SRModel, is_grey
from .models.consistency import project
from .tiling import Tile, TileGrid, default_overlap, halo_for, output_transform, parse_edge

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
GDAL_CACHE_MB = 64  # bounds GDAL's block cache during a run: memory must not grow with the scene


class Cancelled(GeosrError):
    """The caller's ``should_stop()`` returned True; nothing was written."""


@dataclass
class EnhanceResult:
    path: Path | None
    shape: tuple[int, int, int]  # (band, y, x) of the output
    tiles: int
    seconds: float
    model_seconds: float  # time spent inside the model alone (this run's tiles: not those a resume skipped)
    config: EnhanceConfig
    tags: dict = field(default_factory=dict)
    resumed_cells: int = 0  # resumed runs: output cells found done in the partial store
    skipped_tiles: int = 0  # ... and the tiles not recomputed because every cell they feed was done


# ---------------------------------------------------------------------------------------------------------------
# planning


def plan(scene_hw: tuple[int, int], model: SRModel, config: EnhanceConfig) -> TileGrid:
    """The tile grid for a scene of ``(height, width)``, with defaults from the model's receptive field."""
    model.check_scale(config.scale)
    given = [f"--{k}" for k in ("dsm", "landcover", "vectors") if getattr(config, k)]
    if given and not model.reads_geodata:
        raise ConfigError(f"{', '.join(given)}: model {model.name} does not read the user's geodata; use --model mmsr")
    overlap = default_overlap(model.receptive_field) if config.overlap is None else int(config.overlap)
    tile = model.default_tile if config.tile is None else int(config.tile)
    if overlap < 0:
        raise ConfigError(f"--overlap {overlap}: must be >= 0")
    if tile <= 2 * overlap:
        raise ConfigError(f"--tile {tile}: must be larger than 2 x overlap ({2 * overlap}); use a bigger tile or a smaller overlap")
    if config.edge is not None:
        try:
            parse_edge(config.edge)
        except ValueError:
            raise ConfigError(f"--edge {config.edge}: choose reflect, cut or reflect:N (N px of padding)") from None
    halo = halo_for(model.receptive_field, overlap)
    if halo < model.receptive_field:
        log.warning("overlap %d leaves a halo of %d px, under %s's receptive field (%d px): seams may show; "
                    "the default overlap is %d", overlap, halo, model.name, model.receptive_field,
                    default_overlap(model.receptive_field))
    h, w = scene_hw
    return TileGrid.for_scene(h, w, tile=tile, overlap=overlap, scale=config.scale, halo=halo)


def edge_mode(model: SRModel, config: EnhanceConfig) -> str:
    return config.edge or model.edge


def band_groups(model: SRModel, alpha: tuple[bool, ...]) -> list[tuple[list[int], str]]:
    """How bands reach the model: ``[(band indexes, mode)]`` with mode ``model``, ``single`` or ``nearest``.

    - alpha (mask) bands are replicated, never modelled;
    - a model that takes any channel count gets all other bands at once;
    - a 3-channel (RGB) model gets the first three other bands as RGB; every further band, and every band of a
      1- or 2-band scene, goes through it alone: repeated to 3 channels, and the output channels averaged.
    """
    regular = [b for b, a in enumerate(alpha) if not a]
    groups: list[tuple[list[int], str]] = [([b], "nearest") for b, a in enumerate(alpha) if a]
    if not regular:
        return groups
    if model.channels is None:
        groups.append((regular, "model"))
    elif model.channels == 3 and len(regular) >= 3:
        groups.append((regular[:3], "model"))
        groups.extend(([b], "single") for b in regular[3:])
    else:
        groups.extend(([b], "single") for b in regular)
    return sorted(groups, key=lambda g: g[0][0])


# ---------------------------------------------------------------------------------------------------------------
# the tile loop (no file I/O: reads through ``scene.read``, writes through ``put``)


def _run_model(model: SRModel, x: np.ndarray, groups, scale: int) -> np.ndarray:
    """``(C, T, T)`` float32 -> ``(C, sT, sT)`` float32 by band groups."""
    from .models.resample import Replicate

    out = np.empty((x.shape[0], x.shape[1] * scale, x.shape[2] * scale), dtype=np.float32)
    strength = getattr(model, "consistency", 0.0)
    chroma = getattr(model, "chroma_consistency", None)
    for bands, mode in groups:
        if mode == "nearest":
            out[bands] = Replicate().upscale(x[bands], scale)
            continue
        if mode == "model":
            out[bands] = model.upscale(x[bands], scale)
            if getattr(model, "keep_grey", True) and len(bands) > 1 and is_grey(x[bands]):
                out[bands] = out[bands].mean(axis=0, keepdims=True)  # grey in, grey out: no invented colour
        else:
            rgb = np.repeat(x[bands], 3, axis=0) if model.channels == 3 else x[bands]
            out[bands] = model.upscale(rgb, scale).mean(axis=0, keepdims=True)
        if strength or chroma:
            out[bands] = project(out[bands], x[bands], strength, chroma if len(bands) == 3 else None)
    return out


def _scaled(scene: Scene, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels -> the model's range with nodata filled by the band's scene mean; and the validity mask."""
    valid = scene.valid_mask(raw)
    x = np.empty(raw.shape, dtype=np.float32)
    for b, sc in enumerate(scene.scaling):
        band = raw[b].astype(np.float64)
        if not valid.all():
            band[~valid] = sc.fill
        x[b] = sc.forward(band)
    return x, valid


def _to_dtype(scene: Scene, values: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Model range -> the input's value range and dtype; nodata where the input was nodata."""
    out = np.empty(values.shape, dtype=scene.dtype)
    kind = np.dtype(scene.dtype).kind
    for b, sc in enumerate(scene.scaling):
        v = sc.inverse(values[b].astype(np.float64))
        if kind in "iu":
            info = np.iinfo(scene.dtype)
            v = np.clip(np.rint(v), info.min, info.max)
        out[b] = v
    fill = scene.nodata if scene.nodata is not None else (np.nan if kind == "f" else None)
    if valid is not None and fill is not None and not np.isnan(fill):
        # a valid pixel that came out as nodata in every band would punch a hole in the footprint: nudge it
        hole = valid & (out == fill).all(axis=0)
        if hole.any():
            top = np.iinfo(out.dtype).max if kind in "iu" else np.inf
            out[0][hole] = np.nextafter(out.dtype.type(fill), out.dtype.type(top)) if kind == "f" else (
                fill + 1 if fill < top else fill - 1)
    if valid is not None and fill is not None and not valid.all():
        out[:, ~valid] = fill
    return out


def scene_grid(scene: Scene):
    """Where the scene lies (for models that read the user's georeferenced data); None without georeferencing."""
    from .conditioning.base import SceneGrid

    if not scene.georeferenced:
        return None
    return SceneGrid(crs=scene.crs, transform=scene.transform, height=scene.height, width=scene.width)


def tile_grid(scene: Scene, tile: Tile, edge: str, shape: tuple[int, int]):
    """The grid of the pixels a tile read gives, reflect padding included (it extends the scene's grid)."""
    from affine import Affine

    from .conditioning.base import SceneGrid

    if not scene.georeferenced:
        return None
    y0, x0 = tile.read_origin(edge)
    return SceneGrid(crs=scene.crs, transform=scene.transform @ Affine.translation(x0, y0),
                     height=int(shape[0]), width=int(shape[1]))


@dataclass
class TileRun:
    """What every tile of one scene's run shares, fixed before the first tile: the scene (its scaling, nodata,
    dtype, georeferencing), the configured model after its ``begin_scene``, the tile grid, the edge mode and the
    band groups. :func:`run_tiles` and the lazy graph (:mod:`geosr.lazy`) both run tiles through it.

    A model is called by one tile at a time (``begin_tile`` then ``upscale``): ``lock`` serialises them when tiles
    run in threads; the model parallelises inside itself (torch threads).
    """

    scene: Scene
    model: SRModel
    grid: TileGrid
    edge: str
    groups: list[tuple[list[int], str]]
    has_nodata: bool  # whether output px can be nodata (a nodata value, or a float type: NaN)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def create(cls, scene: Scene, model: SRModel, grid: TileGrid, edge: str) -> "TileRun":
        return cls(scene=scene, model=model, grid=grid, edge=edge,
                   groups=band_groups(model, scene.alpha),
                   has_nodata=scene.nodata is not None or np.dtype(scene.dtype).kind == "f")

    def source(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """Scene rows and columns ``tile`` reads (cut or reflect-padded at the scene edge)."""
        return tile.source(self.scene.height, self.scene.width, self.edge)

    def __getstate__(self):  # picklable for process/distributed schedulers: the lock is per process
        state = dict(self.__dict__)
        state.pop("lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, lock=threading.Lock())


@dataclass
class TileResult:
    """One tile's model output on the output grid, before blending."""

    tile: Tile
    values: np.ndarray  # (C, s h, s w) float32 in the model's range; (h, w) = the px the tile read
    valid: np.ndarray | None  # (s h, s w): the input px under each output px was valid; None: no nodata possible
    origin: tuple[int, int]  # output px of values[:, 0, 0]
    seconds: float  # time inside the model

    def part(self, ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
        """The values on output px ``[ya, yb) x [xa, xb)``, ``(C, yb - ya, xb - xa)`` float32."""
        oy, ox = self.origin
        return self.values[:, ya - oy:yb - oy, xa - ox:xb - ox]

    def valid_part(self, ya: int, yb: int, xa: int, xb: int) -> np.ndarray | None:
        oy, ox = self.origin
        return None if self.valid is None else self.valid[ya - oy:yb - oy, xa - ox:xb - ox]


def enhance_tile(run: TileRun, tile: Tile, raw: np.ndarray) -> TileResult:
    """Run the model on one tile: ``raw`` is the scene's pixels at ``run.source(tile)`` as stored ``(C, h, w)``."""
    s = run.grid.rows.scale
    x, valid = _scaled(run.scene, raw)
    with run.lock:
        run.model.begin_tile(tile_grid(run.scene, tile, run.edge, x.shape[1:]))
        t0 = time.perf_counter()
        y = _run_model(run.model, x, run.groups, s)  # (C, s h, s w); h = w = tile size unless cut at the edge
        seconds = time.perf_counter() - t0
    valid_out = np.repeat(np.repeat(valid, s, 0), s, 1) if run.has_nodata else None
    origin = tuple(int(v) * s for v in tile.read_origin(run.edge))
    return TileResult(tile=tile, values=y, valid=valid_out, origin=origin, seconds=seconds)


def single_cover(ycover: tuple[int, ...], xcover: tuple[int, ...]) -> bool:
    """A cell under one tile only takes that tile's values as they are (no weights)."""
    return len(ycover) == 1 and len(xcover) == 1


def contribution(grid: TileGrid, result: TileResult, ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
    """``result``'s weighted values on the cell ``[ya, yb) x [xa, xb)``, float64 ``(C, h, w)``."""
    ty, tx = grid.out_origin(result.tile)  # output px of the weights' first entry
    wy, wx = grid.rows.weights(result.tile.row), grid.cols.weights(result.tile.col)
    w = np.outer(wy[ya - ty:yb - ty], wx[xa - tx:xb - tx])
    return result.part(ya, yb, xa, xb) * w


def blend_cell(grid: TileGrid, results: dict[tuple[int, int], TileResult], ya: int, yb: int, ycover,
               xa: int, xb: int, xcover) -> np.ndarray:
    """The blended float64 values of one output cell from all of its tiles' results, summed in raster order
    (the order :func:`run_tiles` adds them in, so both give the same bits)."""
    if single_cover(ycover, xcover):
        return results[(ycover[0], xcover[0])].part(ya, yb, xa, xb).astype(np.float64)
    acc = None
    for r in ycover:
        for c in xcover:
            part = contribution(grid, results[(r, c)], ya, yb, xa, xb)
            if acc is None:
                acc = np.zeros(part.shape, dtype=np.float64)
            acc += part
    return acc


def finish_cell(scene: Scene, value: np.ndarray, last: TileResult, ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
    """A blended cell -> the output dtype, nodata where the input was (mask from the cell's last tile)."""
    return _to_dtype(scene, value, last.valid_part(ya, yb, xa, xb))


def run_tiles(scene: Scene, model: SRModel, grid: TileGrid, put: Callable[[int, int, np.ndarray], None], *,
              edge: str = "reflect", progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None, done: frozenset | set = frozenset(),
              stored: Callable[[int, int, int, int], np.ndarray] | None = None) -> float:
    """Enhance ``scene`` tile by tile in raster order, calling ``put(y0, x0, block)`` once per finished output
    cell. Partly blended cells wait in memory (about one overlap strip); nothing else does.

    ``done``: origins ``(y0, x0)`` of output cells finished by an earlier run (a resumed partial store). They are
    not recomputed, and a tile all of whose cells are done is not run; ``stored(y0, y1, x0, x1)`` gives such a
    cell's block, handed to ``put`` exactly when this run would have finished it (so the writer's memory stays
    bounded). Every other cell gets the same bits as without ``done``: all of its tiles run, in the same order.

    Returns the seconds spent in the model.
    """
    run = TileRun.create(scene, model, grid, edge)
    cells = grid.cells_by_tile()
    row_segs = {i: [seg for seg in grid.rows.segments if i in seg[2]] for i in range(len(grid.rows))}
    col_segs = {j: [seg for seg in grid.cols.segments if j in seg[2]] for j in range(len(grid.cols))}
    pending: dict[tuple[int, int], np.ndarray] = {}  # partly blended cells, float64 (C, h, w)
    needed = None
    if done:
        needed = {(r, c) for ya, _, ycover in grid.rows.segments for xa, _, xcover in grid.cols.segments
                  if (ya, xa) not in done for r in ycover for c in xcover}
    model_seconds = 0.0
    total = len(grid)
    if progress is not None:
        progress(0, total, "starting")
    for k, tile in enumerate(grid.tiles()):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled")
        if needed is not None and (tile.row, tile.col) not in needed:  # every cell it feeds is done
            for c in cells.get((tile.row, tile.col), ()):
                put(c.y0, c.x0, stored(c.y0, c.y1, c.x0, c.x1))
            if progress is not None:
                progress(k + 1, total, f"tile {k + 1}/{total} (done before)")
            continue
        result = enhance_tile(run, tile, scene.read(*run.source(tile)))
        model_seconds += result.seconds
        finishing = {(c.y0, c.x0) for c in cells.get((tile.row, tile.col), ())}
        for ya, yb, ycover in row_segs[tile.row]:
            for xa, xb, xcover in col_segs[tile.col]:
                key = (ya, xa)
                if key in done:
                    if key in finishing:
                        put(ya, xa, stored(ya, yb, xa, xb))
                    continue
                if single_cover(ycover, xcover):
                    value = result.part(ya, yb, xa, xb).astype(np.float64)
                else:
                    part = contribution(grid, result, ya, yb, xa, xb)
                    acc = pending.get(key)
                    if acc is None:
                        acc = pending[key] = np.zeros(part.shape, dtype=np.float64)
                    acc += part
                    if key not in finishing:
                        continue
                    value = pending.pop(key)
                put(ya, xa, finish_cell(scene, value, result, ya, yb, xa, xb))
        if progress is not None:
            progress(k + 1, total, f"tile {k + 1}/{total}")
    if pending:  # a planning bug, never a user error
        raise RuntimeError(f"{len(pending)} output cells were never completed")
    return model_seconds


# ---------------------------------------------------------------------------------------------------------------
# entry points


OVERVIEW_SIDE = 512  # px per side of the decimated scene view a model gets once per scene (e.g. for a caption)


def scene_overview(scene: Scene) -> np.ndarray:
    """A decimated view ``(C, h, w)`` of the whole scene, scaled to the model's range, nodata filled."""
    f = max(1, -(-max(scene.height, scene.width) // OVERVIEW_SIDE))
    return _scaled(scene, scene.read_decimated(f))[0]


SAMPLE_SIDE = 256  # px per side of each full-resolution window of scene_sample


def scene_sample(scene: Scene) -> np.ndarray:
    """Full-resolution windows of the scene, scaled to the model's range, side by side ``(C, h, w)``: the whole scene
    when it is small, else five windows of ``SAMPLE_SIDE`` (the centre and the centres of the quarters). Windows
    start on multiples of 8 px, so an 8x8 block grid (JPEG's) keeps one phase across them."""
    side = SAMPLE_SIDE
    if scene.height <= 2 * side and scene.width <= 2 * side:
        return _scaled(scene, scene.read(np.arange(scene.height), np.arange(scene.width)))[0]
    hs, ws = min(side, scene.height), min(side, scene.width)
    parts = []
    for fy, fx in ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):
        y0 = max(0, min(int(fy * scene.height - hs / 2), scene.height - hs)) // 8 * 8
        x0 = max(0, min(int(fx * scene.width - ws / 2), scene.width - ws)) // 8 * 8
        parts.append(_scaled(scene, scene.read(np.arange(y0, y0 + hs), np.arange(x0, x0 + ws)))[0])
    return np.concatenate(parts, axis=2)


def _start(model: SRModel, scene: Scene, config: EnhanceConfig) -> None:
    """Per-run model setup after planning: weights, threads, the scene-level hook."""
    model.prepare()
    _set_threads(config)
    gsd = float(np.mean(scene.gsd)) * 1.0 / config.scale if scene.georeferenced else None
    sample = scene_sample(scene) if model.reads_sample else None
    model.begin_scene(scene_overview(scene), gsd=gsd, grid=scene_grid(scene), sample=sample)


def prepare_run(scene: Scene, config: EnhanceConfig, model: SRModel | None = None, *,
                private: bool = False) -> TileRun:
    """Everything before the first tile: the model (``config.model``, or ``model``) configured, the grid planned,
    weights loaded, the model's ``begin_scene`` run once with the scene's overview.

    ``private``: run the scene on a shallow copy of the model, so its settings and scene state (e.g. the mmsr
    caption) are this run's own while loaded weights are shared; a lazy graph that runs later needs that.
    """
    model = model or get_model(config.model, device=config.device)
    model.configure(config)  # before planning: a checkpoint may set the model's scale and tile
    grid = plan((scene.height, scene.width), model, config)
    if private:
        model.prepare()
        model = copy.copy(model)
    _start(model, scene, config)
    return TileRun.create(scene, model, grid, edge_mode(model, config))


def _set_threads(config: EnhanceConfig) -> None:
    import torch

    n = config.threads or os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def output_tags(model: SRModel, config: EnhanceConfig, src: Path | None) -> dict[str, str]:
    prov = model.provenance()
    source = f"{prov['package']}=={prov['version']} ({prov['registry']}, sha256 {prov['sha256'][:16]})" if prov else "none (no weights)"
    params = config.to_dict() | {"model": model.name}
    return {
        "GEOSR_VERSION": __version__,
        "GEOSR_MODEL": model.name,
        "GEOSR_WEIGHTS_SOURCE": source,
        "GEOSR_PARAMETERS": json.dumps(params, sort_keys=True),
        "GEOSR_INPUT": src.name if src is not None else "",
        **({"GEOSR_CAPTION": model.caption} if getattr(model, "caption", "") else {}),
        **({"GEOSR_ROUTE": model.route_note} if getattr(model, "route_note", "") else {}),
        **({"GEOSR_CONDITIONS": json.dumps(model.condition_sources, sort_keys=True)}
           if getattr(model, "condition_sources", None) else {}),
    }


def enhance_scene(src, dst, config: EnhanceConfig | None = None, *, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> EnhanceResult:
    """Enhance the raster at ``src`` and write a georeferenced GeoTIFF (or COG) at ``dst``.

    The output keeps the input's CRS, dtype, nodata footprint, band descriptions and colour interpretation; its
    transform is the input's times ``Affine.scale(1 / scale)``. ``dst`` appears only when complete.

    Resumable (``config.resume``, the default): each finished output cell is also written to the partial store
    beside the output (:mod:`geosr.store`), removed once ``dst`` is complete. A run that dies (``kill -9``, the
    OOM killer, power loss, an unexpected exception) or is interrupted (Ctrl-C: ``KeyboardInterrupt``) leaves it
    (when it holds a cell), and the same call again skips the cells in it. A run cancelled (``should_stop``, or
    :class:`Terminated`: SIGTERM in the CLI) or stopped by a diagnosed error (:class:`GeosrError`: unreadable
    input, full disk, ...) removes it: nothing is left behind, as without resume.

    One run per output: from the output check until it ends, the run holds ``dst``'s lock
    (:class:`geosr.io.write.OutputLock`, ``OUT.geosr-lock``); a second run of the same output is refused
    (:class:`OutputError`) while the first is alive, and takes the lock over when it was killed.
    """
    import rasterio

    from .io.write import (BlockWriter, OutputLock, atomic_output, check_output_path, remove_stale_partials,
                           set_band_metadata, tagged_profile)

    config = config or EnhanceConfig()
    src, dst = Path(src), Path(dst)
    if config.scheduler is not None or config.workers is not None:  # dask (threads or a cluster), resumable
        from .cluster import enhance_resumable

        return enhance_resumable(src, dst, config, progress=progress, should_stop=should_stop)
    t_start = time.perf_counter()
    check_output_path(src, dst, overwrite=config.overwrite)
    # one run per output (its temporary GeoTIFF, its partial store) until this one ends; GDAL's block cache would
    # otherwise keep read and written blocks (up to 5% of RAM): bound it for the run
    with OutputLock(dst), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        scene = open_scene(src, bands=config.bands, nodata=config.nodata)
        run = prepare_run(scene, config)
        model, grid = run.model, run.grid
        out_h, out_w = grid.out_shape
        tags = output_tags(model, config, src)
        transform = output_transform(scene.transform, config.scale) if scene.georeferenced else None
        profile = tagged_profile(height=out_h, width=out_w, count=scene.count, dtype=scene.dtype, crs=scene.crs,
                                 transform=transform, nodata=scene.nodata)
        log.info("enhancing %s (%dx%d, %d bands) x%d with %s in %d tiles", src, scene.width, scene.height,
                 scene.count, config.scale, model.name, len(grid))
        store, cells, done, done_at, needed = None, None, set(), set(), len(grid)
        try:  # from here on the store (once open) is removed or kept as the run ends (see above)
            if config.resume:
                from .store import CellWriter, PartialStore, log_start, needed_tiles, run_settings, store_path

                rows, cols = grid.rows.segments, grid.cols.segments
                settings = run_settings(src, config, model, out_shape=(out_h, out_w), count=scene.count,
                                        dtype=scene.dtype, cells=(len(rows), len(cols)))
                existed = store_path(dst).exists()
                store = PartialStore.open(dst, settings, restart=config.restart)
                if existed:  # an earlier run of this output died: drop the temporary GeoTIFF it left
                    remove_stale_partials(dst)
                done = store.done()
                needed = len(needed_tiles(grid, done))
                log_start(store, done=len(done), cells=len(rows) * len(cols), tiles=len(grid), needed=needed)
                cell_of = {(ya, xa): (p, q) for p, (ya, _, _) in enumerate(rows) for q, (xa, _, _) in enumerate(cols)}
                done_at = {(rows[p][0], cols[q][0]) for p, q in done}
                cells = CellWriter(store)  # compresses and writes cells beside the model
            with atomic_output(dst, overwrite=config.overwrite, cog=config.cog) as tmp:
                with rasterio.open(tmp, "w", **profile) as ds:
                    set_band_metadata(ds, descriptions=scene.descriptions, colorinterp=scene.colorinterp, tags=tags)
                    writer = BlockWriter(ds, dtype=scene.dtype)

                    def put(y0, x0, block):  # a finished cell (a new array): to the store and the GeoTIFF
                        if cells is not None and (y0, x0) not in done_at:
                            cells.put(*cell_of[(y0, x0)], block)
                        writer.put(y0, x0, block)

                    def stored(y0, y1, x0, x1):  # a cell an earlier run finished
                        return store.read_cell(*cell_of[(y0, x0)], (scene.count, y1 - y0, x1 - x0), scene.dtype)

                    model_seconds = run_tiles(scene, model, grid, put, edge=run.edge, progress=progress,
                                              should_stop=should_stop, done=done_at, stored=stored)
                    if writer.pending:
                        raise RuntimeError("output blocks left unwritten")
                    if cells is not None:
                        cells.close()  # every cell in place (or its write error raised) before the rename
        except (GeosrError, Terminated):  # cancelled or a diagnosed error: leave nothing
            if cells is not None:
                cells.abort()
            if store is not None:
                store.remove()
            raise
        except BaseException as err:  # died, or Ctrl-C: keep the finished cells to resume
            if cells is not None:
                cells.abort()  # returns once the cell being written is in place (or dropped)
            if store is not None:
                kept = store.count()
                if not kept:
                    store.remove()
                elif isinstance(err, KeyboardInterrupt):  # the caller was there: the CLI says it in one line
                    log.info("interrupted: %d finished output cells are kept in %s: rerun the same command to "
                             "resume", kept, store.path)
                else:
                    log.warning("%d finished output cells are kept in %s: rerun the same command to resume",
                                kept, store.path)
            raise
        if store is not None:
            store.remove()
            log.info("wrote %s; removed the partial store", dst)
    return EnhanceResult(path=dst, shape=(scene.count, out_h, out_w), tiles=len(grid),
                         seconds=time.perf_counter() - t_start, model_seconds=model_seconds, config=config, tags=tags,
                         resumed_cells=len(done), skipped_tiles=len(grid) - needed)


def enhance_array(array: np.ndarray, config: EnhanceConfig | None = None, *, nodata=None, model: SRModel | None = None,
                  progress: Progress | None = None) -> np.ndarray:
    """Enhance an in-memory ``(band, y, x)`` (or ``(y, x)``) array with the same tiling as files.

    ``model`` overrides ``config.model`` with a model object (e.g. one built in a test).
    """
    from .io.read import scene_from_array

    config = config or EnhanceConfig()
    scene = scene_from_array(array, nodata=nodata if nodata is not None else config.nodata)
    run = prepare_run(scene, config, model)
    out = np.empty((scene.count, *run.grid.out_shape), dtype=scene.dtype)

    def put(y0, x0, block):
        out[:, y0:y0 + block.shape[1], x0:x0 + block.shape[2]] = block

    run_tiles(scene, run.model, run.grid, put, edge=run.edge, progress=progress)
    return out if np.ndim(array) == 3 else out[0]
