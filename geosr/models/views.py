"""A model's output averaged over turned views of its input (self-ensembling, Timofte et al. 2016, "Seven ways to
improve example-based single image super resolution").

A GAN upscaler paints texture that is only loosely tied to its input, and the texture it paints changes when the
input is turned by 90 degrees. Averaging the outputs of two views keeps what both agree on (the edges the input
shows) and halves the weight of what they do not (the invented texture): on ``shared/BENCHMARK.md``'s ``real`` crops
``realesrgan-aerial`` goes from SSIM-Y 0.614 to 0.645 for LPIPS 0.246 to 0.258 (MODEL_CARD.md). Each view costs one
run of the model.
"""

from __future__ import annotations

import numpy as np

from .base import SRModel

# (quarter turns counter-clockwise, mirrored left-right first)
View = tuple[int, bool]


def _turn(x: np.ndarray, view: View) -> np.ndarray:
    turns, mirror = view
    x = x[..., ::-1] if mirror else x
    return np.ascontiguousarray(np.rot90(x, turns, axes=(-2, -1)))


def _unturn(x: np.ndarray, view: View) -> np.ndarray:
    turns, mirror = view
    x = np.rot90(x, -turns, axes=(-2, -1))
    return np.ascontiguousarray(x[..., ::-1] if mirror else x)


class Views(SRModel):
    """The mean of ``base``'s outputs on ``views`` of the input, each turned back; tiles as ``base`` does."""

    def __init__(self, base: SRModel, *, name: str, description: str,
                 views: tuple[View, ...] = ((0, False), (1, False))):
        self.base, self.views = base, tuple((int(t) % 4, bool(m)) for t, m in views)
        self.name, self.description = name, description
        self.channels, self.scales, self.edge = base.channels, base.scales, base.edge
        self.receptive_field, self.default_tile = base.receptive_field, base.default_tile
        self.consistency = self.default_consistency = base.default_consistency

    def weights_present(self) -> bool:
        return self.base.weights_present()

    def provenance(self) -> dict[str, str]:
        p = dict(self.base.provenance())
        if p:
            p["member"] = f"{p['member']}, mean over {len(self.views)} turned views"
        return p

    def prepare(self) -> None:
        self.base.prepare()

    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray:
        self.check_scale(scale)
        total = None
        for view in self.views:
            out = _unturn(self.base.upscale(_turn(x, view), scale), view).astype(np.float64)
            total = out if total is None else total + out
        return (total / len(self.views)).astype(np.float32)
