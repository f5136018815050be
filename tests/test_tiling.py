"""Tiling math (pure) and the tiled == whole-image guarantees."""

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import texture
from geosr.config import EnhanceConfig
from geosr.models.base import SRModel
from geosr.models.resample import Replicate, bicubic
from geosr.scene import enhance_array
from geosr.tiling import AxisPlan, TileGrid, default_overlap, halo_for, output_transform, reflect_indices


@st.composite
def plans(draw, max_len=300):
    overlap = draw(st.integers(0, 25))
    halo = draw(st.none() | st.integers(0, overlap // 2))
    tile = draw(st.integers(2 * overlap + 1, 2 * overlap + 64))
    length = draw(st.integers(1, max_len))
    scale = draw(st.integers(1, 4))
    return AxisPlan(length, tile, overlap, scale, halo)


@given(plans())
@settings(max_examples=300, deadline=None)
def test_weights_sum_to_one_everywhere(plan):
    total = np.zeros(plan.length * plan.scale)
    for i, start in enumerate(plan.starts):
        w = plan.weights(i)
        o = start * plan.scale
        lo, hi = max(o, 0), min(o + w.size, total.size)
        if hi > lo:
            total[lo:hi] += w[lo - o:hi - o]
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)


@given(plans())
@settings(max_examples=300, deadline=None)
def test_segments_partition_output_and_match_weights(plan):
    segs = plan.segments
    assert segs[0][0] == 0 and segs[-1][1] == plan.length * plan.scale
    for (a0, b0, _), (a1, _, _) in zip(segs, segs[1:]):
        assert b0 == a1
    for a, b, cover in segs:
        assert cover, "every output pixel has at least one tile"
        for i in range(len(plan)):
            o = plan.starts[i] * plan.scale
            w = plan.weights(i)[a - o:b - o] if o <= a and b <= o + plan.tile * plan.scale else np.zeros(b - a)
            assert (i in cover) == bool(np.all(w > 0)), (i, a, b, cover)


@given(st.integers(1, 50), st.integers(-120, 120), st.integers(0, 120))
def test_reflect_indices_match_numpy_pad(length, start, extra):
    stop = start + extra
    idx = reflect_indices(start, stop, length)
    assert idx.min(initial=0) >= 0 and idx.max(initial=0) < length
    pad = max(0, -start) + 1, max(0, stop - length) + 1
    base = np.arange(length)
    padded = np.pad(base, pad, mode="reflect") if length > 1 else np.zeros(length + sum(pad), dtype=int)
    np.testing.assert_array_equal(idx, padded[start + pad[0]:stop + pad[0]])


def test_output_transform_keeps_corners():
    t = Affine(0.5, 0.0, 2679062.5, 0.0, -0.5, 1248000.0)
    o = output_transform(t, 4)
    assert o.a == 0.125 and o.e == -0.125 and (o.c, o.f) == (t.c, t.f)
    assert o @ (175 * 4, 120 * 4) == t @ (175, 120)


def test_plan_rejects_tile_too_small():
    with pytest.raises(ValueError, match="larger than 2 x overlap"):
        AxisPlan(100, 16, 8, 4)


def test_default_overlap_covers_receptive_field():
    for rf in (0, 1, 2, 7, 16, 20, 48):
        ov = default_overlap(rf)
        assert halo_for(rf, ov) == rf and ov - 2 * rf >= 2
    assert halo_for(48, 8) == 3  # a user's small overlap keeps a ramp of >= 2 px
    assert halo_for(5, 0) == 0


@given(h=st.integers(1, 90), w=st.integers(1, 90), overlap=st.integers(0, 16), extra=st.integers(1, 40),
       scale=st.integers(1, 4), bands=st.integers(1, 4), seed=st.integers(0, 1000),
       edge=st.sampled_from(["reflect", "cut", "reflect:1", "reflect:3"]))
@settings(max_examples=80, deadline=None)
def test_tiled_equals_whole_bit_for_bit_with_exact_model(h, w, overlap, extra, scale, bands, seed, edge):
    tile = 2 * overlap + extra
    arr = np.random.default_rng(seed).integers(0, 256, (bands, h, w), dtype=np.uint8)
    tiled = enhance_array(arr, EnhanceConfig(scale=scale, tile=tile, overlap=overlap, edge=edge), model=Replicate())
    whole = np.repeat(np.repeat(arr, scale, 1), scale, 2)
    np.testing.assert_array_equal(tiled, whole)


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_tiled_equals_whole_for_other_dtypes(dtype):
    arr = texture((3, 70, 83), dtype=dtype, hi=4000)
    tiled = enhance_array(arr, EnhanceConfig(scale=3, tile=20, overlap=8), model=Replicate())
    whole = enhance_array(arr, EnhanceConfig(scale=3, tile=200, overlap=8), model=Replicate())
    assert tiled.dtype == arr.dtype
    np.testing.assert_array_equal(tiled, whole)
    # integers survive the scene's radiometric scaling exactly; floats to float32 rounding
    np.testing.assert_allclose(tiled, np.repeat(np.repeat(arr, 3, 1), 3, 2), rtol=0, atol=1e-6 * float(arr.max()))


class BlurUp(SRModel):
    """Smooth deterministic model: 3x3 box blur (receptive field 1 px), then bicubic (2 px)."""

    name, channels, scales, receptive_field = "blur-up", None, (2, 3, 4), 3

    def upscale(self, x, scale):
        from scipy.ndimage import uniform_filter

        return bicubic().upscale(uniform_filter(x, size=(1, 3, 3), mode="nearest"), scale)


@pytest.mark.parametrize("edge", ["reflect", "cut", "reflect:2"])
@pytest.mark.parametrize("tile,overlap", [(32, 12), (40, 16), (57, 20)])
def test_tiled_within_one_dn_of_whole_with_smooth_model(tile, overlap, edge):
    arr = texture((3, 101, 77), seed=3)
    model = BlurUp()
    tiled = enhance_array(arr, EnhanceConfig(scale=4, tile=tile, overlap=overlap, edge=edge), model=model)
    whole = enhance_array(arr, EnhanceConfig(scale=4, tile=512, overlap=overlap, edge=edge), model=model)
    assert TileGrid.for_scene(101, 77, tile=tile, overlap=overlap, scale=4).shape != (1, 1)
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    assert diff.max() <= 1, diff.max()


def test_cut_edge_is_the_model_on_the_whole_unpadded_image():
    arr = texture((3, 61, 47), seed=5)
    model = BlurUp()
    tiled = enhance_array(arr, EnhanceConfig(scale=4, tile=32, overlap=12, edge="cut"), model=model)
    direct = np.clip(np.rint(model.upscale(arr.astype(np.float32) / 255, 4) * 255), 0, 255)
    assert np.abs(tiled.astype(int) - direct.astype(int)).max() <= 1


def test_too_little_overlap_shows_seams():
    """The smoothness guarantee comes from the halo: without it the same model differs from whole-image."""
    arr = texture((3, 101, 77), seed=3)
    model = BlurUp()
    tiled = enhance_array(arr, EnhanceConfig(scale=4, tile=32, overlap=0), model=model)
    whole = enhance_array(arr, EnhanceConfig(scale=4, tile=512, overlap=12), model=model)
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() > 1


def test_edge_modes_read_the_expected_pixels():
    from geosr.tiling import Tile, parse_edge

    t = Tile(0, 0, -5, -5, 20)  # starts 5 px before the scene edge
    rows, _ = t.source(10, 10, "reflect")
    assert rows.tolist()[:6] == [5, 4, 3, 2, 1, 0] and len(rows) == 20
    rows, _ = t.source(10, 10, "cut")
    assert rows.tolist() == list(range(10)) and t.read_origin("cut") == (0, 0)
    rows, _ = t.source(10, 10, "reflect:2")
    assert rows.tolist() == [2, 1] + list(range(10)) + [8, 7] and t.read_origin("reflect:2") == (-2, -2)
    assert parse_edge("reflect") is None and parse_edge("cut") == 0 and parse_edge("reflect:10") == 10
    with pytest.raises(ValueError, match="reflect:N"):
        parse_edge("mirror")
