"""One model per scene, chosen by what the input went through: JPEG-compressed imagery to a model made for damaged
input, other imagery to one made for clean input.

No single network measured here is best on both (``geosr/checkpoints/MODEL_CARD.md``): the fused stage 1 keeps
JPEG blocks and noise in check but is soft on clean input, and RRDN-GAN tuned on clean downscales is sharp on clean
input and sharpens the blocks of compressed input. :class:`RoutedSR` asks :func:`~geosr.models.compression.jpeg_evidence`
once per scene, on the scene's pixels at full resolution (``begin_scene``'s ``sample``: the whole of a small scene,
else five windows, :func:`geosr.scene.scene_sample`), so every tile of a scene runs the same model and no seam
appears where the choice would change. The choice and its evidence are logged, and ``route`` / ``evidence`` keep
them for the run (``route_note`` goes into the output's tags).

It sees compression only: noise or blur in uncompressed imagery takes the clean route (see the model card for what
that costs); ``--model`` with either route's name runs it directly.
"""

from __future__ import annotations

import logging

import numpy as np

from .base import SRModel
from .compression import JPEG_THRESHOLD, jpeg_evidence

log = logging.getLogger(__name__)

CLEAN, COMPRESSED = "clean", "compressed"


class RoutedSR(SRModel):
    """``clean`` runs on input without JPEG evidence, ``compressed`` on the rest; scales other than the clean model's
    always run ``compressed``."""

    channels = 3
    edge = "cut"
    reads_sample = True

    def __init__(self, *, name: str, clean: SRModel, compressed: SRModel, description: str,
                 threshold: float = JPEG_THRESHOLD):
        self.name, self.description, self.threshold = name, description, threshold
        self.routes = {CLEAN: clean, COMPRESSED: compressed}
        # the tile plan is made before the route is known: enough context and tile for either
        self.receptive_field = max(clean.receptive_field, compressed.receptive_field)
        self.default_tile = compressed.default_tile
        self.route: str | None = None  # this scene's route, set by begin_scene
        self.evidence: float | None = None
        self._scale = 4

    @property
    def scales(self) -> tuple[int, ...]:
        return self.routes[COMPRESSED].scales

    def _model(self, scale: int) -> SRModel:
        route = self.route if scale in self.routes[CLEAN].scales else COMPRESSED
        return self.routes[route or COMPRESSED]

    def configure(self, config) -> None:
        super().configure(config)
        for m in self.routes.values():
            m.configure(config)
        self._scale = int(getattr(config, "scale", 4))
        self.route = self.evidence = None
        model = self._model(self._scale)
        self.consistency, self.chroma_consistency = model.consistency, model.chroma_consistency

    def weights_present(self) -> bool:
        return all(m.weights_present() for m in self.routes.values())

    def prepare(self) -> None:
        for m in self.routes.values():
            m.prepare()

    def provenance(self) -> dict[str, str]:
        import hashlib

        parts = {route: m.provenance() for route, m in self.routes.items()}
        if not all(parts.values()):
            return {}
        member = "; ".join(f"{route} input: {self.routes[route].name} = {p['member']} (sha256 {p['sha256'][:12]}...)"
                           for route, p in parts.items())
        return {"package": "geosr-trained:" + "+".join(p["package"].split(":")[-1] for p in parts.values()),
                "version": " + ".join(p["version"] for p in parts.values()),
                "registry": "committed with geosr (trained here on data/train, see geosr/checkpoints/MODEL_CARD.md)",
                "member": member,
                "sha256": hashlib.sha256("".join(p["sha256"] for p in parts.values()).encode()).hexdigest(),
                "license": "; ".join(dict.fromkeys(p["license"] for p in parts.values()))}

    @property
    def route_note(self) -> str:
        """This scene's choice in words (empty before a scene)."""
        if self.route is None:
            return ""
        return (f"{self.route} input (JPEG evidence {self.evidence:.2f}, threshold {self.threshold:.2f}): "
                f"{self._model(self._scale).name}")

    def choose(self, sample: np.ndarray) -> str:
        """The route for a scene whose full-resolution pixels (``(C, h, w)``, model units) are ``sample``."""
        self.evidence = jpeg_evidence(sample)
        return COMPRESSED if self.evidence >= self.threshold else CLEAN

    def begin_scene(self, overview: np.ndarray, *, gsd: float | None = None, grid=None,
                    sample: np.ndarray | None = None) -> None:
        self.route = self.choose(sample if sample is not None else overview)
        model = self._model(self._scale)
        self.consistency, self.chroma_consistency = model.consistency, model.chroma_consistency
        log.info("%s: %s", self.name, self.route_note)
        model.begin_scene(overview, gsd=gsd, grid=grid, sample=sample)

    def begin_tile(self, grid) -> None:
        self._model(self._scale).begin_tile(grid)

    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray:
        self.check_scale(scale)
        if self.route is None:  # called outside a scene run (no begin_scene): judge the tile itself
            route = self.choose(x) if scale in self.routes[CLEAN].scales else COMPRESSED
            return self.routes[route].upscale(x, scale)
        return self._model(scale).upscale(x, scale)
