"""geosr score: full-reference, faithfulness and semantic metrics on known cases; grid checks on bad input."""

import numpy as np
import pytest
import rasterio
from affine import Affine
from scipy.ndimage import gaussian_filter

from geosr import bench
from geosr.config import ScoreConfig, weights_dir
from geosr.errors import GridError
from geosr.scoring import score_scene
from geosr.scoring.faithfulness import hallucination_map, lr_consistency
from geosr.scoring.inputs import Raster, load_inputs
from geosr.scoring.lpips import FILENAME as LPIPS_FILE
from geosr.scoring.semantic import class_iou, upsample_labels

CRS = "EPSG:2056"
T_SR = Affine(0.5, 0, 2679062.5, 0, -0.5, 1248000.0)  # the Zurich scene's own grid
SCALE = 4
CAP = ScoreConfig().psnr_cap_db
HAVE_LPIPS = (weights_dir() / LPIPS_FILE).is_file()


@pytest.fixture(scope="module")
def hr(data):
    """A 192x192 RGB crop of the Zurich scene, (H, W, 3) uint8."""
    with rasterio.open(data / "scenes" / "zurich_0p5m_rgb.tif") as src:
        return np.moveaxis(src.read(window=rasterio.windows.Window(300, 150, 192, 192)), 0, -1)


def _raster(rgb, transform, crs=CRS):
    return Raster(path=None, raw=np.ascontiguousarray(np.moveaxis(rgb, -1, 0)),
                  crs=rasterio.crs.CRS.from_user_input(crs), transform=transform)


def _lr(hr):
    return bench._resize(hr, (hr.shape[0] // SCALE, hr.shape[1] // SCALE))


def _score(sr, hr, *, lpips=False, no_reference=False):
    lr = _lr(hr)
    result = score_scene(_raster(sr, T_SR), _raster(lr, T_SR @ Affine.scale(SCALE)), reference=_raster(hr, T_SR),
                         config=ScoreConfig(lpips=lpips, no_reference=no_reference))
    return result.report


def _blur(img, sigma):
    return np.clip(np.round(gaussian_filter(img.astype(np.float64), sigma=(sigma, sigma, 0))), 0, 255).astype(np.uint8)


def _shift(img, px):
    return np.roll(img, px, axis=1)


# ------------------------------------------------------------------------------------------ known cases


def test_identical_images_score_perfect_fidelity_and_consistency(hr):
    r = _score(hr, hr, lpips=HAVE_LPIPS, no_reference=True)
    assert r["full_reference"]["psnr_y"] == CAP  # inf, capped so the JSON stays finite
    assert r["full_reference"]["ssim_y"] == pytest.approx(1.0, abs=1e-12)
    assert r["full_reference"]["pyiqa_ssim_y"] == pytest.approx(1.0, abs=1e-6)
    if HAVE_LPIPS:
        assert r["full_reference"]["lpips"] == pytest.approx(0.0, abs=1e-6)
        assert r["full_reference"]["dists"] == pytest.approx(0.0, abs=1e-5)
    # the LR is exactly D(HR): LR-consistency is perfect, the residual is only the LR's 8-bit rounding
    assert r["faithfulness"]["lr_consistency_db"] == CAP
    assert r["faithfulness"]["map"]["residual_mean"] < 0.5
    # a true HR image holds detail the LR cannot carry: the map says so (unsupported, not necessarily wrong)
    assert r["faithfulness"]["map"]["detail_mean"] > 2.0
    assert r["semantic"]["mean_iou"] == 1.0 and r["semantic"]["pixel_agreement"] == 1.0
    nr = r["no_reference"]
    assert nr["available"] is True and 0 < nr["values"]["niqe"] < 100
    for name in ("musiq", "clipiqa", "maniqa"):  # no weights offline: one line each, saying so
        assert nr["values"][name] is None and "weights not present" in nr["notes"][name]


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_lowers_fidelity_and_detail_and_raises_residual(hr, sigma):
    sharp, blurred = _score(hr, hr), _score(_blur(hr, sigma), hr, lpips=HAVE_LPIPS)
    assert blurred["full_reference"]["ssim_y"] < sharp["full_reference"]["ssim_y"] - 0.05
    if HAVE_LPIPS:
        assert blurred["full_reference"]["lpips"] > 0.05
    assert blurred["full_reference"]["psnr_y"] < 35.0
    fs, fb = sharp["faithfulness"], blurred["faithfulness"]
    # blurring invents nothing (less unexplained detail) but contradicts the input (more residual, lower LRC)
    assert fb["map"]["detail_mean"] < 0.7 * fs["map"]["detail_mean"]
    assert fb["map"]["residual_mean"] > fs["map"]["residual_mean"] + 1.0
    assert fb["lr_consistency_db"] < 45.0  # measured: 40.7 dB (sigma 1), 31.3 dB (sigma 2); identical: the cap


def test_more_blur_is_worse(hr):
    a, b = _score(_blur(hr, 1.0), hr), _score(_blur(hr, 2.0), hr)
    assert b["full_reference"]["ssim_y"] < a["full_reference"]["ssim_y"]
    assert b["faithfulness"]["lr_consistency_db"] < a["faithfulness"]["lr_consistency_db"]
    assert b["faithfulness"]["map"]["residual_mean"] > a["faithfulness"]["map"]["residual_mean"]


@pytest.mark.parametrize("px", [1, 4])
def test_known_shift_lowers_psnr_and_lr_consistency(hr, px):
    ref, shifted = _score(hr, hr), _score(_shift(hr, px), hr)
    assert shifted["full_reference"]["psnr_y"] < 30.0
    assert shifted["faithfulness"]["lr_consistency_db"] < ref["faithfulness"]["lr_consistency_db"] - 20
    assert shifted["faithfulness"]["map"]["residual_mean"] > 4 * ref["faithfulness"]["map"]["residual_mean"]


def test_larger_shift_is_worse(hr):
    one, four = _score(_shift(hr, 1), hr), _score(_shift(hr, 4), hr)
    assert four["full_reference"]["psnr_y"] < one["full_reference"]["psnr_y"]
    assert four["faithfulness"]["lr_consistency_db"] < one["faithfulness"]["lr_consistency_db"]


def test_bicubic_output_holds_little_unexplained_detail(hr):
    up = np.asarray(__import__("PIL.Image").Image.fromarray(_lr(hr)).resize(hr.shape[1::-1], 3))
    r, sharp = _score(up, hr), _score(hr, hr)
    assert r["faithfulness"]["map"]["detail_mean"] < 0.3 * sharp["faithfulness"]["map"]["detail_mean"]
    assert r["faithfulness"]["lr_consistency_db"] > 30.0


def test_invented_texture_is_localised_by_the_map_though_lrc_barely_sees_it(hr):
    """A checkerboard finer than the LR can carry: LR-consistency hardly moves, the map points at it."""
    fake = hr.copy()
    y, x = np.mgrid[0:64, 0:64]
    fake[64:128, 64:128] = np.clip(fake[64:128, 64:128].astype(int) + np.where((x + y) % 2, 40, -40)[..., None],
                                   0, 255).astype(np.uint8)
    lr = _lr(hr)
    maps = hallucination_map(fake, lr, window=9)
    assert maps["map"].shape == hr.shape[:2] and maps["map"].dtype == np.float32
    inside, outside = np.zeros(hr.shape[:2], bool), np.ones(hr.shape[:2], bool)
    inside[72:120, 72:120] = True
    outside[56:136, 56:136] = False
    added = maps["map"] - hallucination_map(hr, lr, window=9)["map"]  # what the fake texture added
    assert added[inside].mean() > 20.0  # luma levels; the checkerboard is +-40
    assert np.abs(added[outside]).mean() < 0.1  # nothing elsewhere: the map is local
    assert maps["detail"][inside].mean() > 3 * maps["detail"][outside].mean()  # above the crop's own detail
    assert lr_consistency(fake, lr, cap_db=CAP) > 35.0


def test_missing_lpips_weights_are_a_note_not_a_failure(hr, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSR_CACHE", str(tmp_path))  # an empty cache
    r = _score(hr, hr, lpips=True)
    assert r["full_reference"]["lpips"] is None and r["full_reference"]["dists"] is None
    assert "weights not present" in r["full_reference"]["note"] and "geosr weights fetch" in r["full_reference"]["note"]
    assert r["full_reference"]["psnr_y"] == CAP


# --------------------------------------------------------------------------------------------- semantic


def test_class_iou_on_known_label_maps():
    a = np.zeros((4, 4), np.int64)
    b = np.zeros((4, 4), np.int64)
    a[:2] = 1  # vegetation: top half
    b[:, :2] = 1  # vegetation: left half
    out = class_iou(a, b)
    assert out["iou"]["vegetation"] == pytest.approx(4 / 12)
    assert out["iou"]["other"] == pytest.approx(4 / 12)
    assert out["iou"]["water"] is None and out["iou"]["shadow"] is None
    assert out["mean_iou"] == pytest.approx(4 / 12) and out["pixel_agreement"] == 0.5


def test_upsampled_labels_repeat_each_lr_pixel():
    lab = np.array([[0, 1], [2, 3]])
    up = upsample_labels(lab, 3)
    assert up.shape == (6, 6) and (up[:3, 3:] == 1).all() and (up[3:, :3] == 2).all()


# -------------------------------------------------------------------------------------------- bad grids


def _lr_sr(make_tif, hr, *, sr_transform=T_SR, sr_crs=CRS, sr=None):
    lr = make_tif(np.moveaxis(_lr(hr), -1, 0), "lr.tif", crs=CRS, transform=T_SR @ Affine.scale(SCALE))
    sr = make_tif(np.moveaxis(hr if sr is None else sr, -1, 0), "sr.tif", crs=sr_crs, transform=sr_transform)
    return sr, lr


@pytest.mark.parametrize("case,pattern", [
    ("crs", "CRS EPSG:32632 differs from the LR's EPSG:2056"),
    ("nocrs", "CRS None differs from the LR's EPSG:2056"),
    ("extent", "extent"),
    ("grid", "grids do not line up"),
])
def test_sr_and_lr_that_do_not_line_up_are_refused_naming_the_file(make_tif, hr, case, pattern):
    if case in ("crs", "nocrs"):
        sr, lr = _lr_sr(make_tif, hr, sr_crs="EPSG:32632" if case == "crs" else None)
    elif case == "extent":  # the same grid, moved by 10 SR px
        sr, lr = _lr_sr(make_tif, hr, sr_transform=T_SR @ Affine.translation(10, 0))
    else:  # 190 px across the LR's 48 px: same extent, no integer scale
        cut = hr[:190, :190]
        sr, lr = _lr_sr(make_tif, hr, sr=cut, sr_transform=Affine(96 / 190, 0, T_SR.c, 0, -96 / 190, T_SR.f))
    with pytest.raises(GridError, match=pattern) as err:
        load_inputs(sr, lr)
    assert str(sr) in str(err.value) and "\n" not in str(err.value)


def test_reference_off_the_sr_grid_is_refused(make_tif, hr):
    sr, lr = _lr_sr(make_tif, hr)
    ref = make_tif(np.moveaxis(hr, -1, 0), "ref.tif", crs=CRS, transform=T_SR @ Affine.translation(0.5, 0))
    with pytest.raises(GridError, match="grids do not line up") as err:
        load_inputs(sr, lr, ref)
    assert str(ref) in str(err.value) and "resample the reference" in str(err.value)


def test_aligned_files_give_scale_and_pixel_size(make_tif, hr):
    sr, lr = _lr_sr(make_tif, hr)
    inp = load_inputs(sr, lr)
    assert inp.scale == SCALE and inp.pixel_m == pytest.approx((0.5, 0.5))
    assert inp.sr_rgb.shape == (192, 192, 3) and inp.lr_rgb.shape == (48, 48, 3) and inp.stretch is None
