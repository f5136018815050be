"""Scaling out and resuming (geosr.cluster, geosr.store, geosr.worker): same bits as the in-process run on a
local cluster, after SIGKILL of the process, after SIGKILL of a worker; changed settings refused; a dead
scheduler address fails fast."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from conftest import write_synthetic_scene

from geosr.config import EnhanceConfig
from geosr.errors import ConfigError
from geosr.scene import Cancelled, enhance_scene
from geosr.store import PartialStore, fingerprint, run_settings, store_path

pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parent.parent
# lanczos (torch, no weights) on a synthetic 1024 x 1024 scene in 81 tiles of 128 px (289 output cells):
# long enough (several seconds) to be interrupted, short enough for a test
SYN = dict(model="lanczos", tile=128, scale=4)


def _read(path: Path) -> tuple[bytes, dict]:
    with rasterio.open(path) as ds:
        return ds.read().tobytes(), dict(crs=ds.crs, transform=ds.transform, nodata=ds.nodata, shape=ds.shape)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(input path, reference output bytes and metadata from the default in-process run)."""
    folder = tmp_path_factory.mktemp("syn")
    src = write_synthetic_scene(folder / "syn.tif")
    ref = folder / "ref.tif"
    enhance_scene(src, ref, EnhanceConfig(**SYN))
    return src, *_read(ref)


def _cells(dst: Path) -> int:
    cells = store_path(dst) / "cells"
    return sum(1 for n in os.listdir(cells) if n.endswith(".npy.gz")) if cells.is_dir() else 0


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "geosr", *map(str, args)]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONWARNINGS="ignore")


def test_local_cluster_of_two_workers_is_bit_identical(data, tmp_path):
    src = data / "fixtures/landsat7_bahamas_300m_rgb.tif"  # nodata 0, 72 tiles of 96 px
    config = EnhanceConfig(model="bicubic", tile=96, scale=2)
    enhance_scene(src, tmp_path / "single.tif", config)
    result = enhance_scene(src, tmp_path / "cluster.tif", EnhanceConfig(**config.to_dict() | {"workers": 2}))
    expected, meta = _read(tmp_path / "single.tif")
    got, got_meta = _read(tmp_path / "cluster.tif")
    assert result.tiles == 72 and result.resumed_cells == 0
    assert math.isfinite(result.model_seconds) and result.model_seconds > 0  # collected from the workers' tasks
    assert got == expected and got_meta == meta
    assert not store_path(tmp_path / "cluster.tif").exists()  # the store is gone once the GeoTIFF is written


def test_sigkill_then_rerun_resumes_bit_identical(synthetic, tmp_path):
    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    cmd = _cli("-v", "enhance", src, "-o", dst, "--model", SYN["model"], "--tile", SYN["tile"], "--scale",
               SYN["scale"], "--scheduler", "threads", "-q")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _cells(dst) < 40 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = _cells(dst)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < done < 289, f"kill landed outside the run ({done} of 289 cells): make the scene bigger"
    assert not dst.exists()  # the final file appears only when complete

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = [line for line in rerun.stderr.splitlines() if "resuming" in line]
    assert len(resumed) == 1 and f": {done} of 289 output cells already done, skipped" in resumed[0], rerun.stderr
    assert f"resumed: {done} output cells were already done" in rerun.stdout
    got, got_meta = _read(dst)
    assert got == expected and got_meta == meta
    assert not store_path(dst).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]  # no temporary files left


def test_worker_killed_midway_job_completes_identically(synthetic, tmp_path):
    from distributed import Client, LocalCluster

    import geosr.worker

    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    killed = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]

        def kill_one_worker():
            deadline = time.monotonic() + 120
            while _cells(dst) < 30 and time.monotonic() < deadline:
                time.sleep(0.02)
            killed["cells"] = _cells(dst)
            killed["output_existed"] = dst.exists()
            os.kill(victim, signal.SIGKILL)

        watcher = threading.Thread(target=kill_one_worker, daemon=True)
        watcher.start()
        result = enhance_scene(src, dst, EnhanceConfig(**SYN, scheduler=cluster.scheduler_address))
        watcher.join(10)
        assert 0 < killed["cells"] < 289 and not killed["output_existed"]
        got, got_meta = _read(dst)
        assert got == expected and got_meta == meta
        assert result.resumed_cells == 0
        # the nanny restarted the killed worker; each worker built the model at most once, torch threads
        # = cores // workers (1 dask thread each)
        deadline = time.monotonic() + 30
        while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert victim not in client.run(os.getpid).values()
        builds = client.run(lambda: geosr.worker.MODEL_BUILDS)
        assert sorted(builds.values())[-1] == 1 and set(builds.values()) <= {0, 1}
        threads = client.run(lambda dask_worker: dask_worker.geosr_torch_threads)
        assert set(threads.values()) == {max(1, (os.cpu_count() or 1) // 2)}


def test_resume_computes_only_the_tiles_of_missing_cells(synthetic, tmp_path):
    from dask.callbacks import Callback

    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    config = EnhanceConfig(**SYN, scheduler="threads")
    with pytest.raises(Cancelled):
        enhance_scene(src, dst, config, should_stop=lambda: _cells(dst) >= 150)
    partial = _cells(dst)
    assert 150 <= partial < 289
    ran = []
    with Callback(pretask=lambda key, dsk, state: ran.append(key)):
        result = enhance_scene(src, dst, config)
    tiles = {k for k in ran if isinstance(k, tuple) and str(k[0]).startswith("geosr-tile")}
    stored = {k for k in ran if isinstance(k, tuple) and str(k[0]).startswith("geosr-store")}
    timed = {k for k in ran if isinstance(k, tuple) and str(k[0]).startswith("geosr-seconds")}
    assert result.resumed_cells == partial and len(stored) == 289 - partial
    assert result.skipped_tiles > 0 and len(tiles) == 81 - result.skipped_tiles
    # model time: each tile this run computed is reported once (by one of its cells), skipped tiles never
    assert {k[1:] for k in timed} == {k[1:] for k in tiles}
    assert math.isfinite(result.model_seconds) and result.model_seconds > 0
    assert _read(dst) == (expected, meta)


def test_changed_settings_against_a_partial_store_are_refused(synthetic, tmp_path):
    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    config = EnhanceConfig(**SYN, scheduler="threads")
    with pytest.raises(Cancelled):  # stop after a few cells: a partial store stays
        enhance_scene(src, dst, config, should_stop=lambda: _cells(dst) >= 20)
    partial = _cells(dst)
    assert 0 < partial < 289 and not dst.exists()

    # the CLI with another tile size: one line naming what differs and the fix, exit 1, store untouched
    cmd = _cli("enhance", src, "-o", dst, "--model", SYN["model"], "--tile", 160, "--scale", SYN["scale"],
               "--scheduler", "threads", "-q")
    refused = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geosr: error: ")
    assert "other settings (output.cells, settings.tile)" in lines[0] and "--restart" in lines[0]
    assert _cells(dst) == partial and not dst.exists()

    # the library raises the same; with restart it starts over (the tile-160 output is complete and correct)
    other = EnhanceConfig(**SYN | {"tile": 160}, scheduler="threads")
    with pytest.raises(ConfigError, match="settings.tile"):
        enhance_scene(src, dst, other)
    result = enhance_scene(src, dst, EnhanceConfig(**SYN | {"tile": 160}, scheduler="threads", restart=True))
    assert result.resumed_cells == 0 and not store_path(dst).exists()
    enhance_scene(src, tmp_path / "plain160.tif", EnhanceConfig(**SYN | {"tile": 160}))
    assert _read(dst) == _read(tmp_path / "plain160.tif")


def test_unanswered_scheduler_address_fails_fast_with_one_line(synthetic, tmp_path):
    src = synthetic[0]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    run = subprocess.run(_cli("enhance", src, "-o", tmp_path / "out.tif", "--model", "lanczos",
                              "--scheduler", f"tcp://127.0.0.1:{port}", "-q"),
                         env=_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"geosr: error: --scheduler tcp://127.0.0.1:{port}: no dask scheduler answered")
    assert elapsed < 40  # 10 s connect timeout plus interpreter start
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_scheduler_without_workers_fails_instead_of_waiting_forever(synthetic, tmp_path):
    from distributed import LocalCluster

    from geosr.errors import BackendError

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"the scheduler has no workers \(waited 10 s\); start some with: dask worker "):
            enhance_scene(synthetic[0], tmp_path / "o.tif", EnhanceConfig(**SYN, scheduler=cluster.scheduler_address))
        assert time.monotonic() - t0 < 30
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, match", [(dict(workers=0), "at least 1"), (dict(scheduler="localhost"), "tcp://"),
                                        (dict(workers=2, scheduler="threads"), "one of them")])
def test_bad_cluster_settings(synthetic, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        enhance_scene(synthetic[0], tmp_path / "o.tif", EnhanceConfig(model="lanczos", **bad))


def test_store_fingerprint_and_atomic_cells(synthetic, tmp_path):
    from geosr.models import get_model

    src = synthetic[0]
    model = get_model("lanczos")
    kw = dict(out_shape=(4096, 4096), count=3, dtype="uint8", cells=(17, 17))
    base = run_settings(src, EnhanceConfig(**SYN), model, **kw)
    # what does not change pixels does not change the fingerprint; what does, does
    same = run_settings(src, EnhanceConfig(**SYN, cog=True, threads=1, overwrite=True, workers=3), model, **kw)
    assert fingerprint(same) == fingerprint(base)
    for change in (dict(scale=2), dict(edge="reflect"), dict(bands=(1, 2)), dict(nodata=5.0), dict(model="bicubic")):
        assert fingerprint(run_settings(src, EnhanceConfig(**SYN | change), model, **kw)) != fingerprint(base)

    dst = tmp_path / "o.tif"
    store = PartialStore.open(dst, base)
    block = np.arange(3 * 4 * 5, dtype="uint8").reshape(3, 4, 5)
    store.write_cell(0, 1, block)
    (store.cells_dir / "0_2.npy.tmp-123-abcd").write_bytes(b"half a cell")  # a writer killed mid-write
    assert store.done() == {(0, 1)}
    assert PartialStore.open(dst, base).done() == {(0, 1)}  # reopened: resumed, temporary file cleaned
    assert sorted(os.listdir(store.cells_dir)) == ["0_1.npy.gz"]
    assert store.read_cell(0, 1, (3, 4, 5), "uint8").tobytes() == block.tobytes()
    with pytest.raises(Exception, match="expected uint8 \\(3, 4, 6\\)"):
        store.read_cell(0, 1, (3, 4, 6), "uint8")
    with pytest.raises(ConfigError, match=r"other settings \(settings.scale\)"):
        PartialStore.open(dst, run_settings(src, EnhanceConfig(**SYN | {"scale": 2}), model, **kw))
