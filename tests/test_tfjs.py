"""The TF.js layers-format interpreter (against numpy references) and the converted RRDN-GAN x4."""

import json
import shutil

import numpy as np
import pytest
import torch

from geosr.errors import WeightsError
from geosr.models import tfjs

# ------------------------------------------------------------------------------------------ numpy references


def tf_same_pad(size, k, s, d):
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


def np_conv2d(x, kernel, bias, stride=(1, 1), padding="same", dilation=(1, 1)):
    """Keras Conv2D on one (H, W, C) image with an HWIO kernel, written out from the definition."""
    kh, kw, cin, cout = kernel.shape
    if padding == "same":
        (t, b), (l, r) = tf_same_pad(x.shape[0], kh, stride[0], dilation[0]), \
            tf_same_pad(x.shape[1], kw, stride[1], dilation[1])
        x = np.pad(x, ((t, b), (l, r), (0, 0)))
    H, W = x.shape[:2]
    oh = (H - ((kh - 1) * dilation[0] + 1)) // stride[0] + 1
    ow = (W - ((kw - 1) * dilation[1] + 1)) // stride[1] + 1
    out = np.zeros((oh, ow, cout), np.float64)
    for i in range(oh):
        for j in range(ow):
            for u in range(kh):
                for v in range(kw):
                    px = x[i * stride[0] + u * dilation[0], j * stride[1] + v * dilation[1]]
                    out[i, j] += px @ kernel[u, v]
    return out + (bias if bias is not None else 0.0)


def np_depth_to_space(x, b):
    """tf.nn.depth_to_space, NHWC: out[h*b + i, w*b + j, c] = in[h, w, (i*b + j)*C + c]."""
    H, W, cin = x.shape
    C = cin // (b * b)
    out = np.zeros((H * b, W * b, C), x.dtype)
    for h in range(H):
        for w in range(W):
            for i in range(b):
                for j in range(b):
                    for c in range(C):
                        out[h * b + i, w * b + j, c] = x[h, w, (i * b + j) * C + c]
    return out


# ----------------------------------------------------------------------------------- tiny model.json fixtures


def conv_layer(name, inbound, filters, k=3, strides=1, padding="same", dilation=1, activation="linear",
               use_bias=True):
    return {"class_name": "Conv2D", "name": name, "inbound_nodes": [[[inbound, 0, 0, {}]]],
            "config": {"name": name, "filters": filters, "kernel_size": [k, k], "strides": [strides, strides],
                       "padding": padding, "data_format": "channels_last", "dilation_rate": [dilation, dilation],
                       "groups": 1, "activation": activation, "use_bias": use_bias}}


def merge_layer(cls, name, inbound, **cfg):
    return {"class_name": cls, "name": name, "config": {"name": name, **cfg},
            "inbound_nodes": [[[i, 0, 0, {}] for i in inbound]]}


def input_layer(channels=3):
    return {"class_name": "InputLayer", "name": "inp", "inbound_nodes": [],
            "config": {"name": "inp", "batch_input_shape": [None, None, None, channels], "dtype": "float32"}}


def model_json(layers, output, weights, n_shards=2):
    """A layers-format model.json plus its shards: weights is [(name, array, quant)], quant in
    {None, 'uint8', 'float16'}. Returns (json dict, shards dict, dequantized arrays as TF.js sees them)."""
    specs, blobs, seen = [], [], {}
    for name, arr, quant in weights:
        arr = np.asarray(arr, np.float32)
        spec = {"name": name, "shape": list(arr.shape), "dtype": "float32"}
        if quant == "uint8":
            lo, hi = float(arr.min()), float(arr.max())
            scale = (hi - lo) / 255.0
            q = np.clip(np.round((arr - lo) / scale), 0, 255).astype(np.uint8)
            spec["quantization"] = {"dtype": "uint8", "min": lo, "scale": scale, "original_dtype": "float32"}
            blobs.append(q.tobytes())
            seen[name] = (np.float32(lo) + np.float32(scale) * q.astype(np.float32)).astype(np.float32)
        elif quant == "float16":
            h = arr.astype("<f2")
            spec["quantization"] = {"dtype": "float16", "original_dtype": "float32"}
            blobs.append(h.tobytes())
            seen[name] = h.astype(np.float32)
        else:
            blobs.append(arr.astype("<f4").tobytes())
            seen[name] = arr
        specs.append(spec)
    buf = b"".join(blobs)
    cut = [len(buf) * i // n_shards for i in range(n_shards + 1)]  # cuts fall inside weights on purpose
    paths = [f"group1-shard{i + 1}of{n_shards}.bin" for i in range(n_shards)]
    shards = {p: buf[cut[i]:cut[i + 1]] for i, p in enumerate(paths)}
    mj = {"format": "layers-model", "generatedBy": "test", "convertedBy": "test",
          "modelTopology": {"keras_version": "2.4.0", "backend": "tensorflow", "model_config": {
              "class_name": "Functional", "config": {"name": "tiny", "layers": layers,
                                                     "input_layers": [["inp", 0, 0]],
                                                     "output_layers": [[output, 0, 0]]}}},
          "weightsManifest": [{"paths": paths, "weights": specs}]}
    return mj, shards, seen


def _tiny_graph(rng):
    """inp(3) -> a: conv3x3 relu (12) ; b: conv1x1 (12) ; add -> *0.2 -> concat(add', b) -> conv3x3 (12)
    -> depth-to-space 2 -> (3 channels) -> conv3x3 (3)."""
    layers = [
        input_layer(),
        conv_layer("a", "inp", 12, activation="relu"),
        conv_layer("b", "inp", 12, k=1),
        merge_layer("Add", "add", ["a", "b"]),
        merge_layer("MultiplyBeta", "beta", ["add"], beta=0.2),
        merge_layer("Concatenate", "cat", ["beta", "b"], axis=3),
        conv_layer("c", "cat", 12),
        merge_layer("PixelShuffle", "ps", ["c"], scale=2),
        conv_layer("out", "ps", 3),
    ]
    weights = [
        ("a/kernel", rng.normal(0, 0.3, (3, 3, 3, 12)), "uint8"),
        ("a/bias", rng.normal(0, 0.1, (12,)), "uint8"),
        ("b/kernel", rng.normal(0, 0.3, (1, 1, 3, 12)), None),
        ("b/bias", rng.normal(0, 0.1, (12,)), "float16"),
        ("c/kernel", rng.normal(0, 0.2, (3, 3, 24, 12)), "uint8"),
        ("c/bias", rng.normal(0, 0.1, (12,)), None),
        ("out/kernel", rng.normal(0, 0.3, (3, 3, 3, 3)), "uint8"),
        ("out/bias", rng.normal(0, 0.1, (3,)), "uint8"),
    ]
    return layers, weights


def _reference(x_hwc, w):
    a = np.maximum(np_conv2d(x_hwc, w["a/kernel"], w["a/bias"]), 0.0)
    b = np_conv2d(x_hwc, w["b/kernel"], w["b/bias"])
    cat = np.concatenate([(a + b) * 0.2, b], axis=-1)
    c = np_conv2d(cat, w["c/kernel"], w["c/bias"])
    return np_conv2d(np_depth_to_space(c, 2), w["out/kernel"], w["out/bias"])


# ------------------------------------------------------------------------------------------------------ tests


def test_read_weights_dequantizes_across_shards():
    rng = np.random.default_rng(0)
    layers, weights = _tiny_graph(rng)
    mj, shards, seen = model_json(layers, "out", weights, n_shards=3)
    got = tfjs.read_weights(mj, shards.__getitem__)
    assert set(got) == set(seen)
    for name, arr in seen.items():
        assert got[name].dtype == np.float32 and got[name].shape == arr.shape
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
    # uint8 dequantization is min + scale * q: the values must differ from the unquantized ones a little
    orig = dict((n, a) for n, a, _ in weights)
    err = np.abs(got["a/kernel"] - orig["a/kernel"]).max()
    spec = mj["weightsManifest"][0]["weights"][0]["quantization"]
    assert 0 < err <= spec["scale"] / 2 + 1e-6


def test_tiny_graph_matches_numpy_reference():
    rng = np.random.default_rng(1)
    layers, weights = _tiny_graph(rng)
    mj, shards, seen = model_json(layers, "out", weights)
    model = tfjs.convert(mj, shards.__getitem__)
    x = rng.random((2, 3, 7, 9)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    assert y.shape == (2, 3, 14, 18)
    for n in range(2):
        ref = _reference(np.moveaxis(x[n], 0, -1).astype(np.float64), seen)
        np.testing.assert_allclose(np.moveaxis(y[n], 0, -1), ref, rtol=1e-4, atol=1e-4)


def test_depth_to_space_is_tf_order_not_torch_pixel_shuffle():
    x = np.arange(2 * 3 * 4 * 12, dtype=np.float32).reshape(2, 12, 3, 4)
    got = tfjs.depth_to_space(torch.from_numpy(x), 2).numpy()
    for n in range(2):
        ref = np_depth_to_space(np.moveaxis(x[n], 0, -1), 2)
        np.testing.assert_array_equal(np.moveaxis(got[n], 0, -1), ref)
    assert not np.array_equal(got, torch.nn.functional.pixel_shuffle(torch.from_numpy(x), 2).numpy())


@pytest.mark.parametrize("k,stride,padding,dilation,size", [
    (3, 2, "same", 1, (7, 8)),  # odd/even sizes with stride: TF pads the odd pixel after
    (4, 1, "same", 1, (6, 5)),  # even kernel: asymmetric padding
    (4, 3, "same", 1, (10, 9)),
    (3, 1, "same", 2, (8, 8)),  # dilation
    (3, 2, "valid", 1, (9, 8)),
    (2, 1, "valid", 2, (6, 7)),
])
def test_conv2d_padding_stride_dilation(k, stride, padding, dilation, size):
    rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
    layers = [input_layer(2), conv_layer("c", "inp", 5, k=k, strides=stride, padding=padding, dilation=dilation,
                                         activation="tanh")]
    weights = [("c/kernel", rng.normal(0, 0.5, (k, k, 2, 5)), None), ("c/bias", rng.normal(0, 0.1, (5,)), None)]
    mj, shards, seen = model_json(layers, "c", weights, n_shards=1)
    model = tfjs.convert(mj, shards.__getitem__)
    x = rng.random((1, 2, *size)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()[0]
    ref = np.tanh(np_conv2d(np.moveaxis(x[0], 0, -1).astype(np.float64), seen["c/kernel"], seen["c/bias"],
                            (stride, stride), padding, (dilation, dilation)))
    assert np.moveaxis(y, 0, -1).shape == ref.shape
    np.testing.assert_allclose(np.moveaxis(y, 0, -1), ref, rtol=1e-5, atol=1e-5)


def test_input_output_ranges_are_applied():
    layers = [input_layer(1), conv_layer("c", "inp", 1, k=1)]
    weights = [("c/kernel", np.full((1, 1, 1, 1), 1.0), None), ("c/bias", np.zeros(1), None)]
    mj, shards, _ = model_json(layers, "c", weights, n_shards=1)
    model = tfjs.convert(mj, shards.__getitem__, input_range=(0, 255), output_range=(-1, 1))
    x = torch.tensor([0.0, 0.5, 1.0]).reshape(1, 1, 1, 3)
    # identity network: x -> 255 x -> (255 x + 1) / 2
    np.testing.assert_allclose(model(x).detach().numpy().ravel(), (255 * x.numpy().ravel() + 1) / 2, rtol=1e-6)


def test_broken_inputs_raise():
    rng = np.random.default_rng(2)
    layers, weights = _tiny_graph(rng)
    mj, shards, _ = model_json(layers, "out", weights, n_shards=1)
    (path, blob), = shards.items()
    with pytest.raises(WeightsError, match="bytes"):
        tfjs.read_weights(mj, {path: blob[:-1]}.__getitem__)
    with pytest.raises(WeightsError, match="bytes"):
        tfjs.read_weights(mj, {path: blob + b"\0"}.__getitem__)
    bad = json.loads(json.dumps(mj))
    bad["weightsManifest"][0]["weights"][2]["shape"] = [1, 1, 12, 3]  # same size, wrong shape for b/kernel
    with pytest.raises(WeightsError, match="b/kernel"):
        tfjs.convert(bad, shards.__getitem__)
    lam = json.loads(json.dumps(mj))
    lam["modelTopology"]["model_config"]["config"]["layers"][4]["class_name"] = "Lambda"
    with pytest.raises(NotImplementedError, match="Lambda"):
        tfjs.convert(lam, shards.__getitem__)


def test_load_rebuilds_from_safetensors_alone(tmp_path):
    from geosr.models.sources import read_provenance, save_weights

    rng = np.random.default_rng(3)
    layers, weights = _tiny_graph(rng)
    mj, shards, _ = model_json(layers, "out", weights)
    model = tfjs.convert(mj, shards.__getitem__)
    meta = {k: "test" for k in ("package", "version", "registry", "member", "sha256", "license", "converter")}
    meta["topology"] = json.dumps(mj["modelTopology"])
    path = save_weights(model.state_dict(), tmp_path / "tiny.safetensors", meta)
    assert read_provenance(path)["topology"] == meta["topology"]
    loaded = tfjs.load(path)
    assert not loaded.training
    x = torch.rand(1, 3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------- the real RRDN-GAN x4 (slow)

# PSNR-Y (dB) of the whole-image output (one 128x128 LR tile, no tiling) against the HR crop, per
# benchmark crop, clean degradation; measured with this converter (mean 27.561, SSIM-Y 0.7515;
# shared/BENCHMARK.md lists 27.57 / 0.7516 for the same network).
RRDN_PSNR_Y = (25.1081, 25.7350, 30.3397, 31.4844, 25.1393)


@pytest.mark.slow
def test_rrdn_gan_fetch_load_and_quality(tmp_path, data):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    from geosr import bench
    from geosr.models.sources import PROVENANCE_KEYS, read_provenance

    path = tfjs.fetch(tmp_path)
    assert path == tmp_path / "rrdn_gan_x4.safetensors" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing else left behind
    meta = read_provenance(path)
    assert all(k in meta for k in PROVENANCE_KEYS)
    assert meta["package"] == "@upscalerjs/models" and meta["version"] == "0.9.0" and meta["registry"] == "npm"
    assert meta["member"] == "package/models/idealo/gans/model.json"
    assert meta["license"] == "Apache-2.0" and meta["converter"] == "geosr.models.tfjs"
    assert meta["sha256"] == tfjs.TGZ_SHA256
    mtime = path.stat().st_mtime_ns
    assert tfjs.fetch(tmp_path) == path and path.stat().st_mtime_ns == mtime  # idempotent

    model = tfjs.load(path)
    assert sum(p.numel() for p in model.parameters()) == 4_176_100
    psnrs = []
    for i, hr in enumerate(bench.load_crops(data)):
        lr = bench.degrade(hr, "clean", i)
        x = torch.from_numpy(lr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        with torch.inference_mode():
            y = model(x)
        assert y.shape == (1, 3, 512, 512) and y.dtype == torch.float32
        sr = np.clip(np.round(y[0].permute(1, 2, 0).numpy() * 255.0), 0, 255).astype(np.uint8)
        psnrs.append(bench.psnr(bench.luma(hr), bench.luma(sr)))
    np.testing.assert_allclose(psnrs, RRDN_PSNR_Y, atol=0.01)
    assert abs(np.mean(psnrs) - 27.57) < 0.02
