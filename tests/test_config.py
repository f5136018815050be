import pytest

from geosr.config import EnhanceConfig
from geosr.errors import ConfigError


def test_yaml_round_trip():
    cfg = EnhanceConfig(model="bicubic", scale=2, tile=128, overlap=8, bands=(3, 2, 1), cog=True)
    assert EnhanceConfig.from_yaml(cfg.to_yaml()) == cfg


def test_unknown_yaml_key_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown settings \\['tiel'\\]"):
        EnhanceConfig.from_yaml("tiel: 128\n")


def test_shipped_default_config_matches_dataclass_defaults():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "configs" / "default.yaml").read_text()
    assert EnhanceConfig.from_yaml(text) == EnhanceConfig()
