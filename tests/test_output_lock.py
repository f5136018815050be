"""One run per output: ``geosr enhance`` holds ``OUT.geosr-lock`` (geosr.io.write.OutputLock) from the output check
until it ends, so a second run of the same output is refused instead of deleting the first one's temporary GeoTIFF
or partial store; a lock left by a killed run is taken over; no run ends leaving its lock. Both engines (the
in-process stream and dask)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rasterio

from conftest import texture

from geosr.config import EnhanceConfig
from geosr.errors import OutputError, Terminated
from geosr.io.write import lock_path
from geosr.scene import Cancelled, enhance_scene
from geosr.store import store_path

REPO = Path(__file__).resolve().parent.parent
TINY = dict(model="bicubic", tile=32, scale=4)  # a 96 x 96 scene: 9 tiles, well under a second
ENGINES = {"stream": {}, "dask": {"scheduler": "threads"}}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONWARNINGS="ignore")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "geosr", *map(str, args)]


def _enhance_cmd(src: Path, dst: Path, *extra) -> list[str]:
    return _cli("enhance", src, "-o", dst, "-m", TINY["model"], "--tile", TINY["tile"], "--scale", TINY["scale"],
                "-q", *extra)


def _write_lock(dst: Path, *, pid, host=None, started="2026-12-04T20:40:00+00:00") -> bytes:
    text = json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": started,
                       "argv": ["geosr", "enhance"]}).encode()
    lock_path(dst).write_bytes(text)
    return text


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # exited and reaped: its pid is gone
    return proc.pid


def _pixels(path: Path) -> bytes:
    with rasterio.open(path) as ds:
        return ds.read().tobytes()


@pytest.fixture
def scene(make_tif, tmp_path):
    """(input, the output of an uninterrupted run without lock contention or store) in ``tmp_path / "in"``."""
    (tmp_path / "in").mkdir()
    src = make_tif(texture((3, 96, 96), seed=3), name="in/src.tif")
    ref = tmp_path / "in" / "ref.tif"
    enhance_scene(src, ref, EnhanceConfig(**TINY, resume=False))
    out = tmp_path / "out"
    out.mkdir()
    return src, _pixels(ref)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_live_runs_lock_is_refused_and_nothing_is_touched(scene, tmp_path, engine):
    """With --overwrite and --restart, a run without the lock would replace the output, discard the store and delete
    the temporary GeoTIFF; against a live owner (this test's process) it must change none of them."""
    src, _ = scene
    dst = tmp_path / "out" / "o.tif"
    dst.write_bytes(b"the other run's earlier output")
    store = store_path(dst)
    (store / "cells").mkdir(parents=True)
    (store / "geosr-store.json").write_text("the other run's store")
    temporary = dst.with_name(".o.tif.abc123.geosr-part.tif")
    temporary.write_bytes(b"the other run's GeoTIFF in progress")
    lock = _write_lock(dst, pid=os.getpid())
    before = {p.name: p.read_bytes() for p in dst.parent.rglob("*") if p.is_file()}

    extra = ["--scheduler", "threads"] if engine == "dask" else []
    proc = subprocess.run(_enhance_cmd(src, dst, "--overwrite", "--restart", *extra), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [(
        f"geosr: error: {dst}: another geosr run (pid {os.getpid()} on {socket.gethostname()}, started "
        f"2026-12-04T20:40:00+00:00) is writing this output; wait for it to finish, or delete {lock_path(dst)} if "
        "that run is gone")]
    assert {p.name: p.read_bytes() for p in dst.parent.rglob("*") if p.is_file()} == before
    assert lock_path(dst).read_bytes() == lock


@pytest.mark.parametrize("owner, why", [
    ({"host": "another-host.example", "pid": "dead"}, "another geosr run .pid \\d+ on another-host.example"),
    (b"", "unreadable lock file \\(empty\\)"),
    (b"{not json", "unreadable lock file \\(not JSON\\)"),
    (b'{"host": "h"}', "unreadable lock file \\(no host and pid in it\\)"),
])
def test_a_lock_that_cannot_be_checked_is_refused(scene, tmp_path, owner, why):
    """A lock of another host (its pid cannot be checked: taken as alive, even a pid dead here) and an unreadable
    lock are refused, never guessed stale."""
    src, _ = scene
    dst = tmp_path / "out" / "o.tif"
    if isinstance(owner, dict):
        _write_lock(dst, pid=_dead_pid(), host=owner["host"])
    else:
        lock_path(dst).write_bytes(owner)
    lock = lock_path(dst).read_bytes()
    with pytest.raises(OutputError, match=why):
        enhance_scene(src, dst, EnhanceConfig(**TINY))
    assert lock_path(dst).read_bytes() == lock
    assert sorted(p.name for p in dst.parent.iterdir()) == [lock_path(dst).name]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_runs_lock_is_taken_over(scene, tmp_path, caplog, engine):
    src, expected = scene
    dst = tmp_path / "out" / "o.tif"
    pid = _dead_pid()
    _write_lock(dst, pid=pid)
    with caplog.at_level(logging.WARNING, logger="geosr.io.write"):
        enhance_scene(src, dst, EnhanceConfig(**TINY, **ENGINES[engine]))
    assert _pixels(dst) == expected
    assert [p.name for p in dst.parent.iterdir()] == ["o.tif"]  # the lock went with the run
    assert [r.getMessage() for r in caplog.records] == [(
        f"{lock_path(dst)}: taking over the lock of geosr run pid {pid} (started 2026-12-04T20:40:00+00:00), "
        "which is gone (killed?)")]


def _raising(real, exc):
    calls = {"n": 0}

    def run_model(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise exc
        return real(*a, **k)

    return run_model


@pytest.mark.parametrize("ending", ["success", "crash", "ctrl-c", "sigterm", "cancel", "no-resume crash",
                                    "dask success", "dask cancel"])
def test_no_run_leaves_its_lock(scene, tmp_path, monkeypatch, ending):
    import geosr.scene as scene_mod

    src, expected = scene
    dst = tmp_path / "out" / "o.tif"
    config = EnhanceConfig(**TINY, resume="no-resume" not in ending,
                           scheduler="threads" if ending.startswith("dask") else None)
    seen = []

    def should_stop():  # also looks at the lock while the run works
        seen.append(lock_path(dst).exists())
        return ending.endswith("cancel")

    errors = {"crash": RuntimeError("simulated crash"), "ctrl-c": KeyboardInterrupt(), "sigterm": Terminated()}
    exc = errors.get(ending.split()[-1])
    if exc is not None:
        monkeypatch.setattr(scene_mod, "_run_model", _raising(scene_mod._run_model, exc))
    if ending.endswith("success"):
        enhance_scene(src, dst, config, should_stop=should_stop)
        assert _pixels(dst) == expected
    else:
        with pytest.raises(type(exc) if exc is not None else Cancelled):
            enhance_scene(src, dst, config, should_stop=should_stop)
    assert seen and all(seen), "the lock was not held while the run worked"
    assert not lock_path(dst).exists()


PAUSED = """
import pathlib, sys, time
import geosr.scene as scene
real, go = scene._run_model, pathlib.Path(sys.argv[1])
def paused(*a, **k):  # every tile waits until the test says go
    while not go.exists():
        time.sleep(0.02)
    return real(*a, **k)
scene._run_model = paused
from geosr.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_cli_run_is_refused_while_the_first_works_and_the_first_completes(scene, tmp_path):
    """Two real processes: the first (its model paused until the second has run) holds the lock; the second exits 1
    with the message naming the first, which then completes with the right pixels and leaves only its output."""
    src, expected = scene
    dst = tmp_path / "out" / "o.tif"
    go = tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED, str(go), *_enhance_cmd(src, dst)[3:]], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not store_path(dst).is_dir() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the store is opened after the lock is taken
        assert first.poll() is None and lock_path(dst).exists(), "the first run is not working"
        assert json.loads(lock_path(dst).read_text())["pid"] == first.pid
        second = subprocess.run(_enhance_cmd(src, dst, "--overwrite"), env=_env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 1, second.stderr
        assert len(second.stderr.splitlines()) == 1
        assert f"{dst}: another geosr run (pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert first.poll() is None
        go.touch()
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert _pixels(dst) == expected
    assert [p.name for p in dst.parent.iterdir()] == ["o.tif"]


def _take(dst: Path, barrier, results) -> None:  # in a forked process
    from geosr.io.write import OutputLock

    barrier.wait()
    try:
        with OutputLock(dst):
            results.put("won")
            time.sleep(1.0)  # held while the others look: they must find it alive
    except OutputError as err:
        results.put(str(err))


def test_of_processes_taking_over_a_stale_lock_at_once_one_wins(tmp_path):
    import multiprocessing

    dst = tmp_path / "o.tif"
    _write_lock(dst, pid=_dead_pid())
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_take, args=(dst, barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert got.count("won") == 1, got
    assert all(f"{dst}: another geosr run (pid " in g for g in got if g != "won"), got
    assert not lock_path(dst).exists()


@pytest.mark.skipif(os.name == "nt", reason="the takeover is serialised with flock on POSIX only")
def test_a_stale_lock_replaced_meanwhile_is_not_removed(tmp_path):
    """The race the takeover guards against: this process read a stale lock, another one took it over meanwhile
    (removed it and created its own); removing "the stale lock" now must not remove the other one's."""
    from geosr.io.write import OutputLock

    dst = tmp_path / "o.tif"
    _write_lock(dst, pid=_dead_pid())
    lock = OutputLock(dst)
    fd, _, _ = lock._open_existing()  # read: stale
    try:
        lock_path(dst).unlink()  # the other process's takeover
        live = _write_lock(dst, pid=os.getpid())
        assert not lock._remove_stale(fd)
    finally:
        os.close(fd)
    assert lock_path(dst).read_bytes() == live
