"""What a plain run uses (issue 6, so far): aerial-x4, which runs geosr's trained stage 1 retrained on damaged pairs
(aerial-x4-jpeg) on JPEG-compressed imagery and RRDN-GAN tuned on clean aerial downscales (rrdn-aerial-clean) on the
rest, each with its LR-consistency projection; both are committed, show their provenance, and reproduce stored
outputs, as do the earlier stage-1 releases. RRDN-GAN projects by default too."""

from pathlib import Path

import numpy as np
import pytest

from geosr.bench import lr_consistency
from geosr.config import EnhanceConfig, data_dir
from geosr.errors import ConfigError
from geosr.models import (
    CLEAN_INTERPOLATION,
    DEFAULT_MODEL,
    RESR_INTERPOLATION,
    get_model,
)
from geosr.models.fusion import EXPERTS, WEIGHTS
from geosr.models.networks import TunedSR

HERE = Path(__file__).resolve().parent
SLICE = HERE / "data" / "aerial_x4_slice.npz"  # `python tests/test_default_model.py aerial-x4-fusion`
# the default on input without JPEG (its clean route): `python tests/test_default_model.py aerial-x4-clean`
CLEAN_SLICE = HERE / "data" / "aerial_x4_clean_slice.npz"
JPEG_SLICE = HERE / "data" / "aerial_x4_jpeg_slice.npz"  # `python tests/test_default_model.py aerial-x4-jpeg`
V2_SLICE = HERE / "data" / "aerial_x4_v2_slice.npz"  # `python tests/test_default_model.py aerial-x4-v2`
V1_SLICE = HERE / "data" / "aerial_x4_v1_slice.npz"  # `python tests/test_default_model.py aerial-x4-v1`
X2_SLICE = HERE / "data" / "aerial_x2_slice.npz"  # `python tests/test_default_model.py aerial-x2`
X2_FAST_SLICE = HERE / "data" / "aerial_x2_fast_slice.npz"  # `python tests/test_default_model.py aerial-x2-fast`
MMSR_SLICE = HERE / "data" / "mmsr_aerial_x4_slice.npz"  # written by `python tests/test_default_model.py mmsr`
FIXTURE = data_dir() / "fixtures" / "zurich_swissimage_tile00_175x120.tif"
experts_present = all(get_model(name).weights_present() for name in EXPERTS)
x2_experts_present = all(get_model(name).weights_present() for name in get_model("aerial-x2").experts)


def _input(clean: bool = False) -> np.ndarray:
    """(3, 48, 48) uint8 from the JPEG-compressed fixture; ``clean``: a 96 px window brought down by 2 (antialiased
    bicubic), which leaves no trace of JPEG's grid."""
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    with rasterio.open(FIXTURE) as src:
        if not clean:
            return src.read(window=Window(40, 30, 48, 48))
        window = np.moveaxis(src.read(window=Window(40, 12, 96, 96)), 0, -1)
    return np.moveaxis(np.asarray(Image.fromarray(window).resize((48, 48), Image.BICUBIC)), -1, 0)


def _settings(name: str | None) -> dict:
    return {"model": name, "scale": 2} if name and name.startswith("aerial-x2") else {"model": name} if name else {}


def _run(clean: bool = False, **settings) -> np.ndarray:
    from geosr.scene import enhance_array

    return enhance_array(_input(clean), EnhanceConfig(**{"scale": 4, "threads": 2, **settings}))


@pytest.mark.skipif(not (get_model("rrdn-gan").weights_present() and FIXTURE.is_file()),
                    reason="RRDN-GAN weights or the fixture missing")
def test_rrdn_gan_projects_onto_its_input_and_can_run_as_published():
    lr = _input()
    plain, raw = _run(model="rrdn-gan"), _run(model="rrdn-gan", consistency=0.0)
    hwc = lambda a: np.moveaxis(a, 0, -1)  # noqa: E731
    assert lr_consistency(hwc(plain), hwc(lr)) > lr_consistency(hwc(raw), hwc(lr)) + 10
    assert np.abs(plain.astype(int) - raw.astype(int)).mean() < 3  # a correction, not another image


def test_the_default_chooses_between_two_trained_networks_committed_and_listed(run_cli):
    from geosr.models.routed import CLEAN, COMPRESSED

    default = get_model()
    assert DEFAULT_MODEL == "aerial-x4" and default.name == "aerial-x4"
    assert default.routes[CLEAN] is get_model("rrdn-aerial-clean")
    assert default.routes[COMPRESSED] is get_model("aerial-x4-jpeg")
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 5_000_000
    prov = get_model("aerial-x4-fusion").provenance()
    assert "committed with geosr" in prov["registry"] and int(prov["trained_steps"]) > 0
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr
    assert next(ln for ln in proc.stdout.splitlines() if ln.startswith("aerial-x4 ")).endswith("[default]")
    assert "geosr-trained:aerial-fusion-x4" in proc.stdout
    # the fusion's third expert: RRDN-GAN fine-tuned here, committed as a float16 difference from the npm weights
    tuned = get_model("rrdn-aerial")
    assert tuned.delta.is_file() and tuned.delta.stat().st_size < 10_000_000
    if tuned.weights_present():
        assert "geosr-trained:rrdn-aerial-delta" in proc.stdout
    if default.weights_present():  # the default's provenance names both networks and their files
        member = default.provenance()["member"]
        assert "clean input: rrdn-aerial-clean = rrdn-gan from @upscalerjs/models" in member
        assert "+ 0.5 x rrdn-aerial-clean-delta.safetensors" in member  # halfway to its fine-tuned weights
        assert "compressed input: aerial-x4-jpeg = aerial-fusion-x4-jpeg.safetensors" in member
        assert "geosr-trained:rrdn-aerial-clean-delta+aerial-fusion-x4-jpeg==" in proc.stdout
    # the compressed route's network: the fusion's recipe on the damaged pairs only, with its own projection
    import json

    from safetensors import safe_open

    from geosr.models.fusion import WEIGHTS_JPEG

    jpeg = get_model("aerial-x4-jpeg")
    assert jpeg.path == WEIGHTS_JPEG and WEIGHTS_JPEG.stat().st_size < 5_000_000
    with safe_open(str(WEIGHTS_JPEG), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["damaged_only"] is True and int(meta["pairs"]) < 188
    # its projection corrects half of the luma's disagreement and none of the colour's; colour detail on half the grid
    assert (jpeg.consistency, jpeg.chroma_consistency, jpeg.chroma_factor) == (0.5, 0.0, 2)
    jpeg.configure(EnhanceConfig(model="aerial-x4-jpeg", consistency=0.3))  # the user's strength: every band
    assert (jpeg.consistency, jpeg.chroma_consistency) == (0.3, None)
    jpeg.configure(EnhanceConfig(model="aerial-x4-jpeg"))
    assert (jpeg.consistency, jpeg.chroma_consistency) == (0.5, 0.0)
    # its candidates: aerial-x4-fusion's, with Real-ESRGAN halfway to its aerial fine-tuning, run on two turned views
    # of the input, in place of Real-ESRGAN
    assert jpeg.experts == ("rrdn-gan", "rrdn-aerial", "realesrgan-aerial-2v")
    assert set(get_model("aerial-x4-fusion").experts) - set(jpeg.experts) == {"realesrgan-x4plus"}


def test_the_clean_imagery_expert_is_committed_small_in_int8_and_tuned_on_clean_pairs(run_cli):
    import json

    import torch
    from safetensors import safe_open

    model = get_model("rrdn-aerial-clean")
    assert model.delta.is_file() and model.delta.stat().st_size < 5_000_000  # int8: half of rrdn-aerial's file
    with safe_open(str(model.delta), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"I8"}
    scales = json.loads(meta["int8_scales"])
    assert set(scales) == keys and all(0 < v < 1 for v in scales.values())  # one scale per tensor
    recipe = json.loads(meta["config"])
    assert (recipe["p_clean"], recipe["p_light"], recipe["base"]) == (1.0, 0.0, "rrdn-gan")
    if model.weights_present():
        proc = run_cli("models")
        assert proc.returncode == 0 and "geosr-trained:rrdn-aerial-clean-delta" in proc.stdout
        x = _input().astype(np.float32)[:, :16, :16] / 255  # loads onto the cached npm tensors (hash checked)
        tuned, base = model.upscale(x, 4), get_model("rrdn-gan").upscale(x, 4)
        assert tuned.shape == (3, 64, 64) and 0 < np.abs(tuned - base).mean() < 0.05  # tuned: moved, not replaced
        # its colour detail is kept to the LR grid (as the fusion's): the same network without that, then limited
        from copy import copy

        from geosr.models.consistency import limit_chroma

        plain = copy(model)
        plain.chroma_factor = 1
        raw = plain.upscale(x, 4)
        assert model.chroma_factor == 4 and np.abs(raw - tuned).max() > 1e-3
        np.testing.assert_allclose(tuned, limit_chroma(raw, 4), atol=1e-6)
        grey = np.repeat(x[:1], 3, axis=0)  # a grey tile keeps what the network made
        np.testing.assert_array_equal(model.upscale(grey, 4), plain.upscale(grey, 4))
        # it runs halfway between the npm weights and the fine-tuned ones (WiSE-FT): every tensor is their mean
        assert model.interpolation == CLEAN_INTERPOLATION == 0.5
        full = TunedSR(name="full", filename=model.filename, module=model.module, delta=model.delta, receptive_field=20,
                       default_tile=256, description="", interpolation=1.0)
        half_w, full_w = model._net.state_dict(), full._load("cpu").state_dict()
        base_w = get_model("rrdn-gan")._load("cpu").state_dict()  # a fresh copy of the npm tensors
        assert set(half_w) == set(full_w) == set(base_w)
        for k in half_w:
            torch.testing.assert_close(half_w[k], (base_w[k] + full_w[k]) / 2, atol=1e-6, rtol=1e-5)
        assert max(float((full_w[k] - base_w[k]).abs().max()) for k in half_w) > 1e-3  # the two ends differ
        # the loaded networks are cached by difference and weight: the full one is another network
        full.prepare()
        assert full._net is not model._net and not np.array_equal(full.upscale(grey, 4), plain.upscale(grey, 4))


@pytest.mark.skipif(not get_model("realesrgan-x4plus").weights_present(), reason="Real-ESRGAN weights missing")
def test_the_tuned_real_esrgan_is_committed_in_int8_and_runs_halfway(run_cli):
    import json

    import torch
    from safetensors import safe_open

    model = get_model("realesrgan-aerial")
    assert model.delta.is_file() and model.delta.stat().st_size < 18_000_000  # int8: a byte per parameter
    with safe_open(str(model.delta), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"I8"}
    assert set(json.loads(meta["int8_scales"])) == keys
    recipe = json.loads(meta["config"])
    assert (recipe["base"], recipe["p_clean"], recipe["p_light"], recipe["steps"]) == ("realesrgan-x4plus", 0.3, 0.5,
                                                                                       500)
    assert model.interpolation == RESR_INTERPOLATION == 0.5
    two = get_model("realesrgan-aerial-2v")  # a candidate of the compressed route: the model on two turned views
    assert two.base is model and two.name in get_model("aerial-x4-jpeg").experts
    proc = run_cli("models")
    assert proc.returncode == 0 and "geosr-trained:realesrgan-aerial-delta" in proc.stdout
    model.prepare()
    half_w = model._net.state_dict()
    base_w = get_model("realesrgan-x4plus")._load("cpu").state_dict()
    with safe_open(str(model.delta), framework="pt") as f:
        k = next(k for k in sorted(keys) if float(f.get_tensor(k).abs().max()) > 0)
        delta = f.get_tensor(k).float() * json.loads(meta["int8_scales"])[k]
    torch.testing.assert_close(half_w[k], base_w[k] + 0.5 * delta, atol=1e-6, rtol=1e-5)


def test_tuned_networks_refuse_an_interpolation_outside_zero_to_one(tmp_path):
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="between 0 .base. and 1"):
            TunedSR(name="t", filename="rrdn_gan_x4.safetensors", module="geosr.models.tfjs", delta=tmp_path / "d",
                    receptive_field=20, default_tile=256, description="", interpolation=bad)


@pytest.mark.skipif(not (experts_present and x2_experts_present and FIXTURE.is_file()),
                    reason="expert weights or the fixture missing")
def test_the_default_runs_x2_with_its_x2_network_and_v1_brings_its_x4_down():
    from geosr.models.consistency import downscale
    from geosr.models.fusion import WEIGHTS_X2

    lr = _input()
    x = lr[:, :24, :24].astype(np.float32) / 255
    model, x2, v1 = get_model(), get_model("aerial-x2"), get_model("aerial-x4-v1")
    assert model.scales == (2, 4) and x2.scales == (2,) and x2.path == WEIGHTS_X2 and x2.arch["scale"] == 2
    assert WEIGHTS_X2.stat().st_size < 5_000_000
    y2 = model.upscale(x, 2)
    assert y2.shape == (3, 48, 48) and y2.dtype == np.float32
    assert np.array_equal(y2, x2.upscale(x, 2))  # the default's x2 is its x2 network's
    assert np.abs(y2 - downscale(model.upscale(x, 4), (48, 48))).mean() > 1e-3  # not its x4 brought down
    np.testing.assert_allclose(v1.upscale(x, 2), downscale(v1.upscale(x, 4), (48, 48)), atol=1e-5)  # v1's is
    # a plain `--scale 2` run: the default model, the x2 network's projection strength
    out = _run(scale=2)
    assert np.array_equal(out, _run(scale=2, model="aerial-x2"))
    bicubic = _run(scale=2, model="bicubic")
    assert out.shape == bicubic.shape == (3, 96, 96) and out.dtype == np.uint8
    hwc = lambda a: np.moveaxis(a, 0, -1)  # noqa: E731
    assert lr_consistency(hwc(out), hwc(lr)) > 38  # agrees with its input
    assert np.abs(out.astype(int) - bicubic.astype(int)).mean() > 1  # and is not bicubic
    assert "; x2: aerial-fusion-x2.safetensors" in model.provenance()["member"]


@pytest.mark.slow
@pytest.mark.skipif(not (experts_present and FIXTURE.is_file()), reason="expert weights or the fixture missing")
@pytest.mark.parametrize("name, path", [(None, JPEG_SLICE), ("aerial-x4-jpeg", JPEG_SLICE), ("aerial-x4-fusion", SLICE),
                                        ("aerial-x4-clean", CLEAN_SLICE),
                                        ("aerial-x4-v2", V2_SLICE), ("aerial-x4-v1", V1_SLICE),
                                        ("aerial-x2", X2_SLICE), ("aerial-x2-fast", X2_FAST_SLICE)])
def test_committed_stage1_weights_reproduce_the_stored_output(name, path):
    if not get_model(_model_name(name)).weights_present():  # the x2 networks' waifu2x experts too
        pytest.skip(f"{get_model(_model_name(name)).name}: expert weights missing (geosr weights fetch)")
    stored = np.load(path)
    out = _slice_run(name)  # the default model (or v1, or the x2 network) with its own settings
    assert out.shape == tuple(stored["shape"])
    diff = np.abs(out[:, 64:128, 64:128].astype(np.int16) - stored["slice"].astype(np.int16))
    # the same bits on this kind of machine; a last-bit float difference elsewhere may move a pixel by 1
    assert diff.max() <= 1 and diff.mean() < 0.05


def _model_name(name: str | None) -> str | None:
    return None if name == "aerial-x4-clean" else name


def _slice_run(name: str | None) -> np.ndarray:
    """What a stored slice holds: ``aerial-x4-clean`` is the default on the clean input (its clean route)."""
    if name == "aerial-x4-clean":
        return _run(clean=True)
    return _run(**_settings(name))


@pytest.mark.skipif(not (experts_present and get_model("rrdn-aerial-clean").weights_present() and FIXTURE.is_file()),
                    reason="expert weights or the fixture missing")
def test_the_default_runs_its_jpeg_fusion_on_the_jpeg_fixture_and_the_clean_network_on_a_clean_view():
    from geosr.models.compression import JPEG_THRESHOLD, jpeg_evidence

    assert jpeg_evidence(_input() / 255.0) > 0.8 > JPEG_THRESHOLD > jpeg_evidence(_input(clean=True) / 255.0)
    assert np.array_equal(_run(), _run(model="aerial-x4-jpeg"))
    assert not np.array_equal(_run(), _run(model="aerial-x4-fusion"))
    clean = _run(clean=True)
    assert np.array_equal(clean, _run(clean=True, model="rrdn-aerial-clean"))
    assert not np.array_equal(clean, _run(clean=True, model="aerial-x4-fusion"))


def test_the_first_stage1_release_stays_as_mmsr_prior():
    import json

    from geosr.models.fusion import LEGACY_EXPERTS, WEIGHTS_V1, WEIGHTS_V2, read_arch
    from geosr.models.mmsr.bundle import INDEX
    from geosr.models.mmsr.model import EMBEDDED

    v1, v2, new = get_model("aerial-x4-v1"), get_model("aerial-x4-v2"), get_model("aerial-x4-fusion")
    assert (v1.path, v2.path, new.path) == (WEIGHTS_V1, WEIGHTS_V2, WEIGHTS)
    assert len({p.read_bytes() for p in (WEIGHTS_V1, WEIGHTS_V2, WEIGHTS)}) == 3
    assert (v1.consistency, v2.consistency, new.consistency) == (0.5, 0.25, 0.25)  # each file's measured settings
    assert (v1.chroma_factor, v2.chroma_factor, new.chroma_factor) == (2, 4, 4)
    assert v1.experts == v2.experts == LEGACY_EXPERTS and read_arch(WEIGHTS)["experts"] == new.experts == EXPERTS
    assert "rrdn-aerial" in EXPERTS
    assert v1.provenance()["package"] == "geosr-trained:aerial-fusion-x4-v1"
    assert json.loads((EMBEDDED / INDEX).read_text())["config"]["prior"] == "aerial-x4-v1"  # what it was trained over


def test_the_trained_mmsr_is_committed_small_listed_and_runs_as_recommended(run_cli):
    from geosr.models.mmsr.model import EMBEDDED, embedded_checkpoint

    assert embedded_checkpoint() == EMBEDDED
    assert sum(p.stat().st_size for p in EMBEDDED.rglob("*") if p.is_file()) < 50_000_000
    assert (EMBEDDED / "MODEL_CARD.md").is_file()
    model = get_model("mmsr")
    model.configure(EnhanceConfig(model="mmsr", scale=4))  # no --checkpoint, --steps or --consistency
    assert model.checkpoint == EMBEDDED
    assert (model.steps, model.consistency) == (1, 0.25)  # the settings recorded when it was embedded
    prov = model.provenance()
    assert "committed with geosr" in prov["registry"] and int(prov["version"].split()[0]) > 0
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr
    assert "geosr-trained:mmsr-aerial-x4" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (experts_present and FIXTURE.is_file()), reason="expert weights or the fixture missing")
def test_committed_mmsr_weights_reproduce_the_stored_output():
    stored = np.load(MMSR_SLICE)
    out = _run(model="mmsr")  # the embedded checkpoint with its recommended settings
    assert out.shape == tuple(stored["shape"])
    diff = np.abs(out[:, 64:128, 64:128].astype(np.int16) - stored["slice"].astype(np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.05


if __name__ == "__main__":  # regenerate a stored slice after retraining: aerial-x4 (= -x4-jpeg), -x4-fusion, -x4-clean,
    import sys  # -x4-v2, -x4-v1, -x2, -x2-fast, mmsr

    name = sys.argv[1] if len(sys.argv) > 1 else "aerial-x4"
    path = {"aerial-x4": JPEG_SLICE, "aerial-x4-jpeg": JPEG_SLICE, "aerial-x4-fusion": SLICE,
            "aerial-x4-clean": CLEAN_SLICE, "aerial-x4-v2": V2_SLICE, "aerial-x4-v1": V1_SLICE, "aerial-x2": X2_SLICE,
            "aerial-x2-fast": X2_FAST_SLICE, "mmsr": MMSR_SLICE}[name]
    out = _slice_run(name)
    path.parent.mkdir(exist_ok=True)
    np.savez_compressed(path, slice=out[:, 64:128, 64:128], shape=np.array(out.shape))
    print(f"wrote {path}")
