"""The QGIS plugin (qgis_plugin/geosr_qgis).

- Plain-Python parts (options -> CLI arguments, progress lines, backend choice, the subprocess and in-process
  backends) run here (the CLI's --progress-json and SIGTERM: test_cli.py), in the project's venv, against the
  real geosr.
- Everything that needs QGIS runs in a real, headless QGIS: each ``test_in_qgis`` case starts QGIS's own Python
  (Debian: /usr/bin/python3; set GEOSR_QGIS_PYTHON to change it) on tests/qgis_checks.py with offscreen Qt, and
  skips only when that Python has no ``qgis`` module. The plugin there runs geosr through this venv's Python.
- ``make plugin`` builds the zip; its contents and metadata.txt are checked here, and the zip is installed and
  started in QGIS by the ``zip`` case.
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import rasterio

from geosr.config import cache_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "qgis_plugin"))

from geosr_qgis.backend import (InProcessBackend, RunCancelled, RunError, SubprocessBackend,  # noqa: E402
                                choose_backend, error_message, parse_line)
from geosr_qgis.options import (EnhanceOptions, ModalitiesOptions, ScoreOptions, layer_file, partial_outputs,  # noqa: E402
                                output_lock, partial_store)

FIXTURE = "zurich_swissimage_tile00_175x120.tif"
SCENE = "zurich_0p5m_rgb.tif"  # 875 x 600: with 32 px tiles about a minute of lanczos, for Cancel
QGIS_PYTHON = os.environ.get("GEOSR_QGIS_PYTHON", "/usr/bin/python3")


def _qgis_missing() -> str | None:
    if not Path(QGIS_PYTHON).exists():
        return f"{QGIS_PYTHON} not found (QGIS's Python; set GEOSR_QGIS_PYTHON)"
    probe = subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"], capture_output=True, text=True,
                           env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
    if probe.returncode != 0:
        return (f"QGIS is not installed for {QGIS_PYTHON} (apt-get install qgis python3-qgis; .ci/run does): "
                f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'import qgis.core failed'}")
    return None


def _subprocess_backend() -> SubprocessBackend:
    """The backend the plugin uses when geosr does not import in QGIS: this venv's Python, this checkout."""
    return SubprocessBackend(sys.executable, str(REPO))


# ----------------------------------------------------------------------------------------------- options


def test_enhance_options_become_an_argument_list_and_library_settings():
    opts = EnhanceOptions(input="in put.tif", output="out.tif", model="mmsr", scale=4, tile=256, bands=(3, 2, 1),
                          temperatures="depth=0.5,edges=2", guidance=4.0, guidance_mode="m-cfg",
                          modalities=("text", "segmentation"), dsm="d.tif", overwrite=True, seed=0)
    args = opts.cli_args()
    assert args[:4] == ["enhance", "in put.tif", "-o", "out.tif"]  # a path with a space stays one argument
    pairs = dict(zip(args[4::1], args[5::1]))
    assert pairs["--model"] == "mmsr" and pairs["--scale"] == "4" and pairs["--tile"] == "256"
    assert pairs["--bands"] == "3,2,1" and pairs["--temperature"] == "depth=0.5,edges=2"
    assert pairs["--guidance"] == "4.0" and pairs["--guidance-mode"] == "m-cfg" and pairs["--dsm"] == "d.tif"
    assert pairs["--drop"] == "depth,edges" and pairs["--seed"] == "0"
    assert "--overwrite" in args and "--cog" not in args and "--landcover" not in args
    assert "--restart" in args  # another run's partial store is discarded: a GUI user cannot manage it
    from geosr.cli import build_parser

    parsed = build_parser().parse_args(args)  # the real CLI accepts every flag the plugin builds
    assert (parsed.model, parsed.scale, parsed.drop, parsed.temperatures) == ("mmsr", 4, "depth,edges",
                                                                               "depth=0.5,edges=2")
    from geosr.config import EnhanceConfig

    config = EnhanceConfig(**opts.config_kwargs())  # and the library takes the same settings
    assert (config.drop, config.bands, config.overwrite, config.seed) == ("depth,edges", (3, 2, 1), True, 0)
    assert config.restart and config.resume and parsed.restart


@pytest.mark.parametrize("modalities, drop", [(None, None), (("text", "depth", "segmentation", "edges"), None),
                                              ((), "text,depth,segmentation,edges"), (("edges",),
                                                                                       "text,depth,segmentation")])
def test_modalities_chosen_are_the_complement_of_drop(modalities, drop):
    assert EnhanceOptions(input="a", output="b", modalities=modalities).drop == drop


def test_unknown_modality_is_refused():
    with pytest.raises(ValueError, match="unknown modalities"):
        EnhanceOptions(input="a", output="b", modalities=("colour",)).cli_args()


def test_modalities_and_score_arguments_parse_in_the_real_cli():
    from geosr.cli import build_parser

    m = build_parser().parse_args(ModalitiesOptions(input="i.tif", output="dir", vectors="v.gpkg", tile=256,
                                                    overwrite=True).cli_args())
    assert (m.command, str(m.output), m.vectors, m.tile, m.overwrite) == ("modalities", "dir", "v.gpkg", 256, True)
    s = build_parser().parse_args(ScoreOptions(sr="s.tif", lr="l.tif", json="r.json", roads="r.gpkg",
                                               lpips=False).cli_args())
    assert (s.command, str(s.json), str(s.roads), s.no_lpips, s.reference) == ("score", "r.json", "r.gpkg", True,
                                                                                None)


def test_layer_file_strips_provider_options_and_refuses_non_files(tmp_path):
    gpkg = tmp_path / "layers.gpkg"
    gpkg.write_bytes(b"")
    assert layer_file(f"{gpkg}|layername=roads") == str(gpkg)
    assert layer_file("") is None and layer_file(None) is None
    with pytest.raises(ValueError, match="not a file on disk"):
        layer_file("type=xyz&url=https://tile.openstreetmap.org/{z}/{x}/{y}.png")


# ----------------------------------------------------------------------------------------------- progress lines


def test_progress_lines_parse_and_other_lines_do_not():
    assert parse_line('{"event": "progress", "done": 3, "total": 40, "message": "tile 3/40"}\n') == \
        parse_line('{"event":"progress","done":3,"total":40,"message":"tile 3/40"}')
    event = parse_line('{"event": "progress", "done": 3, "total": 40, "message": "tile 3/40"}')
    assert (event.done, event.total, event.message) == (3, 40, "tile 3/40")
    for line in ("wrote out.tif (700x480, 3 bands)", "{not json", '{"event": "other"}', '{"done": 1}', "[1, 2]",
                 '{"event": "progress", "done": "x", "total": 2}'):
        assert parse_line(line) is None, line


def test_error_message_is_geosrs_own_line():
    lines = ['{"event": "progress", "done": 0, "total": 4, "message": "starting"}', "geosr: warning: no CRS",
             "geosr: error: out.tif: already exists; pass --overwrite to replace it"]
    assert error_message(lines, 1) == "out.tif: already exists; pass --overwrite to replace it"
    assert error_message(["Segmentation fault"], -11) == "geosr stopped with exit status -11: Segmentation fault"
    assert "no message" in error_message([], 2)


# ----------------------------------------------------------------------------------------------- backend choice


def test_auto_backend_is_in_process_only_when_geosr_imports_safely():
    yes, no = (lambda: True), (lambda: False)
    assert isinstance(choose_backend("auto", "/py", importable=yes, safe=yes), InProcessBackend)
    # geosr imports, but with wheels' own GDAL / PROJ: the subprocess, when there is an interpreter to run
    assert isinstance(choose_backend("auto", "/py", importable=yes, safe=no), SubprocessBackend)
    assert isinstance(choose_backend("auto", "", importable=yes, safe=no), InProcessBackend)
    assert isinstance(choose_backend("inprocess", "/py", importable=yes, safe=no), InProcessBackend)
    chosen = choose_backend("auto", "/venv/bin/python", "/src", importable=no, safe=no)
    assert isinstance(chosen, SubprocessBackend)
    assert chosen.command(["enhance", "a b.tif"]) == ["/venv/bin/python", "-m", "geosr", "enhance", "a b.tif"]
    assert chosen.environment()["PYTHONPATH"] == "/src"
    assert isinstance(choose_backend("subprocess", "/py", importable=yes, safe=yes), SubprocessBackend)
    with pytest.raises(RunError, match="does not import"):
        choose_backend("inprocess", importable=no)
    with pytest.raises(RunError, match="no interpreter is set"):
        choose_backend("auto", "", importable=no, safe=no)
    with pytest.raises(RunError, match="unknown backend"):
        choose_backend("magic")


def test_wheels_with_their_own_gdal_are_found(tmp_path, monkeypatch):
    from geosr_qgis.backend import bundled_native_libraries

    # stand-ins with names of their own (the real rasterio / pyproj may be imported already in this process)
    for name, libs in (("wheel_like_gdal_binding", True), ("system_like_proj_binding", False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        if libs:
            (tmp_path / f"{name}.libs").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    found = bundled_native_libraries(("wheel_like_gdal_binding", "system_like_proj_binding", "no_such_module_here"))
    assert found == ["wheel_like_gdal_binding"]


def test_subprocess_environment_drops_qgis_python_variables(monkeypatch):
    monkeypatch.setenv("PYTHONHOME", "/qgis/apps/Python311")
    monkeypatch.setenv("PYTHONPATH", "/qgis/python")
    env = SubprocessBackend("/py").environment()
    assert "PYTHONHOME" not in env and "PYTHONPATH" not in env and env["PYTHONUNBUFFERED"] == "1"


# ----------------------------------------------------------------------------------------------- subprocess, a stand-in


FAKE_GEOSR = """\
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a geosr that does not stop on SIGTERM
if os.environ.get("FAKE_LOCK"):  # the output's lock, as geosr takes it
    with open(os.environ["FAKE_LOCK"], "x") as f:
        json.dump({"host": "h", "pid": os.getpid()}, f)
print(json.dumps({"event": "progress", "done": 1, "total": 2, "message": "tile 1/2"}), file=sys.stderr, flush=True)
print("geosr: warning: something", file=sys.stderr, flush=True)
time.sleep(float(os.environ["FAKE_SLEEP"]))
if os.environ.get("FAKE_ERROR"):
    print("geosr: error: " + os.environ["FAKE_ERROR"], file=sys.stderr, flush=True)
    sys.exit(1)
"""


@pytest.fixture
def fake_interpreter(tmp_path, monkeypatch):
    """An "interpreter" whose ``-m geosr ...`` runs FAKE_GEOSR instead (argument list as the plugin builds it)."""
    script = tmp_path / "fake_geosr.py"
    script.write_text(FAKE_GEOSR)
    exe = tmp_path / "python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_SLEEP", "0")
    return str(exe)


def test_subprocess_killed_after_the_grace_time_leaves_no_partial_file(fake_interpreter, tmp_path, monkeypatch):
    import geosr_qgis.backend as backend_module

    monkeypatch.setattr(backend_module, "TERMINATE_GRACE_S", 0.5)
    monkeypatch.setenv("FAKE_SLEEP", "60")
    out = tmp_path / "o.tif"
    partial = tmp_path / ".o.tif.abc123.geosr-part.tif"  # what a killed geosr leaves behind
    partial.write_bytes(b"")
    store = partial_store(out)  # ... and its finished cells, kept for a resume after a crash
    (store / "cells").mkdir(parents=True)
    (store / "cells" / "0_0.npy.gz").write_bytes(b"")
    lock = output_lock(out)  # ... and its lock
    monkeypatch.setenv("FAKE_LOCK", str(lock))
    backend = SubprocessBackend(fake_interpreter)
    seen = []
    t0 = time.monotonic()
    with pytest.raises(RunCancelled):
        backend.enhance(EnhanceOptions(input="in.tif", output=str(out)), progress=lambda *a: seen.append(a),
                        should_stop=lambda: bool(seen))
    assert time.monotonic() - t0 < 20
    assert seen == [(1, 2, "tile 1/2")]
    assert backend.process.returncode == -signal.SIGKILL
    assert not partial.exists() and not store.exists()  # a Cancel leaves nothing, not even cells to resume
    assert not lock.exists()


def test_a_cancelled_subprocess_never_cleans_up_another_runs_output(fake_interpreter, tmp_path, monkeypatch):
    """geosr refused the output (another run holds its lock) and the Cancel came first: that run's temporary
    GeoTIFF, partial store and lock stay."""
    monkeypatch.setenv("FAKE_ERROR", "o.tif: another geosr run (pid 1 on h, started ?) is writing this output")
    out = tmp_path / "o.tif"
    partial = tmp_path / ".o.tif.abc123.geosr-part.tif"
    partial.write_bytes(b"")
    (partial_store(out) / "cells").mkdir(parents=True)
    lock = output_lock(out)
    lock.write_text(json.dumps({"host": "h", "pid": os.getpid()}))  # the other run: alive
    seen = []
    with pytest.raises(RunCancelled):
        SubprocessBackend(fake_interpreter).enhance(EnhanceOptions(input="in.tif", output=str(out)),
                                                    progress=lambda *a: seen.append(a), should_stop=lambda: bool(seen))
    assert partial.exists() and partial_store(out).is_dir() and lock.exists()


def test_subprocess_that_finishes_despite_cancel_keeps_its_result(fake_interpreter, tmp_path):
    backend = SubprocessBackend(fake_interpreter)
    seen = []  # Cancel after the first progress line: SIGTERM is ignored by then, and it exits 0
    out = str(tmp_path / "o.tif")
    assert backend.enhance(EnhanceOptions(input="in.tif", output=out), progress=lambda *a: seen.append(a),
                           should_stop=lambda: bool(seen)) == out
    assert seen and backend.process.returncode == 0


def test_subprocess_error_is_geosrs_line(fake_interpreter, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ERROR", "in.tif: no such file")
    with pytest.raises(RunError, match="^in.tif: no such file$"):
        SubprocessBackend(fake_interpreter).enhance(EnhanceOptions(input="in.tif", output=str(tmp_path / "o.tif")))


# ----------------------------------------------------------------------------------------------- backends, real geosr


@pytest.mark.parametrize("make_backend", [_subprocess_backend, InProcessBackend], ids=["subprocess", "inprocess"])
def test_backend_enhances_with_progress(make_backend, data, tmp_path):
    out = tmp_path / "o.tif"
    seen = []
    path = make_backend().enhance(EnhanceOptions(input=str(data / "fixtures" / FIXTURE), output=str(out),
                                                 model="bicubic", scale=2, tile=64),
                                  progress=lambda d, t, m: seen.append((d, t)), should_stop=lambda: False)
    assert Path(path) == out
    with rasterio.open(out) as b, rasterio.open(data / "fixtures" / FIXTURE) as a:
        assert b.crs == a.crs and b.bounds == a.bounds and (b.width, b.height) == (350, 240)
        assert b.transform.a == pytest.approx(a.transform.a / 2)
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 1 and len(seen) == seen[-1][1] + 1


@pytest.mark.parametrize("make_backend", [_subprocess_backend, InProcessBackend], ids=["subprocess", "inprocess"])
def test_backend_error_is_one_line(make_backend, data, tmp_path):
    with pytest.raises(RunError) as err:
        make_backend().enhance(EnhanceOptions(input=str(data / "fixtures" / FIXTURE), output=str(tmp_path / "o.tif"),
                                              model="rrdn-gan", scale=3))
    assert "supports scale 4" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("make_backend", [_subprocess_backend, InProcessBackend], ids=["subprocess", "inprocess"])
def test_backend_cancel_leaves_no_output(make_backend, data, tmp_path):
    out = tmp_path / "o.tif"
    seen = []
    backend = make_backend()
    stopped = []

    def should_stop():
        if seen and seen[-1][0] >= 3:
            stopped.append(stopped[0] if stopped else time.monotonic())
            return True
        return False

    with pytest.raises(RunCancelled):
        backend.enhance(EnhanceOptions(input=str(data / "scenes" / SCENE), output=str(out), model="lanczos", scale=4,
                                       tile=32, overlap=8),
                        progress=lambda d, t, m: seen.append((d, t)), should_stop=should_stop)
    assert time.monotonic() - stopped[0] < 60
    done, total = seen[-1]
    assert 3 <= done < total / 10
    assert not out.exists() and not partial_outputs(out)
    if isinstance(backend, SubprocessBackend):
        assert backend.process.poll() is not None and not Path(f"/proc/{backend.process.pid}").exists()
        assert backend.process.returncode == 130  # SIGTERM stopped it like Ctrl-C; it was not killed


def test_subprocess_backend_reports_a_missing_interpreter():
    with pytest.raises(RunError, match="cannot run /nonexistent/python"):
        SubprocessBackend("/nonexistent/python").version()
    assert _subprocess_backend().version().startswith("geosr ")


# ----------------------------------------------------------------------------------------------- packaging


METADATA_KEYS = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository",
                 "tracker", "homepage", "license", "category", "icon", "hasProcessingProvider")


def test_make_plugin_builds_the_zip(tmp_path):
    proc = subprocess.run(["make", "-s", "plugin", f"PLUGIN_DIST={tmp_path}"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    meta = configparser.ConfigParser()
    meta.read(REPO / "qgis_plugin" / "geosr_qgis" / "metadata.txt", encoding="utf-8")
    general = meta["general"]
    zips = list(tmp_path.glob("*.zip"))
    assert [z.name for z in zips] == [f"geosr_qgis-{general['version']}.zip"]
    with zipfile.ZipFile(zips[0]) as zf:
        names = zf.namelist()
        assert all(n.startswith("geosr_qgis/") for n in names), names
        for needed in ("__init__.py", "metadata.txt", "plugin.py", "provider.py", "backend.py", "options.py",
                       "task.py", "dialog.py", "settings.py", "icon.svg", "LICENSE"):
            assert f"geosr_qgis/{needed}" in names
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        zipped = configparser.ConfigParser()
        zipped.read_string(zf.read("geosr_qgis/metadata.txt").decode("utf-8"))
    for key in METADATA_KEYS:
        assert zipped["general"].get(key, "").strip(), f"metadata.txt: {key} is empty"
    g = zipped["general"]
    assert g["name"] == "geosr" and g["qgisMinimumVersion"] == "3.22" and g["hasProcessingProvider"] == "yes"
    assert g["icon"] in {n.split("/", 1)[1] for n in names}
    assert g["repository"].startswith("https://") and g["tracker"].startswith("https://")


def test_plugin_package_does_not_shadow_geosr():
    assert not (REPO / "qgis_plugin" / "geosr").exists()
    import geosr

    assert Path(geosr.__file__).resolve().parent == REPO / "geosr" or "site-packages" in geosr.__file__


# ----------------------------------------------------------------------------------------------- in a real QGIS


@pytest.mark.parametrize("check", ["backend", "processing", "task", "cancel", "zip"])
def test_in_qgis(check, data, tmp_path):
    missing = _qgis_missing()
    if missing:
        pytest.skip(missing)
    extra = []
    if check == "zip":
        proc = subprocess.run(["make", "-s", "plugin", f"PLUGIN_DIST={tmp_path / 'dist'}"], cwd=REPO,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        extra = ["--zip", str(next((tmp_path / "dist").glob("*.zip")))]
    work = tmp_path / "work"
    work.mkdir()
    # HOME in tmp_path: QGIS's settings and profile are the test's own, never the user's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path), QT_QPA_PLATFORM="offscreen",
               GEOSR_CACHE=str(cache_dir()), GEOSR_DATA=str(data))
    proc = subprocess.run([QGIS_PYTHON, str(REPO / "tests" / "qgis_checks.py"), check,
                           "--fixture", str(data / "fixtures" / FIXTURE), "--scene", str(data / "scenes" / SCENE),
                           "--interpreter", sys.executable, "--pythonpath", str(REPO), "--workdir", str(work),
                           *extra], capture_output=True, text=True, env=env, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.count("ok ") >= 1
