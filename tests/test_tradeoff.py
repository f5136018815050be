"""benchmarks/tradeoff.py's luma filter: it changes the luma's detail only, and by the amount asked."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from geosr.models.consistency import _YCBCR

_SPEC = importlib.util.spec_from_file_location("tradeoff", Path(__file__).parents[1] / "benchmarks" / "tradeoff.py")
tradeoff = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tradeoff)


def _ycc(rgb):
    return np.einsum("ij,jhw->ihw", _YCBCR, rgb)


@pytest.mark.parametrize("amount", [0.5, -0.3])
def test_luma_unsharp_scales_the_luma_detail_and_keeps_the_colour(amount):
    rgb = np.random.default_rng(0).uniform(0, 255, (3, 32, 40))
    out = tradeoff.luma_unsharp(rgb, 1.0, amount)
    before, after = _ycc(rgb), _ycc(out)
    np.testing.assert_allclose(after[1:], before[1:], atol=1e-9)  # Cb, Cr untouched
    detail = before[0] - gaussian_filter(before[0], 1.0)
    np.testing.assert_allclose(after[0], before[0] + amount * detail, atol=1e-9)
    assert np.abs(after[0] - before[0]).max() > 1.0  # it did change the luma


def test_luma_unsharp_with_no_amount_is_the_input_and_bad_filters_are_refused():
    rgb = np.ones((3, 8, 8))
    assert tradeoff.luma_unsharp(rgb, 1.0, 0.0) is rgb
    assert tradeoff._parse_filters("0.5:0.3,1:-0.2") == [(0.0, 0.0), (0.5, 0.3), (1.0, -0.2)]
    for bad in ("0.5", "x:1", "0:0.3"):
        with pytest.raises(SystemExit, match="--filters"):
            tradeoff._parse_filters(bad)


def test_a_routed_model_is_refused_with_the_networks_to_pass_instead():
    with pytest.raises(SystemExit, match="aerial-x4-jpeg"):
        tradeoff.main(["--model", "aerial-x4"])
