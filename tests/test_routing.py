"""Choosing the model by what the input went through (geosr.models.compression, geosr.models.routed): JPEG is told
apart from clean and noisy imagery wherever a tile is cut, a scene takes one route for all of its tiles, and the
default sends each kind of input to its own network."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import texture

from geosr.config import EnhanceConfig
from geosr.models.base import SRModel
from geosr.models.compression import JPEG_THRESHOLD, jpeg_evidence
from geosr.models.routed import CLEAN, COMPRESSED, RoutedSR
from geosr.scene import SAMPLE_SIDE, enhance_array, scene_sample


def _image(side: int, seed: int = 0) -> np.ndarray:
    """``(side, side, 3)`` uint8: smooth texture with sharp edges (a block pattern), like imagery."""
    t = texture((3, side, side), seed=seed).astype(np.float64)
    yy, xx = np.mgrid[0:side, 0:side]
    blocks = 60.0 * (((yy // 11) + (xx // 7)) % 2)
    return np.clip(np.moveaxis(t * 0.7 + blocks[None], 0, -1), 0, 255).astype(np.uint8)


def _jpeg(hwc: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB" if hwc.ndim == 3 else "L"))


def _chw(hwc: np.ndarray) -> np.ndarray:
    return np.moveaxis(hwc, -1, 0).astype(np.float32) / 255


@pytest.mark.parametrize("quality, least", [(50, 0.9), (70, 0.9), (90, JPEG_THRESHOLD)])
def test_jpeg_evidence_sees_compression_at_any_grid_offset_and_not_clean_or_noisy_pixels(quality, least):
    img = _image(160)
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    assert jpeg_evidence(_chw(img)) < 0.3
    assert jpeg_evidence(_chw(noisy)) < 0.3  # noise is not compression
    compressed = _jpeg(noisy, quality)
    assert jpeg_evidence(_chw(compressed)) > least
    assert jpeg_evidence(_chw(compressed[3:, 5:])) > least  # a tile cut off JPEG's 8 px grid
    grey = _jpeg(noisy[..., 1], quality)[None].astype(np.float32) / 255
    assert jpeg_evidence(grey) > least  # one band (a panchromatic JPEG)
    # resampling after JPEG undoes the evidence (and the blocks): that input is not treated as compressed
    small = np.asarray(Image.fromarray(compressed).resize((80, 80), Image.BICUBIC))
    assert jpeg_evidence(_chw(small)) < JPEG_THRESHOLD
    assert jpeg_evidence(_chw(img[:12, :12])) == 0.0  # too small to judge


class _Const(SRModel):
    """Upscales to a constant: which model ran shows in the output."""

    def __init__(self, name, value, scales, consistency):
        self.name, self.value, self.scales = name, value, scales
        self.consistency = self.default_consistency = consistency
        self.scenes = []

    def begin_scene(self, overview, *, gsd=None, grid=None, sample=None):
        self.scenes.append(sample.shape)

    def upscale(self, x, scale):
        return np.full((x.shape[0], x.shape[1] * scale, x.shape[2] * scale), self.value, dtype=np.float32)


def _router():
    clean = _Const("clean-net", 0.25, (4,), 0.5)
    compressed = _Const("compressed-net", 0.75, (2, 4), 0.0)
    return RoutedSR(name="routed", clean=clean, compressed=compressed, description="test"), clean, compressed


def test_a_scene_takes_one_route_by_its_compression_and_the_routes_projection():
    router, clean, compressed = _router()
    img = _image(200, seed=1)
    for lr, route, value in ((img, CLEAN, 64), (_jpeg(img, 70), COMPRESSED, 191)):
        chw = np.moveaxis(lr, -1, 0)
        out = enhance_array(chw, EnhanceConfig(scale=4, tile=64), model=router)  # 16 tiles, one route
        assert router.route == route
        assert router.consistency == (0.5 if route == CLEAN else 0.0)
        if route == COMPRESSED:  # no projection: the constant as it came
            assert out.shape == (3, 800, 800) and (out == value).all()
    assert len(clean.scenes) == 1 and len(compressed.scenes) == 1  # begin_scene reaches only the model that runs
    assert clean.scenes[0] == (3, 200, 200)  # a small scene is judged whole
    # x2 is only the compressed model's: it runs whatever the input
    out = enhance_array(np.moveaxis(img, -1, 0), EnhanceConfig(scale=2), model=router)
    assert router.route == CLEAN and (out == 191).all()


def test_outside_a_scene_run_each_tile_is_judged_itself():
    router, _, _ = _router()
    img = _image(64, seed=2)
    assert (router.upscale(_chw(img), 4) == 0.25).all()
    assert (router.upscale(_chw(_jpeg(img, 70)), 4) == 0.75).all()
    assert router.route is None


def test_a_large_scene_is_judged_on_five_full_resolution_windows_on_the_8px_grid(make_tif):
    from geosr.io.read import open_scene

    big = _jpeg(_image(1200, seed=3)[:, :1000], 70)  # (1200, 1000, 3), JPEG grid at the scene origin
    path = make_tif(np.moveaxis(big, -1, 0), name="big.tif")
    scene = open_scene(path)
    sample = scene_sample(scene)
    assert sample.shape == (3, SAMPLE_SIDE, 5 * SAMPLE_SIDE) and sample.dtype == np.float32
    # the centre window: its corner at (600 - 128, 500 - 128) brought down to multiples of 8
    np.testing.assert_allclose(sample[:, :, :SAMPLE_SIDE], _chw(big[472:728, 368:624]), atol=1e-6)
    assert jpeg_evidence(sample) > 0.8  # one grid phase across the windows


def test_a_distributed_worker_takes_the_clients_route(make_tif):
    """Workers build their own model from the run's spec: the spec carries the windows the route is judged on."""
    pytest.importorskip("distributed")
    from geosr.io.read import open_scene
    from geosr.lazy import enhance_lazy
    from geosr.models import get_model
    from geosr.worker import RunRef, build_run

    if not get_model("aerial-x4").weights_present():
        pytest.skip("aerial-x4's weights missing (geosr weights fetch)")
    img = _image(600, seed=4)  # above OVERVIEW_SIDE: the overview is decimated and has lost JPEG's grid
    for lr, route in ((img, CLEAN), (_jpeg(img, 70), COMPRESSED)):
        scene = open_scene(make_tif(np.moveaxis(lr, -1, 0), name=f"{route}.tif"))
        lazy = enhance_lazy(scene, EnhanceConfig(scale=4), remote=True)
        graph = dict(lazy.array.__dask_graph__())
        ((ref, spec),) = [v for k, v in graph.items() if str(k).startswith("geosr-run-")]
        assert ref is RunRef and spec.sample.shape == (3, SAMPLE_SIDE, 5 * SAMPLE_SIDE)
        assert build_run(spec).model.route == route
