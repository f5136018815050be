"""Pure tiling math: the tile grid, feathered blend weights, reflect-padding indices, output cells.

Nothing in here touches a file. Coordinates are integers in pixels; ``L`` is the scene size along one axis in
input (LR) pixels, ``s`` the integer scale factor.

At the scene edge a tile either reads reflect-padded pixels (``edge="reflect"``), is cut at the edge
(``edge="cut"``, so the model sees the edge as it would on the whole image), or is reflect-padded by at most N
px and cut there (``edge="reflect:N"``). All keep tiled == whole-image.

The layout along one axis (input pixels, ``h`` = halo, ``r`` = ramp = overlap - 2h)::

    tile i:   [h halo, weight 0][r ramp up][ ... weight 1 ... ][r ramp down][h halo, weight 0]
    tile i+1:                              starts overlap pixels before tile i ends

Tiles start at ``-h`` (the scene is reflect-padded by the halo, so border pixels see context like interior
ones) and step by ``tile - overlap``. The ramp of tile i and the ramp of tile i+1 lie on the same pixels and
are ``w`` and ``1 - w``, so the weights of all tiles sum to exactly 1 on every pixel. A model whose receptive
field is at most ``h`` gives the same result tiled as on the whole image, because no pixel with a non-zero
weight sees the tile edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from affine import Affine

__all__ = ["AxisPlan", "TileGrid", "Tile", "Cell", "reflect_indices", "output_transform", "default_overlap", "halo_for", "parse_edge"]


def default_overlap(receptive_field: int) -> int:
    """Overlap (input px) for a model whose outputs depend on inputs up to ``receptive_field`` px away:
    a halo of ``receptive_field`` on each side plus a cross-fade ramp of half that (at least 2 px)."""
    rf = max(0, int(receptive_field))
    return 2 * rf + max(2, rf // 2)


def halo_for(receptive_field: int, overlap: int) -> int:
    """The halo (weight-0 border) for ``overlap``: the receptive field, but leaving a ramp of >= 2 px."""
    return max(0, min(int(receptive_field), (overlap - 2) // 2))


def reflect_indices(start: int, stop: int, length: int) -> np.ndarray:
    """Scene indices for padded coordinates ``start..stop-1`` under reflect padding (no edge repeat).

    Repeats the reflection as often as needed, so it works for pads larger than the scene. A scene of one
    pixel repeats that pixel.
    """
    x = np.arange(start, stop)
    if length == 1:
        return np.zeros_like(x)
    period = 2 * (length - 1)
    x = np.mod(x, period)
    return np.where(x < length, x, period - x)


@dataclass(frozen=True)
class AxisPlan:
    """Tiles along one axis."""

    length: int  # scene size, input px
    tile: int  # tile size, input px
    overlap: int  # overlap between neighbouring tiles, input px
    scale: int  # output px per input px
    halo_px: int | None = None  # weight-0 border of each tile, input px; None: overlap // 4

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {self.overlap}")
        if self.halo_px is not None and not 0 <= 2 * self.halo_px <= self.overlap:
            raise ValueError(f"halo {self.halo_px} must be between 0 and overlap / 2 ({self.overlap / 2})")
        if self.tile <= 2 * self.overlap:
            raise ValueError(f"tile ({self.tile}) must be larger than 2 x overlap ({self.overlap})")
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")

    @property
    def halo(self) -> int:
        return self.overlap // 4 if self.halo_px is None else self.halo_px

    @property
    def ramp(self) -> int:
        return self.overlap - 2 * self.halo

    @property
    def step(self) -> int:
        return self.tile - self.overlap

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """Tile starts in input px (the first is ``-halo``); the last tile reaches at least ``length + halo``."""
        h = self.halo
        # Tile i covers weight-1-or-ramp pixels up to start + tile - h; it must reach length.
        n = 1 + max(0, -(-(self.length + 2 * h - self.tile) // self.step))
        return tuple(-h + i * self.step for i in range(n))

    def __len__(self) -> int:
        return len(self.starts)

    def weights(self, i: int) -> np.ndarray:
        """Blend weights of tile ``i`` on the output grid, shape ``(tile * scale,)``, float64."""
        s, h, r = self.scale, self.halo, self.ramp
        n_out = self.tile * s
        w = np.ones(n_out, dtype=np.float64)
        hs, rs = h * s, r * s
        ramp_up = (np.arange(rs, dtype=np.float64) + 0.5) / rs if rs else np.zeros(0)
        if i > 0:
            w[:hs] = 0.0
            w[hs:hs + rs] = ramp_up
        if i < len(self) - 1:
            w[n_out - hs:] = 0.0
            w[n_out - hs - rs:n_out - hs] = 1.0 - ramp_up
        return w

    def support(self, i: int) -> tuple[int, int]:
        """Output-px interval ``[a, b)`` where tile ``i`` has non-zero weight, clipped to the scene."""
        s, h = self.scale, self.halo
        a = (self.starts[i] + (h if i > 0 else 0)) * s
        b = (self.starts[i] + self.tile - (h if i < len(self) - 1 else 0)) * s
        return max(a, 0), min(b, self.length * s)

    @cached_property
    def segments(self) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
        """Partition of ``[0, length * scale)`` into ``(a, b, tiles)``: the tiles with weight on ``[a, b)``."""
        spans = [self.support(i) for i in range(len(self))]
        cuts = sorted({c for span in spans for c in span} | {0, self.length * self.scale})
        out = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b <= a:
                continue
            cover = tuple(i for i, (sa, sb) in enumerate(spans) if sa <= a and b <= sb)
            out.append((a, b, cover))
        return tuple(out)


@dataclass(frozen=True)
class Tile:
    """One tile: its grid index, its window in padded input px and its placement on the output grid."""

    row: int
    col: int
    y0: int  # input px, may be negative (reflect padding)
    x0: int
    size: int  # input px, square

    def source(self, height: int, width: int, edge: str = "reflect") -> tuple[np.ndarray, np.ndarray]:
        """Scene rows and columns this tile reads.

        ``edge="reflect"``: the full tile, reflect-padded where it passes the scene edge.
        ``edge="cut"``: only the part inside the scene, so the model meets the scene edge exactly as it would
        on the whole image (for networks trained with zero padding, reflected borders are worse).
        ``edge="reflect:N"``: reflect-padded by at most ``N`` px beyond the scene edge, then cut.
        """
        pad = parse_edge(edge)
        y0, y1 = self._span(self.y0, height, pad)
        x0, x1 = self._span(self.x0, width, pad)
        return reflect_indices(y0, y1, height), reflect_indices(x0, x1, width)

    def _span(self, start: int, length: int, pad: int | None) -> tuple[int, int]:
        if pad is None:
            return start, start + self.size
        return max(start, -pad), min(start + self.size, length + pad)

    def read_origin(self, edge: str = "reflect") -> tuple[int, int]:
        """Input px of the first pixel :meth:`source` reads (the tile origin, or where it was cut)."""
        pad = parse_edge(edge)
        return (self.y0, self.x0) if pad is None else (max(self.y0, -pad), max(self.x0, -pad))


def parse_edge(edge: str) -> int | None:
    """``"reflect"`` -> None (unlimited padding), ``"cut"`` -> 0, ``"reflect:N"`` -> N."""
    if edge == "reflect":
        return None
    if edge == "cut":
        return 0
    if isinstance(edge, str) and edge.startswith("reflect:") and edge[8:].isdigit():
        return int(edge[8:])
    raise ValueError(f"edge must be 'reflect', 'cut' or 'reflect:N', got {edge!r}")


@dataclass(frozen=True)
class Cell:
    """A rectangle of the output on which the same set of tiles has weight; final once ``last`` is done."""

    y0: int
    y1: int
    x0: int
    x1: int
    last: tuple[int, int]  # (row, col) of the last tile, in raster order, that contributes


@dataclass(frozen=True)
class TileGrid:
    """The 2-D grid: the product of a row plan and a column plan."""

    rows: AxisPlan
    cols: AxisPlan

    @classmethod
    def for_scene(cls, height: int, width: int, *, tile: int, overlap: int, scale: int,
                  halo: int | None = None) -> "TileGrid":
        return cls(AxisPlan(height, tile, overlap, scale, halo), AxisPlan(width, tile, overlap, scale, halo))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.rows.length * self.rows.scale, self.cols.length * self.cols.scale

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def tiles(self):
        """Tiles in raster order."""
        for i, y0 in enumerate(self.rows.starts):
            for j, x0 in enumerate(self.cols.starts):
                yield Tile(i, j, y0, x0, self.rows.tile)

    def weights(self, tile: Tile) -> np.ndarray:
        """2-D blend weights of ``tile`` on the output grid, shape ``(size * s, size * s)``."""
        return np.outer(self.rows.weights(tile.row), self.cols.weights(tile.col))

    def out_origin(self, tile: Tile) -> tuple[int, int]:
        """Output px of the tile's top-left corner (may be negative)."""
        return tile.y0 * self.rows.scale, tile.x0 * self.cols.scale

    def cells_by_tile(self) -> dict[tuple[int, int], list[Cell]]:
        """For every tile, the output cells that become final when it is done (raster order)."""
        out: dict[tuple[int, int], list[Cell]] = {}
        for ya, yb, ycover in self.rows.segments:
            for xa, xb, xcover in self.cols.segments:
                last = (max(ycover), max(xcover))
                out.setdefault(last, []).append(Cell(ya, yb, xa, xb, last))
        return out


def output_transform(transform: Affine, scale: int) -> Affine:
    """The input transform refined by ``scale``: same corners, pixels ``scale`` times smaller."""
    return transform @ Affine.scale(1.0 / scale)
