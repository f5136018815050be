"""Scaling out (issue 8): wall time of ``enhance_scene`` on a LocalCluster of 1 and of 2 workers, the scheduler's
overhead per tile from dask's task stream, and the arithmetic for a national mosaic.

Each configuration runs on an already started cluster (``scheduler=<address>``), so cluster start-up is not
timed; the first run on a cluster (model built on each worker) is a warm-up and not timed (``--no-warmup``: it is). Per
configuration ``--repeat`` timed runs, the minimum reported. From the task stream (``distributed.get_task_stream``,
the data behind the dashboard's task-stream plot):

- ``tile_compute_s``: mean compute time of the tile tasks (the model, per tile);
- ``busy_s``: sum of every task's compute time; ``span_s``: first task start to last task end;
- scheduler overhead per tile = (span_s x worker threads - busy_s) / tiles: worker time that no task used
  (scheduling, transfers, idling at the end), charged to the tiles.

    python benchmarks/distributed_scaling.py [--model rrdn-gan] [--size 256] [--tile 128] [--repeat 2]
           [--json benchmarks/results/distributed_scaling.json] [--no-warmup] [--pairs N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_scene(path: Path, size: int) -> Path:
    """The top-left ``size`` x ``size`` px of the Zurich scene (real imagery), georeferenced."""
    import rasterio
    from rasterio.windows import Window

    from geosr.config import data_dir

    with rasterio.open(data_dir() / "scenes" / "zurich_0p5m_rgb.tif") as src:
        win = Window(0, 0, min(size, src.width), min(size, src.height))
        profile = src.profile | dict(width=int(win.width), height=int(win.height),
                                     transform=src.window_transform(win), tiled=True, blockxsize=256, blockysize=256)
        data = src.read(window=win)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def stream_stats(records: list[dict], n_threads: int, n_tiles: int) -> dict:
    starts, stops, busy, tiles = [], [], 0.0, []
    for r in records:
        for ss in r["startstops"]:
            if ss["action"] != "compute":
                continue
            starts.append(ss["start"])
            stops.append(ss["stop"])
            busy += ss["stop"] - ss["start"]
            if "geosr-tile" in str(r["key"]):
                tiles.append(ss["stop"] - ss["start"])
    span = max(stops) - min(starts)
    return dict(tasks=len(records), tile_tasks=len(tiles), tile_compute_s=float(np.mean(tiles)),
                busy_s=busy, span_s=span, overhead_per_tile_s=(span * n_threads - busy) / n_tiles)


def measure(scene: Path, out: Path, config_kw: dict, workers: int, threads: int | None, repeat: int,
            warmup: bool) -> dict:
    from distributed import Client, LocalCluster, get_task_stream

    from geosr.config import EnhanceConfig
    from geosr.scene import enhance_scene

    runs = []
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        config = EnhanceConfig(**config_kw, scheduler=cluster.scheduler_address, threads=threads, overwrite=True)
        if warmup:
            enhance_scene(scene, out, config)  # each worker builds the model (else: inside the first timed run)
        for _ in range(repeat):
            with get_task_stream(client) as ts:
                t0 = time.perf_counter()
                result = enhance_scene(scene, out, config)
                wall = time.perf_counter() - t0
            runs.append(dict(wall_s=wall, **stream_stats(ts.data, workers, result.tiles)))
            # set by geosr's worker plugin, registered by the run
            torch_threads = sorted(client.run(lambda dask_worker: dask_worker.geosr_torch_threads).values())
            print(f"  {workers} worker(s), torch threads {torch_threads}: {wall:.1f} s "
                  f"(tile {runs[-1]['tile_compute_s']:.2f} s, overhead/tile {runs[-1]['overhead_per_tile_s']:.3f} s)",
                  flush=True)
    best = min(runs, key=lambda r: r["wall_s"])
    return dict(workers=workers, torch_threads=torch_threads, tiles=result.tiles, runs=runs, best=best)


def alternate(scene: Path, out: Path, config_kw: dict, pairs: int) -> list[dict]:
    """1 worker x 1 torch thread and 2 workers x 1, run alternately on two clusters started once, so load that
    other processes put on a shared machine drifts into both alike; one speed-up per pair."""
    from distributed import Client, LocalCluster

    from geosr.config import EnhanceConfig
    from geosr.scene import enhance_scene

    out_pairs = []
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as c1, \
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as c2:
        configs = [EnhanceConfig(**config_kw, scheduler=c.scheduler_address, threads=1, overwrite=True)
                   for c in (c1, c2)]
        for config in configs:  # warm-up: models built on every worker
            enhance_scene(scene, out, config)
        for i in range(pairs):
            walls = []
            for config in configs:
                t0 = time.perf_counter()
                enhance_scene(scene, out, config)
                walls.append(time.perf_counter() - t0)
            out_pairs.append(dict(one_worker_s=walls[0], two_workers_s=walls[1], speedup=walls[0] / walls[1],
                                  load_average=os.getloadavg()))
            print(f"  pair {i + 1}: 1 worker {walls[0]:.1f} s, 2 workers {walls[1]:.1f} s: "
                  f"{walls[0] / walls[1]:.2f}x", flush=True)
    return out_pairs


def mosaic(tile_s: float, tile: int, overlap: int, *, area_km2: float = 1e5, gsd_m: float = 0.5, scale: int = 4,
           bands: int = 3, bytes_per_sample: int = 1, workers: int = 2, hours_budget: float = 24.0) -> dict:
    """What a mosaic of ``area_km2`` at input GSD ``gsd_m`` needs, from a measured time per tile."""
    px = area_km2 * 1e6 / gsd_m ** 2  # input pixels
    core = (tile - overlap) ** 2  # new input px per tile (tiles step by tile - overlap)
    tiles = px / core
    cpu_s = tiles * tile_s  # worker-seconds at the measured per-worker speed
    out_bytes = px * scale ** 2 * bands * bytes_per_sample
    return dict(input_px=px, tiles=tiles, worker_hours=cpu_s / 3600, hours_with_workers=cpu_s / 3600 / workers,
                workers_for_budget=int(np.ceil(cpu_s / 3600 / hours_budget)), hours_budget=hours_budget,
                store_bytes=out_bytes, output_bytes_uncompressed=out_bytes, bytes_written_max=2 * out_bytes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rrdn-gan")
    ap.add_argument("--size", type=int, default=256, help="px per side of the Zurich crop")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--pairs", type=int, default=0,
                    help="only alternate 1 and 2 workers (1 torch thread each) this many times, after a warm-up")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="no untimed first run: the per-worker model build is then inside the timing")
    args = ap.parse_args()

    from geosr.models import get_model
    from geosr.tiling import default_overlap

    model = get_model(args.model)
    overlap = default_overlap(model.receptive_field)
    cores = os.cpu_count() or 1
    kw = dict(model=args.model, scale=4, tile=args.tile)
    with tempfile.TemporaryDirectory() as tmp:
        scene = make_scene(Path(tmp) / "scene.tif", args.size)
        out = Path(tmp) / "out.tif"
        load = [os.getloadavg()]
        if args.pairs:
            pairs = alternate(scene, out, kw, args.pairs)
            speedups = sorted(p["speedup"] for p in pairs)
            print(f"speed-up 2 vs 1 worker, median of {len(pairs)} alternated pairs: "
                  f"{speedups[len(speedups) // 2]:.2f}x")
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(dict(command=" ".join(sys.argv), model=args.model, size=args.size,
                                                     tile=args.tile, cores=cores, pairs=pairs), indent=1))
                print(f"wrote {args.json}")
            return 0
        print(f"{args.model}, {args.size} px crop of Zurich, tile {args.tile} (overlap {overlap}), {cores} cores")
        one_all = measure(scene, out, kw, 1, None, args.repeat, args.warmup)  # 1 worker, torch on every core
        one_one = measure(scene, out, kw, 1, 1, args.repeat, args.warmup)  # 1 worker, 1 torch thread: per-worker scaling
        two = measure(scene, out, kw, 2, None, args.repeat, args.warmup)  # 2 workers, cores // 2 torch threads each
        load.append(os.getloadavg())
    w1, w1t1, w2 = (m["best"]["wall_s"] for m in (one_all, one_one, two))
    tile_s = two["best"]["tile_compute_s"]  # seconds per tile on one worker with cores // 2 threads
    report = dict(
        command=" ".join(sys.argv), warmup=args.warmup, model=args.model, size=args.size, tile=args.tile, overlap=overlap, cores=cores, load_average=load,
        one_worker_all_threads=one_all, one_worker_one_thread=one_one, two_workers=two,
        speedup_2_workers_vs_1_worker_all_threads=w1 / w2, speedup_2_workers_vs_1_worker_1_thread=w1t1 / w2,
        mosaic_100000_km2_0p5m_input_x4=mosaic(tile_s * (256 / args.tile) ** 2, 256, overlap),
        mosaic_note="per-tile time scaled from the measured tile to the default 256 px tile by area; one worker = "
                    f"one process with {two['torch_threads'][0]} torch thread(s) on this machine's cores",
    )
    print(f"speed-up 2 workers vs 1 worker (all threads): {w1 / w2:.2f}x; vs 1 worker (1 thread): {w1t1 / w2:.2f}x")
    print(f"scheduler overhead per tile (2 workers): {two['best']['overhead_per_tile_s'] * 1000:.0f} ms, "
          f"tile compute {tile_s:.2f} s")
    print(json.dumps(report["mosaic_100000_km2_0p5m_input_x4"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
