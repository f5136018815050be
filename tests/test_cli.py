"""The ``geosr`` command through its real entry point: happy paths and every bad-input case."""

import os
import resource
import shutil
import signal
import subprocess

import numpy as np
import pytest
import rasterio

from conftest import texture

FIXTURE = "zurich_swissimage_tile00_175x120.tif"


def assert_one_line_error(proc, pattern):
    assert proc.returncode != 0
    # the progress bar ("geosr x4: 15%|...") may precede an error raised mid-run; everything else must be one line
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("geosr x")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("geosr: error:"), lines[0]
    assert pattern.lower() in lines[0].lower(), lines[0]


def test_enhance_writes_georeferenced_output_and_preview(run_cli, data, tmp_path):
    out, png = tmp_path / "out.tif", tmp_path / "preview.png"
    proc = run_cli("enhance", data / "fixtures" / FIXTURE, "-o", out, "--model", "bicubic", "--preview", png)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    with rasterio.open(out) as b, rasterio.open(data / "fixtures" / FIXTURE) as a:
        assert b.crs == a.crs and (b.width, b.height) == (700, 480)
    from PIL import Image

    im = Image.open(png)
    assert im.width > 2 * 175 * 4 - 10 and im.mode == "RGB"


def test_progress_bar_goes_to_stderr_and_quiet_silences_it(run_cli, data, tmp_path):
    proc = run_cli("enhance", data / "fixtures" / FIXTURE, "-o", tmp_path / "a.tif", "-m", "bicubic", "--tile", "64")
    assert proc.returncode == 0 and "tile" in proc.stderr
    proc = run_cli("enhance", data / "fixtures" / FIXTURE, "-o", tmp_path / "b.tif", "-m", "bicubic", "--quiet")
    assert proc.returncode == 0 and proc.stderr.strip() == ""


def test_info_reports_size_crs_tiles_and_estimates(run_cli, data):
    proc = run_cli("info", data / "scenes" / "zurich_0p5m_rgb.tif", "-m", "bicubic", "--tile", "256")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "875 x 600" in out and "EPSG:2056" in out and "3500 x 2400" in out
    assert "tiles:       12 (3 rows x 4 cols)" in out
    assert "est. memory" in out and "est. time" in out


def test_models_lists_every_model_with_weight_state(run_cli):
    proc = run_cli("models")
    assert proc.returncode == 0
    for name in ("bicubic", "lanczos", "rrdn-gan", "realesrgan-x4plus"):
        assert name in proc.stdout
    assert "[default]" in proc.stdout


def test_config_yaml_is_read_and_flags_override_it(run_cli, data, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: bicubic\nscale: 2\ntile: 64\noverlap: 8\n")
    out = tmp_path / "o.tif"
    proc = run_cli("enhance", data / "fixtures" / FIXTURE, "-o", out, "--config", cfg, "--scale", "3", "-q")
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(out) as b:
        assert b.width == 175 * 3
        assert '"tile": 64' in b.tags()["GEOSR_PARAMETERS"]


# ----------------------------------------------------------------------------------------------- bad input


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_missing_file(run_cli, tmp_path):
    proc = run_cli("enhance", tmp_path / "nope.tif", "-o", tmp_path / "o.tif")
    assert_one_line_error(proc, "no such file")
    assert _listing(tmp_path) == []


def test_not_a_raster(run_cli, tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not an image\n")
    proc = run_cli("enhance", bad, "-o", tmp_path / "o.tif", "-m", "bicubic")
    assert_one_line_error(proc, "not a readable raster")
    assert _listing(tmp_path) == ["notes.tif"]


def test_truncated_tiff(run_cli, data, tmp_path):
    src = data / "fixtures" / "naip_northdakota_5m_rgbn.tif"
    bad = tmp_path / "cut.tif"
    blob = src.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    proc = run_cli("enhance", bad, "-o", tmp_path / "o.tif", "-m", "bicubic")
    assert_one_line_error(proc, "truncated or corrupt")
    assert _listing(tmp_path) == ["cut.tif"]


def test_complex_dtype(run_cli, make_tif, tmp_path):
    src = make_tif(np.ones((1, 8, 8), dtype=np.complex64))
    proc = run_cli("enhance", src, "-o", tmp_path / "o.tif", "-m", "bicubic")
    assert_one_line_error(proc, "complex")


def test_unsupported_scale(run_cli, data, tmp_path):
    proc = run_cli("enhance", data / "fixtures" / FIXTURE, "-o", tmp_path / "o.tif", "-m", "rrdn-gan", "--scale", "3")
    assert_one_line_error(proc, "supports scale 4, not 3")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("tile,overlap", [(16, 8), (15, 8)])
def test_tile_not_larger_than_twice_overlap(run_cli, data, tmp_path, tile, overlap):
    proc = run_cli("enhance", data / "fixtures" / FIXTURE, "-o", tmp_path / "o.tif", "-m", "bicubic",
                   "--tile", tile, "--overlap", overlap)
    assert_one_line_error(proc, "must be larger than 2 x overlap")


def test_output_equal_to_input(run_cli, make_tif):
    src = make_tif(texture((3, 20, 20)))
    before = src.read_bytes()
    proc = run_cli("enhance", src, "-o", src, "-m", "bicubic", "--overwrite")
    assert_one_line_error(proc, "output is the input")
    assert src.read_bytes() == before


def test_existing_output_refused(run_cli, make_tif, tmp_path):
    src = make_tif(texture((3, 20, 20)))
    out = tmp_path / "o.tif"
    out.write_bytes(b"keep me")
    proc = run_cli("enhance", src, "-o", out, "-m", "bicubic")
    assert_one_line_error(proc, "--overwrite")
    assert out.read_bytes() == b"keep me"


def _immutable(folder):
    """Make ``folder`` unwritable even for root (chattr +i); None if this filesystem/user can't."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    return None


def test_unwritable_output_folder(run_cli, make_tif, tmp_path):
    src = make_tif(texture((3, 20, 20)))
    locked = tmp_path / "locked"
    locked.mkdir()
    undo = _immutable(locked)
    if undo is None:
        pytest.skip("cannot make a folder unwritable here (root without chattr)")
    try:
        proc = run_cli("enhance", src, "-o", locked / "o.tif", "-m", "bicubic")
    finally:
        undo()
    assert_one_line_error(proc, "not writable")
    assert _listing(locked) == []


def test_out_of_disk_mid_write_removes_temporary(run_cli, data, tmp_path):
    """The file-size limit makes the kernel refuse writes past 200 kB, like a full disk, partway through."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli("enhance", data / "fixtures" / "naip_northdakota_5m_rgbn.tif", "-o", out_dir / "o.tif",
                   "-m", "bicubic", "--tile", "128", preexec_fn=limit)
    assert_one_line_error(proc, "write failed")
    assert _listing(out_dir) == []


def test_bad_band_selection(run_cli, data, tmp_path):
    proc = run_cli("enhance", data / "fixtures" / FIXTURE, "-o", tmp_path / "o.tif", "-m", "bicubic",
                   "--bands", "1,5")
    assert_one_line_error(proc, "out of range")


def test_bad_edge_mode(run_cli, data, tmp_path):
    proc = run_cli("enhance", data / "fixtures" / FIXTURE, "-o", tmp_path / "o.tif", "-m", "bicubic", "--edge", "wrap")
    assert_one_line_error(proc, "choose reflect, cut or reflect:N")


def test_existing_preview_refused_before_any_work(run_cli, make_tif, tmp_path):
    src = make_tif(texture((3, 20, 20)))
    png = tmp_path / "p.png"
    png.write_bytes(b"mine")
    proc = run_cli("enhance", src, "-o", tmp_path / "o.tif", "-m", "bicubic", "--preview", png)
    assert_one_line_error(proc, "--overwrite")
    assert png.read_bytes() == b"mine" and not (tmp_path / "o.tif").exists()


# ----------------------------------------------------------------------------------------------- for programs (QGIS)


def test_progress_json_lines_on_stderr(run_cli, data, tmp_path):
    import json

    proc = run_cli("enhance", data / "fixtures" / FIXTURE, "-o", tmp_path / "o.tif", "-m", "bicubic", "--tile", "64",
                   "--progress-json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(ln) for ln in proc.stderr.splitlines()]  # every stderr line is one JSON event
    assert all(e["event"] == "progress" for e in events)
    assert [e["done"] for e in events] == list(range(len(events)))
    assert events[-1]["done"] == events[-1]["total"] == 9 and events[-1]["message"] == "tile 9/9"
    assert proc.stdout.startswith("wrote ")


def test_sigterm_stops_and_leaves_nothing_not_even_the_partial_store(data, tmp_path):
    """SIGTERM (the QGIS plugin's Cancel) exits like Ctrl-C (130) but, unlike Ctrl-C (test_resume.py), removes the
    partial store too."""
    import json

    from conftest import GEOSR

    from geosr.store import store_path

    out = tmp_path / "o.tif"
    proc = subprocess.Popen([GEOSR, "enhance", str(data / "scenes" / "zurich_0p5m_rgb.tif"), "-o", str(out), "-m",
                             "lanczos", "--tile", "32", "--overlap", "8", "--progress-json"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stderr:  # until tiles are being written
            if line.startswith("{") and json.loads(line)["done"] >= 3:
                break
        assert list(tmp_path.glob(".o.tif.*.geosr-part*")), "no partial output while working"
        assert store_path(out).is_dir(), "no partial store while working"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "nothing was written" in err
    assert _listing(tmp_path) == []


def test_third_party_warnings_stay_out_of_the_cli_unless_verbose():
    import subprocess
    import sys

    code = ("import logging, sys; from geosr import cli\n"
            "def cmd(args):\n"
            "    logging.getLogger('bitsandbytes.backends').warning('third-party noise')\n"
            "    logging.getLogger('geosr.scene').warning('our warning')\n"
            "    logging.getLogger('torch').error('third-party error')\n"
            "    return 0\n"
            "cli.COMMANDS['models'] = cmd\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    quiet = subprocess.run([sys.executable, "-c", code, "models"], capture_output=True, text=True, timeout=300,
                           check=False)
    assert quiet.returncode == 0, quiet.stderr
    assert "geosr: our warning" in quiet.stderr and "geosr: third-party error" in quiet.stderr
    assert "third-party noise" not in quiet.stderr
    verbose = subprocess.run([sys.executable, "-c", code, "--verbose", "models"], capture_output=True, text=True,
                             timeout=300, check=False)
    assert "geosr: third-party noise" in verbose.stderr
