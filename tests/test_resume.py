"""Resuming the default (in-process) run: a plain ``geosr enhance`` keeps finished cells in the partial store
(geosr.store) until the GeoTIFF is complete, so after ``kill -9``, a crash or Ctrl-C the same command resumes, with
the same bits; a cancel (``should_stop``, SIGTERM) or a diagnosed error leaves nothing; ``--no-resume`` writes no
store. And the store's compressed cells round-trip bit for bit."""

from __future__ import annotations

import gzip
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from conftest import write_synthetic_scene

from geosr.config import EnhanceConfig
from geosr.errors import ConfigError, OutputError, Terminated
from geosr.io.write import lock_path
from geosr.scene import Cancelled, enhance_scene
from geosr.store import PartialStore, store_path

REPO = Path(__file__).resolve().parent.parent
# lanczos (torch, no weights) on a synthetic 1024 x 1024 scene in 81 tiles of 128 px (289 output cells):
# several seconds, long enough to be killed partway
SYN = dict(model="lanczos", tile=128, scale=4)
CELLS, TILES = 289, 81


def _read(path: Path) -> tuple[bytes, dict]:
    with rasterio.open(path) as ds:
        return ds.read().tobytes(), dict(crs=ds.crs, transform=ds.transform, nodata=ds.nodata, shape=ds.shape,
                                         dtypes=ds.dtypes)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(input path, pixels and metadata of an uninterrupted run without any partial store)."""
    folder = tmp_path_factory.mktemp("syn")
    src = write_synthetic_scene(folder / "syn.tif")
    ref = folder / "ref.tif"
    enhance_scene(src, ref, EnhanceConfig(**SYN, resume=False))
    return src, *_read(ref)


def _cells(dst: Path) -> int:
    cells = store_path(dst) / "cells"
    try:
        return sum(1 for n in os.listdir(cells) if n.endswith(".npy.gz"))
    except FileNotFoundError:
        return 0


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "geosr", *map(str, args)]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONWARNINGS="ignore")


def test_plain_enhance_sigkill_then_rerun_resumes_bit_identical(synthetic, tmp_path):
    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    cmd = _cli("-v", "enhance", src, "-o", dst, "--model", SYN["model"], "--tile", SYN["tile"], "--scale",
               SYN["scale"], "-q")  # no --scheduler, no --workers: the default in-process stream
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _cells(dst) < 60 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = _cells(dst)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < done < CELLS, f"kill landed outside the run ({done} of {CELLS} cells): make the scene bigger"
    assert not dst.exists()  # the final file appears only when complete
    stale = list(tmp_path.glob(".out.tif.*.geosr-part.tif"))
    assert stale, "the killed run left no temporary GeoTIFF (the rerun is meant to remove it)"
    assert lock_path(dst).exists(), "the killed run left no lock (the rerun is meant to take it over)"

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = [line for line in rerun.stderr.splitlines() if "resuming" in line]
    assert len(resumed) == 1, rerun.stderr
    assert f"{lock_path(dst)}: taking over the lock of geosr run pid {proc.pid}" in rerun.stderr
    m = re.search(rf": {done} of {CELLS} output cells already done, skipped; (\d+) of {TILES} tiles skipped, "
                  rf"(\d+) to compute", resumed[0])
    assert m, resumed[0]
    skipped, computed = int(m[1]), int(m[2])
    assert skipped > 0 and skipped + computed == TILES
    assert f"resumed: {done} output cells were already done; {skipped} of {TILES} tiles skipped" in rerun.stdout
    got, got_meta = _read(dst)
    assert got == expected and got_meta == meta
    assert not store_path(dst).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]  # store, lock and the killed run's temporary gone


def test_crash_keeps_the_store_and_rerun_resumes(synthetic, tmp_path, monkeypatch):
    """An unexpected exception (a bug, a torch error) keeps the finished cells; the rerun computes only the rest."""
    import geosr.scene as scene_mod

    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    calls = {"n": 0}
    real = scene_mod._run_model

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(scene_mod, "_run_model", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        enhance_scene(src, dst, EnhanceConfig(**SYN))
    kept = _cells(dst)
    assert 0 < kept < CELLS and not dst.exists()
    assert not list(tmp_path.glob(".out.tif.*.geosr-part*"))  # the GeoTIFF temporary went (atomic_output)
    with gzip.open(next((store_path(dst) / "cells").iterdir())) as f:  # cells are gzipped .npy files
        assert f.read(6) == b"\x93NUMPY"
    monkeypatch.setattr(scene_mod, "_run_model", real)

    result = enhance_scene(src, dst, EnhanceConfig(**SYN))
    assert result.resumed_cells == kept and 0 < result.skipped_tiles < TILES
    assert math.isfinite(result.model_seconds) and result.model_seconds > 0
    assert _read(dst) == (expected, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


def _interrupting(real, at: int, exc):
    calls = {"n": 0}

    def run_model(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            raise exc
        return real(*a, **k)

    return run_model


def test_ctrl_c_keeps_the_store_sigterm_removes_it(synthetic, tmp_path, monkeypatch):
    """In the library: a KeyboardInterrupt (Ctrl-C) keeps the finished cells, as a crash does; Terminated (the
    CLI's SIGTERM, QGIS's Cancel) leaves nothing; a Ctrl-C before any cell is finished leaves nothing either."""
    import geosr.scene as scene_mod

    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    real = scene_mod._run_model
    monkeypatch.setattr(scene_mod, "_run_model", _interrupting(real, 40, Terminated()))
    with pytest.raises(KeyboardInterrupt):
        enhance_scene(src, dst, EnhanceConfig(**SYN))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(scene_mod, "_run_model", _interrupting(real, 1, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        enhance_scene(src, dst, EnhanceConfig(**SYN))
    assert list(tmp_path.iterdir()) == []  # no cell finished: an empty store is not kept
    monkeypatch.setattr(scene_mod, "_run_model", _interrupting(real, 40, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        enhance_scene(src, dst, EnhanceConfig(**SYN))
    kept = _cells(dst)
    assert 0 < kept < CELLS and not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == [store_path(dst).name]  # the temporary GeoTIFF went
    monkeypatch.setattr(scene_mod, "_run_model", real)
    result = enhance_scene(src, dst, EnhanceConfig(**SYN))
    assert result.resumed_cells == kept and _read(dst) == (expected, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def test_plain_enhance_ctrl_c_keeps_the_store_says_so_and_rerun_resumes_bit_identical(synthetic, tmp_path):
    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    cmd = _cli("enhance", src, "-o", dst, "--model", SYN["model"], "--tile", SYN["tile"], "--scale", SYN["scale"],
               "-q")  # the default in-process stream
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Python's Ctrl-C
    try:
        deadline = time.monotonic() + 120
        while _cells(dst) < 20 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    kept = _cells(dst)
    assert 20 <= kept < CELLS, f"Ctrl-C landed outside the run ({kept} of {CELLS} cells)"
    assert err.strip().splitlines() == [f"geosr: interrupted: {kept} of {CELLS} output cells kept in "
                                        f"{store_path(dst)}; rerun the same command to resume (or delete that "
                                        "folder to start over)"]
    assert out == "" and not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == [store_path(dst).name]  # no temporary GeoTIFF left

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed: {kept} output cells were already done" in rerun.stdout
    assert _read(dst) == (expected, meta)  # = the uninterrupted run without a store (resume=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def test_cancel_and_diagnosed_errors_leave_nothing(synthetic, tmp_path, monkeypatch):
    import geosr.scene as scene_mod

    src = synthetic[0]
    dst = tmp_path / "out.tif"
    with pytest.raises(Cancelled):  # should_stop (QGIS Cancel): the store goes with the temporary GeoTIFF
        enhance_scene(src, dst, EnhanceConfig(**SYN), should_stop=lambda: _cells(dst) >= 20)
    assert list(tmp_path.iterdir()) == []

    real = scene_mod._run_model
    calls = {"n": 0}

    def disk_full(*a, **k):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(scene_mod, "_run_model", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        enhance_scene(src, dst, EnhanceConfig(**SYN))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(scene_mod, "_run_model", real)

    # the disk fills while the store's background thread writes a cell: the same one-line error, nothing left
    real_write = PartialStore.write_cell
    writes = {"n": 0}

    def store_full(self, p, q, block):
        writes["n"] += 1
        if writes["n"] == 50:
            raise OSError(28, "No space left on device")
        return real_write(self, p, q, block)

    monkeypatch.setattr(PartialStore, "write_cell", store_full)
    with pytest.raises(OutputError, match=r"out.tif: write failed \(No space left on device\)"):
        enhance_scene(src, dst, EnhanceConfig(**SYN))
    assert writes["n"] >= 50 and list(tmp_path.iterdir()) == []


def test_no_resume_writes_no_store(synthetic, tmp_path):
    from geosr.cli import _config, build_parser

    src, expected, meta = synthetic
    seen = []

    def progress(done, total, message):
        seen.append(store_path(tmp_path / "a.tif").exists())

    enhance_scene(src, tmp_path / "a.tif", EnhanceConfig(**SYN, resume=False), progress=progress)
    assert seen and not any(seen)
    assert _read(tmp_path / "a.tif") == (expected, meta)
    seen.clear()
    enhance_scene(src, tmp_path / "b.tif", EnhanceConfig(**SYN), progress=lambda d, t, m: seen.append(
        store_path(tmp_path / "b.tif").exists()))
    assert all(seen) and not store_path(tmp_path / "b.tif").exists()

    parser = build_parser()
    assert _config(parser.parse_args(["enhance", "x.tif"])).resume is True
    assert _config(parser.parse_args(["enhance", "x.tif", "--no-resume"])).resume is False
    assert EnhanceConfig.from_yaml("resume: false\n").resume is False
    with pytest.raises(ConfigError, match="--no-resume: --scheduler and --workers always"):
        enhance_scene(src, tmp_path / "c.tif", EnhanceConfig(**SYN, resume=False, scheduler="threads"))


def test_plain_run_resumes_a_dask_runs_store_and_refuses_other_settings(synthetic, tmp_path):
    pytest.importorskip("dask")
    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    with pytest.raises(Cancelled):  # the dask engine keeps its cells on a cancel
        enhance_scene(src, dst, EnhanceConfig(**SYN, scheduler="threads"), should_stop=lambda: _cells(dst) >= 30)
    partial = _cells(dst)
    assert 30 <= partial < CELLS
    with pytest.raises(ConfigError, match=r"other settings \(output.cells, settings.tile\).*--restart"):
        enhance_scene(src, dst, EnhanceConfig(**SYN | {"tile": 160}))
    assert _cells(dst) == partial  # a refused run leaves another run's store alone
    result = enhance_scene(src, dst, EnhanceConfig(**SYN))  # same settings, in-process: resumes it
    assert result.resumed_cells == partial
    assert _read(dst) == (expected, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float32", "float64"])
def test_store_cells_round_trip_compressed(tmp_path, dtype):
    rng = np.random.default_rng(1)
    block = (rng.normal(0, 1000, (3, 37, 53))).astype(dtype)
    if np.dtype(dtype).kind == "f":
        block[0, :5, :5] = np.nan
        block[1, 0, 0] = -0.0
    store = PartialStore.open(tmp_path / "o.tif", {"settings": 1})
    written = store.write_cell(2, 3, block)
    path = store.cell_path(2, 3)
    assert path.name == "2_3.npy.gz" and path.stat().st_size == written
    back = store.read_cell(2, 3, block.shape, dtype)
    assert back.dtype == block.dtype and back.tobytes() == block.tobytes()
    smooth = np.zeros((3, 64, 64), dtype=dtype)
    assert store.write_cell(0, 0, smooth) < smooth.nbytes / 10  # compressed
    # a store written before cells were compressed: its plain .npy cells are still counted and read
    np.save(store.cells_dir / "1_1.npy", block)
    assert store.done() == {(2, 3), (0, 0), (1, 1)}
    assert store.read_cell(1, 1, block.shape, dtype).tobytes() == block.tobytes()
    store.cell_path(0, 0).write_bytes(b"not gzip")  # a damaged cell: one line with the way out
    with pytest.raises(OutputError, match=r"0_0.npy.gz: unreadable cell of the partial store .*--restart"):
        store.read_cell(0, 0, smooth.shape, dtype)


def test_every_cell_done_runs_no_tile(synthetic, tmp_path, monkeypatch):
    """Killed after the last cell but before the rename: the rerun only writes the GeoTIFF from the store."""
    pytest.importorskip("dask")
    import geosr.scene as scene_mod

    src, expected, meta = synthetic
    dst = tmp_path / "out.tif"
    with pytest.raises(Cancelled):  # the dask engine checks should_stop after every task, the last store task too
        enhance_scene(src, dst, EnhanceConfig(**SYN, scheduler="threads"), should_stop=lambda: _cells(dst) >= CELLS)
    assert _cells(dst) == CELLS and not dst.exists()

    def no_model(*a, **k):
        raise AssertionError("a tile ran although every cell was done")

    monkeypatch.setattr(scene_mod, "_run_model", no_model)
    seen = []
    result = enhance_scene(src, dst, EnhanceConfig(**SYN), progress=lambda d, t, m: seen.append((d, t, m)))
    assert (result.resumed_cells, result.skipped_tiles, result.model_seconds) == (CELLS, TILES, 0.0)
    assert [d for d, _, _ in seen] == list(range(TILES + 1)) and seen[-1][2] == f"tile {TILES}/{TILES} (done before)"
    assert _read(dst) == (expected, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


def test_sigterm_of_a_dask_run_says_the_cells_are_kept(synthetic, tmp_path):
    """In-process runs remove their store on SIGTERM ("nothing was written", test_cli); dask runs keep it, and
    the CLI says so instead, as for a Ctrl-C of an in-process run."""
    pytest.importorskip("dask")
    src = synthetic[0]
    dst = tmp_path / "out.tif"
    cmd = _cli("enhance", src, "-o", dst, "--model", SYN["model"], "--tile", SYN["tile"], "--scale", SYN["scale"],
               "--scheduler", "threads", "-q")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _cells(dst) < 20 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    kept = _cells(dst)
    assert err.strip().splitlines() == [f"geosr: interrupted: {kept} of {CELLS} output cells kept in "
                                        f"{store_path(dst)}; rerun the same command to resume (or delete that "
                                        "folder to start over)"]
    assert 20 <= kept < CELLS and not dst.exists()
