"""Pretrained PyTorch networks behind the :class:`SRModel` interface, weights from the local cache."""

from __future__ import annotations

import importlib
import json
import logging
import threading
from pathlib import Path

import numpy as np

from ..config import weights_dir
from ..errors import ConfigError, WeightsError
from .base import SRModel, is_grey

log = logging.getLogger(__name__)

_LOADED: dict[tuple[str, str], object] = {}  # (weights file, device) -> network: loaded once per process


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise WeightsError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise WeightsError(f"--device {device}: choose cpu, cuda or auto")
    return device


class TorchSR(SRModel):
    """A converted third-party network: ``module`` names the converter with ``fetch(dir)`` and ``load(path, device)``."""

    channels = 3
    scales = (4,)

    def __init__(self, *, name: str, filename: str, module: str, receptive_field: int, default_tile: int,
                 description: str, edge: str = "cut", device: str = "cpu", consistency: float = 0.0):
        self.name, self.filename, self.module, self.edge = name, filename, module, edge
        self.consistency = self.default_consistency = consistency  # LR-consistency projection (see SRModel)
        self.receptive_field, self.default_tile, self.description = receptive_field, default_tile, description
        self.device = device
        self._net = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return weights_dir() / self.filename

    def weights_present(self) -> bool:
        return self.path.is_file()

    def provenance(self) -> dict[str, str]:
        if not self.weights_present():
            return {}
        from .sources import PROVENANCE_KEYS, read_provenance

        meta = read_provenance(self.path)
        return {k: meta[k] for k in PROVENANCE_KEYS if k in meta}

    def fetch(self) -> Path:
        return importlib.import_module(self.module).fetch(weights_dir())

    def prepare(self) -> None:
        with self._lock:
            if self._net is not None:
                return
            self._check_weights()
            device = resolve_device(self.device)
            key = (self._cache_key, device)
            if key not in _LOADED:
                _LOADED[key] = self._load(device)
                log.info("loaded %s from %s on %s", self.name, self._cache_path, device)
            self._net, self._device = _LOADED[key], device

    @property
    def _cache_path(self) -> Path:
        """The file that tells this network apart in the per-process cache of loaded networks."""
        return self.path

    @property
    def _cache_key(self) -> str:
        return str(self._cache_path)

    def _check_weights(self) -> None:
        if not self.path.is_file():
            raise WeightsError(f"model '{self.name}': weights not found at {self.path}; run 'geosr weights fetch'")

    def _load(self, device: str):
        return importlib.import_module(self.module).load(self.path, device=device)

    def __getstate__(self):
        """Pickled (for process or distributed schedulers) without the network: a worker loads the weights from its
        own cache, once per process."""
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_net"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray:
        import torch

        self.prepare()
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self._device)
            y = self._forward(t, scale)[0]  # (3, sH, sW)
        return y.float().cpu().numpy()

    def _forward(self, t, scale: int):
        return self._net(t)


class TunedSR(TorchSR):
    """A converted third-party network fine-tuned by geosr: the registry's weights (``filename``, fetched as for the
    base model) plus a committed difference (``delta``, written by :func:`geosr.training.expert.tune_expert` in
    float16, or by :func:`geosr.training.expert.quantize_delta` in int8 with one scale per tensor)."""

    def __init__(self, *, delta: Path, chroma_factor: int = 1, interpolation: float = 1.0, **kwargs):
        """``chroma_factor`` > 1: the output keeps its luma and its colour detail is low-passed to ``1/factor`` of
        the output grid (:func:`geosr.models.consistency.limit_chroma`, as aerial-x4-fusion does).

        ``interpolation``: the network runs ``base + interpolation · delta``, a point on the straight line between the
        third-party weights (0) and the fine-tuned ones (1): weight-space ensembling of a network and its fine-tuned
        self (WiSE-FT, Wortsman et al., CVPR 2022; ESRGAN's network interpolation), which keeps more of the base's
        robustness to imagery unlike the fine-tuning data."""
        super().__init__(**kwargs)
        if not 0.0 <= interpolation <= 1.0:
            raise ConfigError(f"interpolation={interpolation}: give a weight between 0 (base) and 1 (fine-tuned)")
        self.delta = Path(delta)
        self.chroma_factor = int(chroma_factor)
        self.interpolation = float(interpolation)

    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray:
        out = super().upscale(x, scale)
        if self.chroma_factor > 1 and x.shape[0] == 3 and not is_grey(x):
            from .consistency import limit_chroma

            out = limit_chroma(out, self.chroma_factor)
        return out

    def weights_present(self) -> bool:
        return super().weights_present() and self.delta.is_file()

    def provenance(self) -> dict[str, str]:
        if not self.weights_present():
            return {}
        from .sources import read_provenance, sha256_file

        meta = read_provenance(self.delta)
        base = super().provenance()
        return {"package": f"geosr-trained:{self.delta.stem}", "version": f"{meta.get('trained_steps', '?')} steps",
                "registry": "committed with geosr (fine-tuned here on data/train, see geosr/checkpoints/MODEL_CARD.md)",
                "member": f"{meta.get('base', '?')} from {base.get('package', '?')} {base.get('version', '?')} + "
                          + (f"{self.interpolation:g} x " if self.interpolation != 1.0 else "") + self.delta.name,
                "sha256": sha256_file(self.delta), "license": base.get("license", "?"),
                "trained_steps": meta.get("trained_steps", "")}

    @property
    def _cache_path(self) -> Path:
        return self.delta

    @property
    def _cache_key(self) -> str:
        return f"{self.delta}@{self.interpolation}"

    def _check_weights(self) -> None:
        super()._check_weights()  # the base's
        if not self.delta.is_file():
            raise WeightsError(f"model '{self.name}': its committed weights are missing at {self.delta} "
                               "(reinstall geosr)")

    def _load(self, device: str):
        import torch
        from safetensors.torch import load_file

        from ..training.expert import tensors_sha256
        from .sources import read_provenance

        net = importlib.import_module(self.module).load(self.path, device="cpu")  # its own copy, not the base's
        state = net.state_dict()
        meta = read_provenance(self.delta)
        if meta.get("base_tensors_sha256") != tensors_sha256(state):
            raise WeightsError(f"model '{self.name}': {self.delta.name} was tuned from other {self.path.name} "
                               "tensors than the cached ones; delete that file and run 'geosr weights fetch'")
        delta = load_file(str(self.delta))
        if set(delta) != set(state) or any(delta[k].shape != state[k].shape for k in state):
            raise WeightsError(f"model '{self.name}': {self.delta.name} does not match {self.path.name}'s tensors")
        scales = json.loads(meta.get("int8_scales", "{}"))  # training.expert.quantize_delta
        if any(delta[k].dtype == torch.int8 and k not in scales for k in delta):
            raise WeightsError(f"model '{self.name}': {self.delta.name} holds int8 tensors without their scales")
        with torch.no_grad():
            net.load_state_dict({k: state[k] + delta[k].float() * (scales.get(k, 1.0) * self.interpolation)
                                 for k in state})
        return net.to(device).eval()


class Waifu2xSR(TorchSR):
    """waifu2x upconv_7 (photo): ×2 in one pass of the ``first`` variant, ×4 in two (``first``, then ``scale``)."""

    scales = (2, 4)

    def __init__(self, *, first: str = "scale", **kwargs):
        super().__init__(**kwargs)
        self.first = first

    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray:
        self.check_scale(scale)
        return super().upscale(x, scale)

    def _forward(self, t, scale: int):
        return self._net(t, self.first, scale.bit_length() - 1)  # 2 -> one pass, 4 -> two
