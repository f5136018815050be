"""``geosr.training.package.embed`` (the committed default's packaging) and the run settings it records
(``meta["inference"]``), which ``MMSRModel`` applies when the run leaves them unset; on a tiny random bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from conftest import save_tiny_mmsr, tiny_mmsr_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from geosr.config import EnhanceConfig  # noqa: E402
from geosr.errors import ConfigError  # noqa: E402
from geosr.models.mmsr.bundle import INDEX, MMSRBundle  # noqa: E402
from geosr.models.mmsr.model import MMSRModel  # noqa: E402
from geosr.scene import enhance_array, plan  # noqa: E402
from geosr.training.package import embed  # noqa: E402

TINY = tiny_mmsr_config()
RECOMMENDED = {"strength": 0.5, "consistency": 0.25, "tile": 24, "steps": 3}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A float32 training-style bundle (no inference settings)."""
    return save_tiny_mmsr(tmp_path_factory.mktemp("src") / "ckpt", trained_steps=7)


@pytest.fixture(scope="module")
def embedded(source, tmp_path_factory):
    return embed(source, tmp_path_factory.mktemp("dst") / "mmsr-tiny", RECOMMENDED, license="CC-BY-4.0",
                 training_data="tiny test")


def config(checkpoint, **kw) -> EnhanceConfig:
    return EnhanceConfig(**({"model": "mmsr", "checkpoint": str(checkpoint), "steps": 2, "threads": 1} | kw))


def test_embed_writes_a_float16_bundle_with_the_settings(source, embedded):
    assert (embedded / INDEX).is_file()
    files = sorted(p.relative_to(source) for p in source.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(embedded) for p in embedded.rglob("*.safetensors"))
    floats = 0
    for rel in files:
        src, dst = load_file(source / rel), load_file(embedded / rel)
        assert src.keys() == dst.keys()
        for key, value in src.items():
            if value.is_floating_point():
                assert dst[key].dtype == torch.float16, (rel, key)
                assert (dst[key] == value.half()).all(), (rel, key)  # exactly the fp16 rounding of the source
                floats += 1
            else:
                assert (dst[key] == value).all()
    assert floats > 10
    bundle = MMSRBundle.load(embedded)
    assert bundle.meta["inference"] == RECOMMENDED
    assert bundle.meta["license"] == "CC-BY-4.0" and bundle.meta["training_data"] == "tiny test"
    assert bundle.meta["trained_steps"] == 7  # the source's own meta is kept
    # loaded (cast back to float32) weights equal the source's to fp16 precision
    ref = MMSRBundle.load(source)
    a = dict(ref.pipeline.unet.named_parameters())
    b = dict(bundle.pipeline.unet.named_parameters())
    assert a.keys() == b.keys()
    for name, value in a.items():
        np.testing.assert_allclose(b[name].detach().float().numpy(), value.detach().numpy(), rtol=1e-3, atol=1e-4,
                                   err_msg=name)


def test_embed_refuses_unknown_settings(source, tmp_path):
    with pytest.raises(ConfigError, match="guidance"):
        embed(source, tmp_path / "bad", {"strength": 0.5, "guidance": 4})
    assert not (tmp_path / "bad").exists()


def test_re_embedding_keeps_the_model_card_and_leaves_no_tmp(source, tmp_path):
    dst = embed(source, tmp_path / "mmsr-tiny", {"strength": 0.7})
    (dst / "MODEL_CARD.md").write_text("# card\nkept\n")
    (dst / "stale.txt").write_text("from the previous embed")
    again = embed(source, tmp_path / "mmsr-tiny", {"consistency": 0.1})
    assert again == dst
    assert (dst / "MODEL_CARD.md").read_text() == "# card\nkept\n"
    assert not (dst / "stale.txt").exists()  # dst is replaced, only the documents are carried over
    assert not (tmp_path / "mmsr-tiny.tmp").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mmsr-tiny"]
    assert MMSRBundle.load(dst).meta["inference"] == {"consistency": 0.1}


def test_recorded_settings_apply_when_the_run_leaves_them_unset(source, embedded):
    model = MMSRModel()
    model.configure(config(embedded, steps=None))
    assert (model.strength, model.consistency, model.default_tile, model.steps) == (0.5, 0.25, 24, 3)
    assert plan((40, 40), model, config(embedded)).rows.tile == 24
    # explicit flags win
    model = MMSRModel()
    model.configure(config(embedded, strength=1.0, consistency=0.0, tile=16, steps=2))
    assert (model.strength, model.consistency, model.steps) == (1.0, 0.0, 2)
    model = MMSRModel()  # a checkpoint that recommends nothing: 4 steps
    model.configure(config(source, steps=None))
    assert model.steps == 4
    assert plan((40, 40), model, config(embedded, tile=16, overlap=2)).rows.tile == 16
    # a checkpoint without recorded settings keeps the model's own defaults
    model = MMSRModel()
    model.configure(config(source))
    assert (model.strength, model.consistency, model.default_tile) == (1.0, model.default_consistency, TINY.tile)


def test_recorded_settings_are_what_a_run_without_flags_uses(embedded):
    rng = np.random.default_rng(0)
    image = (rng.random((3, 16, 16)) * 255).astype(np.uint8)
    unset = enhance_array(image, config(embedded, tile=16, overlap=2))
    same = enhance_array(image, config(embedded, tile=16, overlap=2, strength=0.5, consistency=0.25))
    other = enhance_array(image, config(embedded, tile=16, overlap=2, strength=1.0, consistency=0.0))
    assert unset.shape == (3, 64, 64)
    np.testing.assert_array_equal(unset, same)
    assert np.abs(unset.astype(int) - other.astype(int)).max() > 0
