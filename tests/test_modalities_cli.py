"""``geosr modalities`` through the real entry point: outputs, overwrite, one-line errors, a down LLM endpoint."""

import json

import numpy as np
import rasterio
from affine import Affine

from conftest import texture
from test_cli import assert_one_line_error

DSM = "height/alexandria_dsm_2m.tif"
HAG = "height/alexandria_hag_2m.tif"
BUILDINGS = "vectors/alexandria_buildings.geojson"


def test_modalities_writes_georeferenced_maps_and_caption(run_cli, data, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mod"
    proc = run_cli("modalities", data / DSM, "-o", out, "--dsm", data / HAG, "--vectors", data / BUILDINGS,
                   "--segmentation", "heuristic", "--tile", "256", "--date", "2018-04-01")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["caption.json", "edges.tif", "height.tif", "segmentation.tif",
                                                    "vectors.tif"]
    assert "geosr modalities" in proc.stderr  # the progress bar
    assert "reasoning: template" in proc.stdout and "hypothesis: expected:" in proc.stdout
    with rasterio.open(data / DSM) as scene:
        for name in ("edges.tif", "height.tif", "segmentation.tif", "vectors.tif"):
            with rasterio.open(out / name) as ds:
                assert (ds.crs, ds.transform, ds.shape) == (scene.crs, scene.transform, scene.shape), name
    report = json.loads((out / "caption.json").read_text())
    assert "acquired 2018-04-01" in report["caption"] and "84 buildings" in report["caption"]
    assert report["extractors"]["vectors"].startswith("VectorLayers(")
    assert len(report["tiles"]) == 4 and set(report["timing"]) >= {"scene_reasoning_s", "total_s", "edges_s"}


def test_modalities_refuses_to_overwrite(run_cli, data, tmp_path):
    src = data / "fixtures" / "zurich_swissimage_tile00_175x120.tif"
    out = tmp_path / "mod"
    assert run_cli("modalities", src, "-o", out, "-q").returncode == 0
    assert_one_line_error(run_cli("modalities", src, "-o", out, "-q"), "already exists; pass --overwrite")
    proc = run_cli("modalities", src, "-o", out, "-q", "--overwrite")
    assert proc.returncode == 0 and proc.stderr.strip() == ""


def test_modalities_bad_inputs_are_one_line_errors(run_cli, make_tif, tmp_path):
    scene = make_tif(texture((3, 64, 64)), "scene.tif")
    far = make_tif(np.ones((20, 20), np.float32), "far.tif", transform=Affine(1, 0, 700000, 0, -1, 5300000))
    plain = make_tif(np.ones((20, 20), np.uint8), "plain.tif")
    no_crs = tmp_path / "nocrs.csv"  # a vector file whose layer has no CRS
    no_crs.write_text("WKT,name\n\"POLYGON ((500000 5199990,500010 5199990,500010 5199980,500000 5199990))\",a\n")
    for flag, path, problem in (("--dsm", far, "does not overlap the scene"),
                                ("--landcover", plain, "has no class table"),
                                ("--vectors", no_crs, "has no CRS")):
        proc = run_cli("modalities", scene, "-o", tmp_path / "out", flag, path, "-q")
        assert_one_line_error(proc, problem)
        assert str(path) in proc.stderr
    assert not (tmp_path / "out").exists()


def test_modalities_with_a_down_llm_endpoint_warns_once_and_succeeds(run_cli, data, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSR_CACHE", str(tmp_path / "cache"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = data / "fixtures" / "zurich_swissimage_tile00_175x120.tif"
    proc = run_cli("modalities", src, "-o", tmp_path / "mod", "--reasoning", "http", "--llm-url",
                   f"http://127.0.0.1:{port}/v1", "--tile", "64", "-q")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "LLM endpoint not reachable" in lines[0] and lines[0].startswith("geosr: "), lines
    assert "reasoning: template" in proc.stdout


def test_modalities_reads_a_yaml_config_and_flags_override_it(run_cli, data, tmp_path):
    src = data / "fixtures" / "zurich_swissimage_tile00_175x120.tif"
    cfg = tmp_path / "m.yaml"
    cfg.write_text("tile: 64\nregional: true\ndate: '2020-05-05'\n")
    proc = run_cli("modalities", src, "-o", tmp_path / "a", "--config", cfg, "--no-regional", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "a" / "caption.json").read_text())
    assert report["tiles"] == [] and "acquired 2020-05-05" in report["caption"]  # flag beat YAML, YAML beat default
    assert "(6 tiles," in proc.stdout  # tile 64 from the YAML: 3 x 2 tiles
    cfg.write_text("tile: 64\nnot_a_setting: 1\n")
    assert_one_line_error(run_cli("modalities", src, "-o", tmp_path / "b", "--config", cfg), "unknown settings")


def test_modalities_asks_an_openai_compatible_endpoint(run_cli, data, tmp_path, monkeypatch):
    from test_modalities_reasoning import GOOD, ChatServer

    monkeypatch.setenv("GEOSR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    src = data / "fixtures" / "zurich_swissimage_tile00_175x120.tif"
    with ChatServer(json.dumps(GOOD)) as server:
        proc = run_cli("modalities", src, "-o", tmp_path / "mod", "--reasoning", "http", "--llm-url", server.url,
                       "--reasoning-model", "local-llm", "--no-regional", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "reasoning: http:local-llm" in proc.stdout and "sharp roof edges" in proc.stdout
    assert len(server.requests) == 1 and server.requests[0]["auth"] == "Bearer secret"
    report = json.loads((tmp_path / "mod" / "caption.json").read_text())
    assert report["hypothesis"]["expected"] == GOOD["expected"] and report["backend"]["fallback"] is None
