"""RRDBNet, the ESRGAN / Real-ESRGAN generator, in plain PyTorch.

The network is a stack of Residual-in-Residual Dense Blocks (RRDB) on a ``features``-channel trunk, followed
by two nearest-neighbour x2 upsamplings, each with a 3x3 conv and LeakyReLU(0.2).  For output factors below 4
the input is first folded with ``pixel_unshuffle`` (space to depth) so the trunk still upsamples by 4.

Parameter names follow the layout of the published Real-ESRGAN checkpoints (``conv_first``,
``body.{i}.rdb{1,2,3}.conv{1..5}``, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``), so a
state dict converted from any source can be checked against the original ``.pth`` key by key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Residual scaling used inside every dense block and every RRDB (ESRGAN paper, "residual scaling" = 0.2).
RESIDUAL_SCALE = 0.2
LEAKY_SLOPE = 0.2


@dataclass(frozen=True)
class RRDBNetConfig:
    in_ch: int = 3  # input channels (RGB)
    out_ch: int = 3  # output channels (RGB)
    features: int = 64  # trunk width
    blocks: int = 23  # number of RRDB blocks
    growth: int = 32  # channels each dense-block conv adds
    scale: int = 4  # output px per input px, per axis: 1, 2 or 4


class DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the concatenation of the block input and all earlier outputs."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Conv2d(features + (i - 1) * growth, growth, 3, 1, 1))
        self.conv5 = nn.Conv2d(features + 4 * growth, features, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F, H, W)
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            y = F.leaky_relu(conv(torch.cat(feats, dim=1)), LEAKY_SLOPE)  # (B, G, H, W)
            feats.append(y)
        out = self.conv5(torch.cat(feats, dim=1))  # (B, F, H, W)
        return out * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Three dense blocks in series with a scaled skip over all three."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1 = DenseBlock(features, growth)
        self.rdb2 = DenseBlock(features, growth)
        self.rdb3 = DenseBlock(features, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F, H, W)
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN generator: ``(B, in_ch, H, W)`` in about [0, 1] -> ``(B, out_ch, scale*H, scale*W)``, unclamped."""

    def __init__(self, *, in_ch: int = 3, out_ch: int = 3, features: int = 64, blocks: int = 23, growth: int = 32,
                 scale: int = 4):
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
        self.config = RRDBNetConfig(in_ch=in_ch, out_ch=out_ch, features=features, blocks=blocks, growth=growth,
                                    scale=scale)
        self.unshuffle = 4 // scale  # space-to-depth factor so the trunk always upsamples x4
        self.conv_first = nn.Conv2d(in_ch * self.unshuffle**2, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, out_ch, 3, 1, 1)

    @classmethod
    def from_config(cls, config: RRDBNetConfig) -> "RRDBNet":
        return cls(**asdict(config))

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        if self.unshuffle > 1:
            if x.shape[-2] % self.unshuffle or x.shape[-1] % self.unshuffle:
                raise ValueError(f"scale {self.scale}: H and W must be multiples of {self.unshuffle}, got "
                                 f"{tuple(x.shape[-2:])}")
            x = F.pixel_unshuffle(x, self.unshuffle)  # (B, C*u*u, H/u, W/u)
        feat = self.conv_first(x)  # (B, F, h, w)
        feat = feat + self.conv_body(self.body(feat))  # (B, F, h, w)
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        # feat: (B, F, 4h, 4w)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), LEAKY_SLOPE))  # (B, out_ch, 4h, 4w)


def config_from_state(state: dict) -> RRDBNetConfig:
    """Recover the architecture from a state dict's tensor shapes (the files carry no separate config)."""
    first = state["conv_first.weight"]  # (F, in_ch * u * u, 3, 3)
    features = first.shape[0]
    out_ch = state["conv_last.weight"].shape[0]
    growth = state["body.0.rdb1.conv1.weight"].shape[0]
    blocks = len({k.split(".")[1] for k in state if k.startswith("body.")})
    folded = first.shape[1]
    # in_ch * u^2 with u in (1, 2, 4); assume the output has as many channels as the input, as RRDBNet does.
    for scale, u in ((4, 1), (2, 2), (1, 4)):
        if folded == out_ch * u * u:
            return RRDBNetConfig(in_ch=out_ch, out_ch=out_ch, features=features, blocks=blocks, growth=growth,
                                 scale=scale)
    raise ValueError(f"conv_first takes {folded} channels: not {out_ch} x 1, 4 or 16")
