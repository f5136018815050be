"""Turning a training checkpoint into a committed, embedded default (``geosr/checkpoints/mmsr-aerial-x4``).

:func:`embed` loads the checkpoint's bundle (EMA weights), records the run settings chosen on the benchmark
(``meta["inference"]``: strength, consistency, tile, steps) and where the weights came from, and writes the bundle in
float16 without the optimizer and RNG state. ``MMSRModel`` applies the recorded settings to every run that leaves
them unset.
"""

from __future__ import annotations

import shutil
from pathlib import Path

KEYS = ("strength", "consistency", "tile", "steps")


def embed(src: str | Path, dst: str | Path, inference: dict, **meta) -> Path:
    """Write the bundle of checkpoint ``src`` to ``dst`` (replaced) in float16, with ``inference`` settings and
    extra ``meta`` (e.g. licence, training data)."""
    from ..errors import ConfigError
    from ..models.mmsr.bundle import MMSRBundle

    unknown = sorted(set(inference) - set(KEYS))
    if unknown:
        raise ConfigError(f"inference settings {unknown}: known are {', '.join(KEYS)}")
    bundle = MMSRBundle.load(src)
    bundle.meta.update(meta, inference=dict(inference))
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bundle.save(tmp, half=True)
    for extra in ("MODEL_CARD.md",):  # documents kept in place across re-embeds
        if (dst / extra).is_file():
            shutil.copy2(dst / extra, tmp / extra)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst
