"""Read the rasters ``geosr score`` compares and check that their grids line up.

The SR output must cover exactly the LR input's extent on a grid ``s`` times finer (integer ``s``, same CRS);
a reference must lie on the SR grid itself. Anything else raises :class:`~geosr.errors.GridError` naming the
file and the mismatch: scores of misaligned rasters measure the misalignment, not the output.

Metrics run on 8-bit RGB, as in ``shared/BENCHMARK.md``: 8-bit files are taken as they are; any other type is
stretched linearly from the 1-99 percentiles of the LR's pixels > 0 (one stretch for LR, SR and reference, so
the comparison is not changed by it). A single band is repeated to three; a constant alpha band is dropped.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from ..errors import GridError, InputError

log = logging.getLogger(__name__)


@dataclass
class Raster:
    """One raster read for scoring; georeferencing travels with its pixels."""

    path: Path | None  # None for in-memory rasters (tests)
    raw: np.ndarray  # (C, H, W) the first three image bands as stored
    crs: "rasterio.crs.CRS | None"  # noqa: F821
    transform: Affine  # pixel -> CRS

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.raw.shape[1]), int(self.raw.shape[2])

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(min x, min y, max x, max y) of the four corners in CRS units."""
        h, w = self.shape
        xs, ys = zip(*(self.transform @ (c, r) for c, r in ((0, 0), (w, 0), (0, h), (w, h))))
        return min(xs), min(ys), max(xs), max(ys)


@dataclass
class Inputs:
    """SR, LR and optional reference, checked, as 8-bit RGB, plus the geometry every metric needs."""

    sr: Raster
    lr: Raster
    reference: Raster | None
    scale: int  # SR px per LR px, per axis
    sr_rgb: np.ndarray  # (H, W, 3) uint8
    lr_rgb: np.ndarray  # (h, w, 3) uint8
    ref_rgb: np.ndarray | None  # (H, W, 3) uint8
    pixel_m: tuple[float, float]  # SR pixel size along x and y in metres (local approximation for degrees)
    stretch: tuple[float, float] | None  # (lo, hi) of the 8-bit stretch; None for 8-bit data


def read_raster(path) -> Raster:
    import rasterio
    from rasterio.enums import ColorInterp

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                bands = [b for b in range(1, src.count + 1) if src.colorinterp[b - 1] != ColorInterp.alpha][:3]
                bands = bands or [1]
                raw = src.read(bands)
                return Raster(path=path, raw=raw, crs=src.crs, transform=src.transform)
    except rasterio.errors.RasterioError as err:
        raise InputError(f"{path}: not a readable raster ({' '.join(str(err).split())})") from err


def _name(r: Raster, role: str) -> str:
    return str(r.path) if r.path is not None else f"<{role}>"


def _check_pair(sr: Raster, lr: Raster) -> int:
    """The integer scale from LR to SR, or GridError naming the mismatch."""
    a, b = _name(sr, "SR"), _name(lr, "LR")
    if (sr.crs is None) != (lr.crs is None) or (sr.crs is not None and sr.crs != lr.crs):
        raise GridError(f"{a}: CRS {sr.crs} differs from the LR's {lr.crs} ({b}); put both on one CRS "
                        "(the SR must be on the LR's grid, refined)")
    (h, w), (H, W) = lr.shape, sr.shape
    if sr.crs is not None:
        px = math.hypot(sr.transform.a, sr.transform.d)  # SR pixel size: the tolerance of the extent check
        if not np.allclose(sr.bounds, lr.bounds, rtol=0, atol=px / 2):
            fmt = lambda bb: "(" + ", ".join(f"{v:.6g}" for v in bb) + ")"  # noqa: E731
            raise GridError(f"{a}: extent {fmt(sr.bounds)} differs from the LR's {fmt(lr.bounds)} ({b}); "
                            "SR and LR must cover the same area")
    if H % h or W % w or H // h != W // w or H < h:
        raise GridError(f"{a}: grids do not line up: SR {W}x{H} px is not one integer multiple of LR {w}x{h} px "
                        f"({b})")
    s = H // h
    if sr.crs is not None:
        expected = lr.transform @ Affine.scale(1 / s)
        if not np.allclose(tuple(sr.transform)[:6], tuple(expected)[:6], rtol=1e-9,
                           atol=1e-6 * math.hypot(expected.a, expected.d)):
            raise GridError(f"{a}: grids do not line up: SR transform {tuple(sr.transform)[:6]} is not the LR's "
                            f"refined x{s} {tuple(expected)[:6]} ({b})")
    return s


def _check_reference(ref: Raster, sr: Raster) -> None:
    a, b = _name(ref, "reference"), _name(sr, "SR")
    if (ref.crs is None) != (sr.crs is None) or (ref.crs is not None and ref.crs != sr.crs):
        raise GridError(f"{a}: CRS {ref.crs} differs from the SR's {sr.crs} ({b}); resample the reference onto "
                        "the SR grid")
    same = ref.shape == sr.shape and np.allclose(tuple(ref.transform)[:6], tuple(sr.transform)[:6], rtol=1e-9,
                                                  atol=1e-6 * math.hypot(sr.transform.a, sr.transform.d))
    if not same:
        raise GridError(f"{a}: grids do not line up: reference {ref.shape[1]}x{ref.shape[0]} px, transform "
                        f"{tuple(ref.transform)[:6]}, SR {sr.shape[1]}x{sr.shape[0]} px, transform "
                        f"{tuple(sr.transform)[:6]} ({b}); resample the reference onto the SR grid")


def pixel_size_m(crs, transform: Affine, shape: tuple[int, int]) -> tuple[float, float]:
    """Pixel size along x and y in metres; for geographic CRSs at the raster's centre latitude."""
    px, py = math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)
    if crs is None:
        return px, py
    if crs.is_geographic:
        _, lat = transform @ (shape[1] / 2, shape[0] / 2)
        m_per_deg = 111_320.0  # equatorial metres per degree (spherical approximation)
        return px * m_per_deg * math.cos(math.radians(lat)), py * m_per_deg
    factor = crs.linear_units_factor[1] if crs.linear_units else 1.0
    return px * factor, py * factor


def to_8bit(raw: np.ndarray, stretch: tuple[float, float] | None) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W, 3)`` uint8, linear from ``stretch`` (lo, hi) unless already 8-bit."""
    x = raw[:3]
    if stretch is not None:
        lo, hi = stretch
        x = np.clip(np.round((x.astype(np.float64) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    if x.shape[0] < 3:
        x = np.repeat(x[:1], 3, axis=0)
    return np.ascontiguousarray(np.moveaxis(x, 0, -1))


def _stretch(lr: Raster) -> tuple[float, float] | None:
    if lr.raw.dtype == np.uint8:
        return None
    v = lr.raw.astype(np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def load_inputs(sr, lr, reference=None) -> Inputs:
    """Read and check the rasters; ``sr``/``lr``/``reference`` are paths or :class:`Raster`."""
    sr = sr if isinstance(sr, Raster) else read_raster(sr)
    lr = lr if isinstance(lr, Raster) else read_raster(lr)
    ref = reference if reference is None or isinstance(reference, Raster) else read_raster(reference)
    scale = _check_pair(sr, lr)
    if ref is not None:
        _check_reference(ref, sr)
    if sr.crs is None:
        log.warning("%s has no CRS: vectors cannot be placed on it and lengths are in pixels", _name(sr, "SR"))
    stretch = _stretch(lr)
    return Inputs(sr=sr, lr=lr, reference=ref, scale=scale, sr_rgb=to_8bit(sr.raw, stretch),
                  lr_rgb=to_8bit(lr.raw, stretch), ref_rgb=None if ref is None else to_8bit(ref.raw, stretch),
                  pixel_m=pixel_size_m(sr.crs, sr.transform, sr.shape), stretch=stretch)
