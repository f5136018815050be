"""The worker side of a dask.distributed run (imported only there and by :mod:`geosr.cluster`).

Models do not pickle (open locks, compiled graphs) and should not travel: a worker builds the run's model itself,
once, from its own weights cache (``~/.cache/geosr/weights`` or ``$GEOSR_CACHE``), and keeps it for every tile
of the run. The graph's run key (see :mod:`geosr.lazy`) holds a :class:`RunSpec` (the detached scene, the grid,
the settings, the scene overview for the model's ``begin_scene``) wrapped in a :class:`RunRef`: small, cheap to
move between workers. A tile task asking it for the model calls :func:`build_run`, which builds the run once per
process (on a worker thread, never while a message is deserialised) and caches it by the run's token.

:class:`GeosrWorkerPlugin` sets each worker's torch threads so that torch and dask do not oversubscribe cores:
``cores // (workers on the host x dask threads per worker)``, at least 1, unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from .config import EnhanceConfig
from .io.read import Scene
from .scene import TileRun, band_groups, scene_grid
from .tiling import TileGrid

log = logging.getLogger(__name__)

KEEP_RUNS = 2  # runs (models with their scene state) a worker keeps; older ones are dropped
_RUNS: "OrderedDict[str, TileRun]" = OrderedDict()
_LOCK = threading.Lock()
MODEL_BUILDS = 0  # how many times this process built a run's model (tests check: once per worker)


@dataclass
class RunSpec:
    """Everything a worker needs to rebuild a run's :class:`~geosr.scene.TileRun`: small and picklable."""

    token: str  # the lazy graph's token: same settings, same scene -> same run
    scene: Scene  # detached (no pixels, no file handle): scaling, nodata, dtype, georeferencing, path
    grid: TileGrid
    edge: str
    config: EnhanceConfig
    overview: np.ndarray  # (C, h, w) the scene overview the client's model got in begin_scene
    gsd: float | None
    sample: np.ndarray | None = None  # (C, h, w) the full-resolution windows it got (geosr.scene.scene_sample)


class RunRef:
    """What the graph's run key holds on workers: the spec only, so it pickles small and deserialising it never
    loads anything. The model (and the lock that serialises calls to it) come from :func:`build_run` on first use,
    inside a tile task on a worker thread: once per process, whichever copies of the reference a worker holds."""

    def __init__(self, spec: RunSpec):
        self.spec = spec

    scene = property(lambda self: self.spec.scene)
    grid = property(lambda self: self.spec.grid)
    edge = property(lambda self: self.spec.edge)
    model = property(lambda self: build_run(self.spec).model)
    groups = property(lambda self: build_run(self.spec).groups)
    has_nodata = property(lambda self: build_run(self.spec).has_nodata)
    lock = property(lambda self: build_run(self.spec).lock)

    def source(self, tile):
        return tile.source(self.scene.height, self.scene.width, self.edge)


def build_run(spec: RunSpec) -> TileRun:
    """This process's run for ``spec``: built once (model configured, loaded, ``begin_scene``), then cached."""
    global MODEL_BUILDS
    from .models import get_model

    with _LOCK:
        run = _RUNS.get(spec.token)
        if run is not None:
            _RUNS.move_to_end(spec.token)
            return run
        shared = get_model(spec.config.model, device=spec.config.device)
        shared.configure(spec.config)
        shared.prepare()
        model = copy.copy(shared)  # this run's settings and scene state; weights shared
        model.begin_scene(spec.overview, gsd=spec.gsd, grid=scene_grid(spec.scene), sample=spec.sample)
        scene = spec.scene
        run = TileRun(scene=scene, model=model, grid=spec.grid, edge=spec.edge, groups=band_groups(model, scene.alpha),
                      has_nodata=scene.nodata is not None or np.dtype(scene.dtype).kind == "f")
        MODEL_BUILDS += 1
        log.info("worker %d: built %s for run %s", os.getpid(), model.name, spec.token[:8])
        _RUNS[spec.token] = run
        while len(_RUNS) > KEEP_RUNS:
            _RUNS.popitem(last=False)
        return run


def remote_run_task(token: str, run: TileRun, overview: np.ndarray, gsd: float | None, config: EnhanceConfig,
                    sample: np.ndarray | None = None):
    """The graph task that stands for ``run`` on workers: ``(RunRef, RunSpec)``."""
    spec = RunSpec(token=token, scene=run.scene, grid=run.grid, edge=run.edge, config=config,
                   overview=np.ascontiguousarray(overview, dtype=np.float32), gsd=gsd,
                   sample=None if sample is None else np.ascontiguousarray(sample, dtype=np.float32))
    return (RunRef, spec)


class GeosrWorkerPlugin(WorkerPlugin):
    """Sets torch's thread count on every worker (and on workers that join or restart later)."""

    name = "geosr-threads"

    def __init__(self, threads: int | None, workers_per_host: dict[str, int]):
        self.threads = threads
        self.workers_per_host = dict(workers_per_host)

    def setup(self, worker) -> None:
        import torch

        host = worker.address.rsplit(":", 1)[0]
        dask_threads = max(1, int(getattr(worker.state, "nthreads", 1) or 1))
        sharing = max(1, self.workers_per_host.get(host, 1)) * dask_threads
        n = self.threads or max(1, (os.cpu_count() or 1) // sharing)
        torch.set_num_threads(n)
        worker.geosr_torch_threads = n
        log.info("worker %s: %d torch thread(s), %d dask thread(s)", worker.address, n, dask_threads)
