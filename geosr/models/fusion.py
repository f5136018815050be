"""Stage-1 fusion: a small network trained by geosr that combines frozen expert upscalers per pixel.

The two pretrained ×4 networks available offline fail in opposite ways on aerial imagery (``shared/BENCHMARK.md``):
RRDN-GAN is faithful on clean inputs but sharpens noise and JPEG blocks; Real-ESRGAN x4plus handles damaged inputs
but repaints and shifts tones. A third candidate is RRDN-GAN fine-tuned by geosr on degraded aerial crops
(``rrdn-aerial``, :mod:`geosr.training.expert`). :class:`FusionNet` looks at the LR input and at the experts' outputs
(plus bicubic) and predicts, for every output pixel, a convex combination of the candidates and a small correction::

    out = Σ_k softmax(logits)_k · candidate_k + residual

It works on the LR grid (the candidates are pixel-unshuffled ×4), so it is cheap next to the experts; its context
is ±``blocks`` × 2 LR px. It is trained on ``data/train`` by :mod:`geosr.training.stage1`.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError
from .base import SRModel, is_grey
from .consistency import downscale, limit_chroma

log = logging.getLogger(__name__)

# the default's candidates (Stage1Config.experts has the same default): RRDN-GAN as published, Real-ESRGAN x4plus, and
# RRDN-GAN fine-tuned by geosr on degraded aerial crops (`rrdn-aerial`, geosr.training.expert)
EXPERTS = ("rrdn-gan", "realesrgan-x4plus", "rrdn-aerial")
# the candidates of a weights file written before the metadata's "net" recorded them
LEGACY_EXPERTS = ("rrdn-gan", "realesrgan-x4plus")
SCALE = 4
# the output's colour detail is kept to 1/CHROMA_FACTOR of its grid (luma untouched): the networks' colour noise
# otherwise saturates dark surfaces and asphalt stops looking like asphalt to the road measures (MODEL_CARD.md,
# "Colour detail"). The LR grid (4) for the default's weights; half the output grid (2) for v1, as measured
CHROMA_FACTOR = 4


class _Block(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.a = nn.Conv2d(n, n, 3, padding=1)
        self.b = nn.Conv2d(n, n, 3, padding=1)

    def forward(self, x):
        return x + self.b(F.leaky_relu(self.a(x), 0.1))


class FusionNet(nn.Module):
    """``forward(lr (B,3,h,w), experts (B,3·len(experts),sh,sw))`` -> ``(B,3,sh,sw)`` (s = ``scale``); all in
    [0, 1] scale.

    ``experts`` names the registry models whose outputs at ``scale`` (:func:`candidate`) are the candidates, in
    input order."""

    def __init__(self, features: int = 64, blocks: int = 6, residual: bool = True,
                 experts: tuple[str, ...] | list[str] = LEGACY_EXPERTS, scale: int = SCALE):
        super().__init__()
        self.experts = tuple(experts)
        k = len(self.experts) + 1  # + bicubic
        self.k, self.residual, self.scale = k, residual, int(scale)
        s2 = self.scale * self.scale
        self.inp = nn.Conv2d(3 + 3 * k * s2, features, 3, padding=1)
        self.body = nn.Sequential(*[_Block(features) for _ in range(blocks)])
        # per output px: k mixing logits, and (residual) a 3-channel correction
        self.head = nn.Conv2d(features, ((3 if residual else 0) + k) * s2, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # starts as the plain mean of the candidates
        nn.init.zeros_(self.head.bias)

    def forward(self, lr: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        b, _, h, w = lr.shape
        s = self.scale
        bic = F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False)
        cands = torch.cat([experts, bic], 1)  # (B, 3k, H, W)
        x = torch.cat([lr, F.pixel_unshuffle(cands, s)], 1)
        x = self.inp(x)
        x = self.head(F.leaky_relu(self.body(x), 0.1))
        x = F.pixel_shuffle(x, s)  # (B, [3 +] k, H, W): the correction first, then the mixing logits
        r = 3 if self.residual else 0
        weights = torch.softmax(x[:, r:], 1)  # (B, k, H, W)
        mixed = (cands.view(b, self.k, 3, h * s, w * s) * weights[:, :, None]).sum(1)
        return mixed + x[:, :3] if self.residual else mixed


def read_arch(path: str | Path) -> dict:
    """The ``FusionNet`` arguments recorded in a weights file's metadata (``experts`` and ``scale`` filled in for
    old files)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        arch = json.loads((f.metadata() or {}).get("net", "{}"))
    arch["experts"] = tuple(arch.get("experts", LEGACY_EXPERTS))
    arch["scale"] = int(arch.get("scale", SCALE))
    return arch


def candidate(model: SRModel, x: np.ndarray, scale: int) -> np.ndarray:
    """An expert's output for ``x`` ``(C, h, w)`` at ``scale``, as 8-bit values in [0, 1] (how the fusion network
    sees its candidates in training and at inference): the expert's own ``scale`` where it has one, else its
    largest scale brought down with the antialiased bicubic of the LR-consistency projection."""
    native = scale if scale in model.scales else max(model.scales)
    out = model.upscale(x, native)
    if native != scale:
        out = downscale(out, (x.shape[-2] * scale, x.shape[-1] * scale))
    return np.round(np.clip(out, 0.0, 1.0) * 255.0) / 255.0


def load_net(path: str | Path) -> FusionNet:
    """A trained ``FusionNet`` from its safetensors file, in eval mode."""
    from safetensors.torch import load_file

    net = FusionNet(**read_arch(path))
    net.load_state_dict(load_file(str(path)))
    return net.eval()


# ------------------------------------------------------------------------------------- the SRModel


CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
WEIGHTS = CHECKPOINTS / "aerial-fusion-x4.safetensors"  # committed: aerial-x4-fusion (three candidates, SSIM-Y term)
# committed: the same recipe trained on the damaged pairs only (Stage1Config.damaged_only), what aerial-x4 runs on
# JPEG-compressed input. Its projection corrects the luma alone, by half, which keeps the real crops' LR-consistency
# above 38 dB: the input's colour is JPEG's subsampled, noisy chroma, and following it cost LPIPS (MODEL_CARD.md,
# sixth release). Its colour detail is kept to half the output grid
WEIGHTS_JPEG = CHECKPOINTS / "aerial-fusion-x4-jpeg.safetensors"
JPEG_CONSISTENCY, JPEG_CHROMA_CONSISTENCY, JPEG_CHROMA_FACTOR = 0.5, 0.0, 2
# committed: the second release (two candidates, the default before this one), kept as `aerial-x4-v2`
WEIGHTS_V2 = CHECKPOINTS / "aerial-fusion-x4-v2.safetensors"
# committed: the first release (L1 + 0.5 LPIPS), kept as `aerial-x4-v1` because mmsr-aerial-x4 was trained over it
WEIGHTS_V1 = CHECKPOINTS / "aerial-fusion-x4-v1.safetensors"
# committed: the x2 network (its candidates are the experts' outputs at x2), what aerial-x4 runs at --scale 2
WEIGHTS_X2 = CHECKPOINTS / "aerial-fusion-x2.safetensors"
# committed: the same without Real-ESRGAN among its candidates, about 4x faster (`aerial-x2-fast`)
WEIGHTS_X2_FAST = CHECKPOINTS / "aerial-fusion-x2-fast.safetensors"
X2_CONSISTENCY = 0.5  # their LR-consistency projection strength, chosen on the x2 benchmark's crops (MODEL_CARD.md)


class FusionSR(SRModel):
    """geosr's trained stage 1: the experts run on the tile, :class:`FusionNet` combines them."""

    name = "aerial-x4-fusion"
    channels = 3
    receptive_field = 56  # Real-ESRGAN's 48 input px plus a little of the fusion network's own context
    default_tile = 512
    edge = "cut"
    # LR-consistency projection strength, chosen per weights file on BENCHMARK.md's crops (MODEL_CARD.md): 0.25 for
    # these weights (0.5 cost 0.012 LPIPS on the real crops and gained 0.004 on the clean ones), 0.5 for v1
    consistency = default_consistency = 0.25
    description = ("geosr aerial x4 stage 1: RRDN-GAN, RRDN-GAN fine-tuned on aerial imagery (rrdn-aerial) and "
                   "Real-ESRGAN x4plus fused per pixel by a network trained by geosr on data/train")

    def __init__(self, *, device: str = "cpu", path: Path | None = None, name: str | None = None,
                 description: str | None = None, consistency: float | None = None, chroma_factor: int = CHROMA_FACTOR,
                 x2: FusionSR | None = None, chroma_consistency: float | None = None):
        """``x2``: the model that runs ``scale=2`` for this x4 one (a x2 network's FusionSR); without it, x2 is the
        x4 output brought down by the antialiased bicubic of the LR-consistency projection. ``consistency`` and
        ``chroma_consistency``: the projection's default strengths (:class:`SRModel`)."""
        self.device = device
        self.chroma_factor = chroma_factor
        self.x2 = x2
        if consistency is not None:
            self.consistency = self.default_consistency = consistency
        self.chroma_consistency = self.default_chroma_consistency = chroma_consistency
        self.path = Path(path) if path is not None else WEIGHTS
        if name is not None:
            self.name = name
        if description is not None:
            self.description = description
        self._net = None
        self._experts = None
        self._lock = threading.Lock()

    @functools.cached_property
    def arch(self) -> dict:
        """The network's recorded arguments (read once from the file): its ``experts`` and ``scale`` among them."""
        return read_arch(self.path) if self.path.is_file() else {"experts": EXPERTS, "scale": SCALE}

    @property
    def experts(self) -> tuple[str, ...]:
        """The registry names of the candidates the weights were trained with."""
        return self.arch["experts"]

    @property
    def scales(self) -> tuple[int, ...]:
        # a x4 network also gives x2 (its own x2 model's, else its x4 output brought down)
        return (2, 4) if self.arch["scale"] == 4 else (self.arch["scale"],)

    def _delegate(self, scale: int) -> FusionSR | None:
        """The x2 model that runs ``scale`` instead of this one, if any."""
        return self.x2 if self.x2 is not None and scale == 2 and self.arch["scale"] != 2 else None

    def configure(self, config) -> None:
        super().configure(config)
        delegate = self._delegate(getattr(config, "scale", SCALE))
        if delegate is not None:  # the engine projects with the strength chosen for the network that runs
            delegate.configure(config)
            self.consistency, self.chroma_consistency = delegate.consistency, delegate.chroma_consistency

    def _expert_models(self) -> list[SRModel]:
        from . import get_model

        return [get_model(name, device=self.device) for name in self.experts]

    def weights_present(self) -> bool:
        return (self.path.is_file() and all(m.weights_present() for m in self._expert_models())
                and (self.x2 is None or self.x2.weights_present()))

    def provenance(self) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        member = f"{self.path.name} + experts {', '.join(self.experts)}"
        x2 = self.x2.provenance() if self.x2 is not None else {}
        if x2:
            member += f"; x2: {x2['member']} (sha256 {x2['sha256'][:12]}...)"
        return {"package": f"geosr-trained:{self.path.stem}", "version": f"{meta.get('trained_steps', '?')} steps",
                "registry": "committed with geosr (trained here on data/train, see geosr/checkpoints/MODEL_CARD.md)",
                "member": member, "sha256": _sha256(self.path), "license": "Apache-2.0",
                "trained_steps": meta.get("trained_steps", "")}

    def prepare(self) -> None:
        with self._lock:
            if self._net is not None:
                return
            if not self.path.is_file():
                raise WeightsError(f"model '{self.name}': its trained weights are missing at {self.path} (they are "
                                   "committed with geosr; reinstall it)")
            experts = self._expert_models()
            for m in experts:
                m.prepare()
            net = load_net(self.path).requires_grad_(False)
            self._experts, self._net = experts, net
            log.info("loaded %s from %s", self.name, self.path)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_net"] = state["_experts"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray:
        self.check_scale(scale)
        delegate = self._delegate(scale)
        if delegate is not None:
            return delegate.upscale(x, scale)
        self.prepare()
        net_scale = self.arch["scale"]
        outs = [candidate(m, x, net_scale) for m in self._experts]  # 8-bit values, as in training
        with torch.inference_mode():
            lr = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
            ex = torch.from_numpy(np.concatenate(outs).astype(np.float32))[None]
            out = self._net(lr, ex)[0].numpy()
        if not is_grey(x):  # a grey tile has no colour to keep in check (and the engine makes its output grey)
            out = limit_chroma(out, self.chroma_factor)
        if scale == net_scale:
            return out
        return downscale(out, (x.shape[-2] * scale, x.shape[-1] * scale)).astype(np.float32)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
