"""Scaling out and surviving faults: ``enhance_scene``'s engine when ``scheduler`` or ``workers`` is set.

1. take the output's lock (:class:`geosr.io.write.OutputLock`: one run per output, until this one ends); open the
   scene and build the lazy graph (:mod:`geosr.lazy`: one task per tile, one per output cell, keys
   deterministic); for a cluster the graph carries a small run spec and each worker builds the model once
   (:mod:`geosr.worker`); workers get the input's path, never an open dataset;
2. open the partial store beside the output (:mod:`geosr.store`): the same run's store is resumed, another run's
   is refused (or discarded with ``restart``); cells already there are skipped, and only the tiles the missing
   cells need are computed (the graph is culled to the missing cells' store tasks);
3. run: ``scheduler="threads"`` on dask's local threaded scheduler, ``workers=N`` on a LocalCluster of N worker
   processes (1 dask thread each, torch threads = cores // N), ``scheduler="tcp://host:port"`` on an existing
   cluster (connect timeout :data:`CONNECT_TIMEOUT`); each cell task's result is written by the worker into the
   store (atomic rename) — so the store must be on a filesystem the workers and this process share;
4. a final pass writes the GeoTIFF (or COG) from the store through the atomic writer (temporary file, rename:
   the output appears only when complete), then removes the store.

A killed worker is survived by dask (its tasks are rescheduled, lost tile results recomputed); a killed client
leaves the store, and rerunning the same command resumes it. Results are bit-identical to the in-process run.
Each computed tile's model time comes back with one store task's result (``EnhanceResult.model_seconds``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .config import EnhanceConfig
from .errors import BackendError, ConfigError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10  # seconds to wait for a scheduler address to answer


def check_settings(config: EnhanceConfig) -> None:
    if config.workers is not None and config.scheduler is not None:
        raise ConfigError(f"--workers {config.workers} and --scheduler {config.scheduler}: give one of them "
                          "(--workers starts a local cluster, --scheduler uses an existing one)")
    if config.workers is not None and int(config.workers) < 1:
        raise ConfigError(f"--workers {config.workers}: must be at least 1")
    if not config.resume:
        raise ConfigError("--no-resume: --scheduler and --workers always collect cells in the partial store; "
                          "drop one of them")
    s = config.scheduler
    if s is not None and s != "threads" and "://" not in s:
        raise ConfigError(f"--scheduler {s}: give 'threads' (local) or a dask scheduler address like "
                          "tcp://host:8786")


def _write_cell(store, p: int, q: int, block, seconds=()) -> tuple[int, float]:
    """The store task of output cell ``(p, q)``: runs where the cell was computed. Returns the bytes written and
    the model seconds of the tiles this cell reports (``seconds``: each computed tile is reported by one cell)."""
    return store.write_cell(p, q, block), float(sum(seconds))


def _piece_seconds(piece) -> float:
    """A tile's model seconds, from its piece of one cell (a float: only that travels to the store task)."""
    return float(piece.seconds)


@contextlib.contextmanager
def connect(config: EnhanceConfig):
    """A dask.distributed Client: on a new LocalCluster (``workers``) or an existing scheduler (``scheduler``)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise BackendError("--scheduler/--workers need dask.distributed; install it: "
                           "pip install 'geosr[distributed]'") from None
    from .worker import GeosrWorkerPlugin

    # dask.distributed logs every start, connection and shutdown at INFO: shown only when geosr's own INFO is
    chatty = logging.getLogger("distributed")
    level = chatty.level
    with contextlib.ExitStack() as stack:
        if not log.isEnabledFor(logging.INFO):
            chatty.setLevel(logging.WARNING)
            stack.callback(chatty.setLevel, level)
        if config.workers is not None:
            cluster = stack.enter_context(LocalCluster(
                n_workers=int(config.workers), threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster, timeout=CONNECT_TIMEOUT))
        else:
            t0 = time.monotonic()
            try:
                client = Client(config.scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                raise BackendError(f"--scheduler {config.scheduler}: no dask scheduler answered within "
                                   f"{time.monotonic() - t0:.0f} s; start one (dask scheduler) or check the "
                                   "address") from None
            stack.enter_context(client)
            try:  # a scheduler without workers would take the job and never run it
                client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
            except TimeoutError:
                raise BackendError(f"--scheduler {config.scheduler}: the scheduler has no workers (waited "
                                   f"{CONNECT_TIMEOUT} s); start some with: dask worker {config.scheduler}") from None
        per_host: dict[str, int] = {}
        for addr in client.scheduler_info(n_workers=-1)["workers"]:
            host = addr.rsplit(":", 1)[0]
            per_host[host] = per_host.get(host, 0) + 1
        client.register_plugin(GeosrWorkerPlugin(config.threads, per_host))
        yield client


def _compute_threads(writes, *, total: int, done0: int, progress, should_stop) -> float:
    """Run the store tasks on dask's local threaded scheduler; returns the model seconds of the tiles run."""
    import dask
    from dask.callbacks import Callback

    from .scene import Cancelled

    keys = {w.key for w in writes}
    done = [done0]

    def posttask(key, result, dsk, state, worker_id):
        if key in keys:
            done[0] += 1
            if progress is not None:
                progress(done[0], total, f"cell {done[0]}/{total}")
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled; finished cells are kept: rerun the same command to resume")

    # our own pool, so that on cancel or error we return only once the tasks in flight are done: nothing writes
    # into the store after this returns
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="geosr")
    try:
        with Callback(posttask=posttask):
            results = dask.compute(*writes, scheduler="threads", pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return float(sum(seconds for _, seconds in results))


def _compute_distributed(client, writes, *, total: int, done0: int, progress, should_stop) -> float:
    from distributed import as_completed

    from .scene import Cancelled

    futures = client.compute(writes)
    done = done0
    model_seconds = 0.0
    try:
        for future in as_completed(futures):
            model_seconds += future.result()[1]  # re-raises a task's error here
            done += 1
            if progress is not None:
                progress(done, total, f"cell {done}/{total}")
            if should_stop is not None and should_stop():
                raise Cancelled("cancelled; finished cells are kept: rerun the same command to resume")
    finally:
        client.cancel(futures)
    return model_seconds


def enhance_resumable(src: Path, dst: Path, config: EnhanceConfig, *,
                      progress: Callable[[int, int, str], None] | None = None,
                      should_stop: Callable[[], bool] | None = None):
    """:func:`geosr.enhance_scene` with ``scheduler`` or ``workers`` set (see the module docstring)."""
    import rasterio
    from dask import delayed
    from dask.delayed import Delayed

    from .io.read import open_scene
    from .io.write import (BlockWriter, OutputLock, atomic_output, check_output_path, remove_stale_partials,
                           set_band_metadata, tagged_profile)
    from .lazy import enhance_lazy
    from .scene import GDAL_CACHE_MB, Cancelled, EnhanceResult
    from .store import PartialStore, log_start, needed_tiles, run_settings, store_path

    t_start = time.perf_counter()
    check_settings(config)
    check_output_path(src, dst, overwrite=config.overwrite)
    distributed = config.scheduler != "threads"
    # the lock (one run per output) is released last, once this run's cluster is gone
    with OutputLock(dst), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), contextlib.ExitStack() as stack:
        # an existing cluster is asked first (a dead address fails in seconds, before any work);
        # a local one is started only once there is work for it
        client = stack.enter_context(connect(config)) if distributed and config.scheduler else None
        scene = open_scene(src, bands=config.bands, nodata=config.nodata)
        lazy = enhance_lazy(scene, config, remote=distributed)
        grid = lazy.grid
        rows, cols = grid.rows.segments, grid.cols.segments
        out_h, out_w = grid.out_shape
        settings = run_settings(src, config, lazy.run.model, out_shape=(out_h, out_w), count=scene.count,
                                dtype=scene.dtype, cells=(len(rows), len(cols)))
        existed = store_path(dst).exists()
        store = PartialStore.open(dst, settings, restart=config.restart)
        if existed:  # an earlier run of this output died: drop a temporary GeoTIFF its final pass left
            remove_stale_partials(dst)
        done = store.done()
        todo = [(p, q) for p in range(len(rows)) for q in range(len(cols)) if (p, q) not in done]
        total = len(rows) * len(cols)
        needed = needed_tiles(grid, done)
        skipped_tiles = len(grid) - len(needed)
        log_start(store, done=len(done), cells=total, tiles=len(grid), needed=len(needed))
        if progress is not None:
            progress(len(done), total, f"resumed: {len(done)} cells done" if done else "starting")

        model_seconds = 0.0
        if todo:
            blocks = lazy.array.to_delayed(optimize_graph=False)  # (1, P, Q) Delayed cells
            prefix = f"geosr-store-{store.fingerprint[:16]}"
            # each computed tile's model time is reported by the first missing cell it feeds (raster order), read
            # off the tile's piece of that cell by a task that returns a float: the tile result is not kept longer
            reporter: dict[tuple[int, int], list] = {}
            reported: set[tuple[int, int]] = set()
            for p, q in todo:
                for r in rows[p][2]:
                    for c in cols[q][2]:
                        if (r, c) not in reported:
                            reported.add((r, c))
                            piece = Delayed((lazy.piece_name, r, c, p, q), lazy.array.dask, layer=lazy.array.name)
                            reporter.setdefault((p, q), []).append(delayed(_piece_seconds, pure=True)(
                                piece, dask_key_name=(f"geosr-seconds-{store.fingerprint[:16]}", r, c)))
            writes = [delayed(_write_cell, pure=True)(store, p, q, blocks[0, p, q], reporter.get((p, q), []),
                                                      dask_key_name=(prefix, p, q))
                      for p, q in todo]
            if distributed:
                client = client or stack.enter_context(connect(config))
                model_seconds = _compute_distributed(client, writes, total=total, done0=len(done),
                                                     progress=progress, should_stop=should_stop)
            else:
                model_seconds = _compute_threads(writes, total=total, done0=len(done), progress=progress,
                                                 should_stop=should_stop)
            missing = len(todo) - len(set(todo) & store.done())
            if missing:  # a planning or store bug, never a user error
                raise RuntimeError(f"{missing} output cells missing from {store.path} after the run")

        # final pass: the GeoTIFF from the store, written to a temporary file renamed only when complete
        transform = lazy.transform
        profile = tagged_profile(height=out_h, width=out_w, count=scene.count, dtype=scene.dtype, crs=scene.crs,
                                 transform=transform, nodata=scene.nodata)
        with atomic_output(dst, overwrite=config.overwrite, cog=config.cog) as tmp:
            with rasterio.open(tmp, "w", **profile) as ds:
                set_band_metadata(ds, descriptions=scene.descriptions, colorinterp=scene.colorinterp, tags=lazy.tags)
                writer = BlockWriter(ds, dtype=scene.dtype)
                for p, (ya, yb, _) in enumerate(rows):
                    if should_stop is not None and should_stop():
                        raise Cancelled("cancelled; finished cells are kept: rerun the same command to resume")
                    for q, (xa, xb, _) in enumerate(cols):
                        writer.put(ya, xa, store.read_cell(p, q, (scene.count, yb - ya, xb - xa), scene.dtype))
                if writer.pending:
                    raise RuntimeError("output blocks left unwritten")
        store.remove()
    log.info("wrote %s; removed the partial store", dst)
    return EnhanceResult(path=dst, shape=(scene.count, out_h, out_w), tiles=len(grid),
                         seconds=time.perf_counter() - t_start, model_seconds=model_seconds, config=config,
                         tags=lazy.tags, resumed_cells=len(done), skipped_tiles=skipped_tiles)
