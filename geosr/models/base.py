"""The one small interface every super-resolution model implements: a tile in, a tile out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

GREY_SPREAD = 0.5 / 255  # mean band spread (max - min per pixel) of a tile that counts as grey, in model units


def is_grey(x: np.ndarray) -> bool:
    """Whether a ``(C, h, w)`` tile is grey: its bands identical up to a mean spread of half an 8-bit level (what a
    grey image keeps after JPEG's colour rounding; colour imagery is tens of levels)."""
    return float(np.ptp(x, axis=0).mean()) <= GREY_SPREAD


class SRModel(ABC):
    """A super-resolution model.

    ``upscale`` takes ``(C, H, W)`` float32 in the model's working range (about 0..1; values outside are
    allowed) and returns ``(C, H * scale, W * scale)`` float32 in the same range, unclipped.
    """

    name: str = ""
    scales: tuple[int, ...] = ()  # integer factors the model supports
    channels: int | None = 3  # channels it needs (3: RGB path); None: any count, band by band
    # effective receptive field, input px: context beyond it moves an output px by less than ~1 DN (measured)
    receptive_field: int = 1
    default_tile: int = 256  # input px
    # how tiles meet the scene edge: "cut" (the model sees the edge as on the whole image), "reflect" (padded) or
    # "reflect:N" (N px of padding, then cut).
    # "cut" measured better on BENCHMARK.md: RRDN-GAN 27.56 vs 27.44 dB PSNR-Y, bicubic 27.27 vs 27.25.
    edge: str = "cut"
    description: str = ""
    # LR-consistency projection strength of the current run; default_consistency is the model's own default
    # (0: the output as the network made it)
    consistency: float = 0.0
    default_consistency: float = 0.0
    # the projection's strength for the colour (Cb, Cr) of an RGB output, ``consistency`` then being the luma's; None:
    # ``consistency`` for every band. Only a model's own default: a strength the user gives applies to every band
    chroma_consistency: float | None = None
    default_chroma_consistency: float | None = None
    reads_geodata: bool = False  # takes the user's DSM / land cover / vectors (EnhanceConfig dsm, landcover, vectors)
    reads_sample: bool = False  # judges the scene's full-resolution pixels in begin_scene (its ``sample``)

    @abstractmethod
    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray: ...

    def provenance(self) -> dict[str, str]:
        """Where the weights come from (package, version, registry, sha256, ...); empty for weight-free models."""
        return {}

    def configure(self, config) -> None:
        """Take model-specific settings of the run (an ``EnhanceConfig``); subclasses that override this call it.

        Every model takes ``config.consistency``: the strength of the LR-consistency projection the engine applies
        to its output (:mod:`geosr.models.consistency`); None keeps the model's class default. And
        ``config.keep_grey``: whether the engine makes grey input tiles give grey output (:func:`is_grey`)."""
        self.keep_grey = bool(getattr(config, "keep_grey", True))
        strength = getattr(config, "consistency", None)
        self.consistency = self.default_consistency if strength is None else float(strength)
        self.chroma_consistency = self.default_chroma_consistency if strength is None else None
        if not 0.0 <= self.consistency <= 1.0:
            from ..errors import ConfigError

            raise ConfigError(f"--consistency {self.consistency}: choose a strength between 0 and 1")

    def begin_scene(self, overview: np.ndarray, *, gsd: float | None = None, grid=None,
                    sample: np.ndarray | None = None) -> None:
        """Called once per scene before its tiles with a decimated, scaled view ``(C, h, w)`` of the whole scene.

        ``grid`` is the scene's :class:`~geosr.conditioning.base.SceneGrid` (None without georeferencing).
        ``sample`` (for models with ``reads_sample``; else None) is the scene's pixels at full resolution, scaled
        (``(C, h, w)``, :func:`geosr.scene.scene_sample`: the whole of a small scene, else five windows side by side):
        what a model judges the scene's pixels by (the overview's decimation has lost fine structure such as JPEG's
        8 px grid).
        """

    def begin_tile(self, grid) -> None:
        """Called before each tile's :meth:`upscale` with the tile's grid (a ``SceneGrid`` of the LR pixels it
        gets, padding included; None without georeferencing). Models that read georeferenced data use it."""

    def weights_present(self) -> bool:
        return True

    def prepare(self) -> None:
        """Load weights (called once before the first tile); raise WeightsError with the fix if missing."""

    def check_scale(self, scale: int) -> None:
        from ..errors import ConfigError

        if scale not in self.scales:
            raise ConfigError(f"model '{self.name}' supports scale {', '.join(map(str, self.scales))}, not {scale}")
