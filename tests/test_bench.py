"""The BENCHMARK.md protocol reproduces the published anchor numbers (PSNR-Y within +-0.05 dB)."""

import numpy as np
import pytest

from geosr import bench
from geosr.errors import ConfigError

ANCHORS = {  # (degradation, method): (PSNR-Y, SSIM-Y, LRC) from shared/BENCHMARK.md
    ("clean", "bicubic"): (27.28, 0.7359, 37.52),
    ("real", "bicubic"): (25.98, 0.6490, 39.73),
    ("clean", "rrdn-gan"): (27.57, 0.7516, 38.53),
    ("real", "rrdn-gan"): (25.61, 0.6226, 40.11),
    ("clean", "realesrgan-x4plus"): (25.81, 0.7008, 31.53),
    ("real", "realesrgan-x4plus"): (24.51, 0.6206, 28.90),
}


def _check(rows):
    for r in rows:
        psnr, ssim, lrc = ANCHORS[(r.degradation, r.method)]
        assert r.psnr_y == pytest.approx(psnr, abs=0.05), r
        assert r.ssim_y == pytest.approx(ssim, abs=0.005), r
        assert r.lrc == pytest.approx(lrc, abs=0.3), r


def test_crops_and_degradations(data):
    crops = bench.load_crops()
    assert len(crops) == 5 and all(c.shape == (512, 512, 3) and c.dtype == np.uint8 for c in crops)
    lr_clean = bench.degrade(crops[0], "clean", 0)
    lr_real = bench.degrade(crops[0], "real", 0)
    assert lr_clean.shape == lr_real.shape == (128, 128, 3)
    assert 25 < bench.psnr(lr_clean, lr_real) < 40  # blur + noise + JPEG really degrade
    np.testing.assert_array_equal(lr_real, bench.degrade(crops[0], "real", 0))  # seeded
    # outside the protocol: `real` without its JPEG, which the default's choice of network does not see
    from geosr.models.compression import JPEG_THRESHOLD, jpeg_evidence

    lr_noisy = bench.degrade(crops[0], "noisy", 0)
    chw = lambda a: np.moveaxis(a, -1, 0) / 255.0  # noqa: E731
    assert jpeg_evidence(chw(lr_real)) > JPEG_THRESHOLD > jpeg_evidence(chw(lr_noisy))
    assert jpeg_evidence(chw(lr_clean)) < JPEG_THRESHOLD
    assert 25 < bench.psnr(lr_noisy, lr_real) < 40 and 30 < bench.psnr(lr_clean, lr_noisy) < 40
    with pytest.raises(ConfigError, match="unknown degradation 'blurry'"):
        bench.run_bench(methods=["bicubic"], degradations=["blurry"])


def test_bicubic_reproduces_anchor(data):
    _check(bench.run_bench(methods=["bicubic"], lpips=False))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rrdn-gan", "realesrgan-x4plus"])
def test_networks_reproduce_anchor(data, method):
    _check(bench.run_bench(methods=[method], lpips=False))


@pytest.mark.slow
def test_lpips_column_matches_anchor_for_rrdn(data):
    (row,) = bench.run_bench(methods=["rrdn-gan"], degradations=["clean"])
    assert row.lpips == pytest.approx(0.1518, abs=0.005)
