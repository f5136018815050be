"""Side-by-side PNG previews (input upsampled | output) for people who would rather look than read."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

PANEL = 800  # max output px per side shown in each panel


def to_8bit(block: np.ndarray, lo=None, hi=None) -> np.ndarray:
    """``(band, y, x)`` -> ``(y, x, 3)`` uint8, with a 1-99 percentile stretch for non-8-bit data."""
    rgb = block[:3] if block.shape[0] >= 3 else np.repeat(block[:1], 3, axis=0)
    if rgb.dtype == np.uint8:
        return np.moveaxis(rgb, 0, -1)
    v = rgb.astype(np.float64)
    finite = v[np.isfinite(v) & (v > 0)] if (v > 0).any() else v[np.isfinite(v)]
    if lo is None or hi is None:
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    v = np.clip((v - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255)
    return np.moveaxis(np.nan_to_num(v).round().astype(np.uint8), 0, -1)


def write_preview(src: Path, out: Path, png: Path, *, scale: int, bands=None) -> Path:
    """A PNG of the scene's centre: the input upsampled with bicubic on the left, the output on the right."""
    from PIL import Image, ImageDraw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(src) as s, rasterio.open(out) as o:
            side_in = max(1, PANEL // scale)
            w_in, h_in = min(s.width, side_in), min(s.height, side_in)
            c0, r0 = (s.width - w_in) // 2, (s.height - h_in) // 2
            idx = list(bands) if bands else list(range(1, s.count + 1))
            lr = s.read(idx[:3], window=Window(c0, r0, w_in, h_in))
            sr = o.read(list(range(1, min(3, o.count) + 1)), window=Window(c0 * scale, r0 * scale, w_in * scale, h_in * scale))
    both = np.concatenate([lr.reshape(lr.shape[0], -1), sr.reshape(sr.shape[0], -1)], axis=1).astype(np.float64)
    lo, hi = (None, None) if lr.dtype == np.uint8 else np.percentile(both[np.isfinite(both)], [1, 99])
    left = Image.fromarray(to_8bit(lr, lo, hi)).resize((w_in * scale, h_in * scale), Image.BICUBIC)
    right = Image.fromarray(to_8bit(sr, lo, hi))
    gap, label = 8, 22
    canvas = Image.new("RGB", (left.width * 2 + gap, left.height + label), "white")
    canvas.paste(left, (0, label))
    canvas.paste(right, (left.width + gap, label))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"input, bicubic x{scale}", fill="black")
    draw.text((left.width + gap + 4, 4), f"geosr x{scale}", fill="black")
    png = Path(png)
    canvas.save(png)
    return png
