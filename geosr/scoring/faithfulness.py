"""Faithfulness: does the output agree with the input it was made from, and where does it not?

All maps are on luminance Y (BT.601, 16..235, :func:`geosr.bench.luma`) in 8-bit levels. With ``D`` the
antialiased bicubic downscale onto the LR grid (PIL, as for LR-consistency in ``shared/BENCHMARK.md``) and
``U`` the bicubic upscale back onto the SR grid, the **hallucination map** on the SR grid is::

    residual = max(0, U(|D(Y_sr) - Y_lr|))               # the output contradicts its own input here
    detail   = sqrt(box_k((Y_sr - U(D(Y_sr)))^2))         # energy the degradation removes: the LR is blind to it
    map      = residual + detail

``box_k`` is the mean over a ``k`` x ``k`` SR-px box (``ScoreConfig.map_window``). ``residual`` is zero for an
output whose re-degraded image is the LR; ``detail`` is zero where the output holds nothing finer than the LR
can carry. Detail is not wrong by itself (a true HR image has plenty), but nothing in the input supports it:
it is what a model invented, plausibly or not. A blurred output lowers ``detail`` and raises ``residual``; a
texture pasted into a flat area raises both there. Band order of the GeoTIFF: map, residual, detail.
"""

from __future__ import annotations

import os

import numpy as np

from .. import bench


def resize_float(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` float -> ``(h, w)`` float32 with PIL's bicubic (antialiased when shrinking)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32), mode="F")
    return np.asarray(img.resize((hw[1], hw[0]), Image.BICUBIC), dtype=np.float32)


def lr_consistency(sr_rgb: np.ndarray, lr_rgb: np.ndarray, *, cap_db: float) -> float:
    """BENCHMARK.md's LRC (dB): PSNR between the SR downscaled onto the LR grid and the LR; ``cap_db`` if equal."""
    return min(bench.lr_consistency(sr_rgb, lr_rgb), cap_db)


def hallucination_map(sr_rgb: np.ndarray, lr_rgb: np.ndarray, *, window: int) -> dict[str, np.ndarray]:
    """``{"map", "residual", "detail"}``, each ``(H, W)`` float32 in 8-bit luma levels (definition: module doc)."""
    y_sr = bench.luma(sr_rgb).astype(np.float32)  # (H, W)
    y_lr = bench.luma(lr_rgb).astype(np.float32)  # (h, w)
    from scipy.ndimage import uniform_filter

    down = resize_float(y_sr, y_lr.shape)  # (h, w)
    residual = np.maximum(resize_float(np.abs(down - y_lr), y_sr.shape), 0.0)  # (H, W)
    unseen = y_sr - resize_float(down, y_sr.shape)  # (H, W)
    detail = np.sqrt(np.maximum(uniform_filter(unseen * unseen, size=window, mode="reflect"), 0.0))
    return {"map": residual + detail, "residual": residual, "detail": detail.astype(np.float32)}


def summarize(maps: dict[str, np.ndarray]) -> dict[str, float]:
    """Scene means and the 95th percentile of each map."""
    out = {}
    for k, v in maps.items():
        out[f"{k}_mean"] = float(np.mean(v))
        out[f"{k}_p95"] = float(np.percentile(v, 95))
    return out


def write_map(path, maps: dict[str, np.ndarray], *, crs, transform, overwrite: bool) -> None:
    """The three maps as a float32 GeoTIFF on the SR grid (atomic; band descriptions name them)."""
    import rasterio

    from ..io.write import atomic_output, tagged_profile
    from .report import _umask

    h, w = maps["map"].shape
    profile = tagged_profile(height=h, width=w, count=3, dtype="float32", crs=crs, transform=transform, nodata=None)
    with atomic_output(path, overwrite=overwrite, cog=False) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            for i, name in enumerate(("map", "residual", "detail"), start=1):
                dst.write(maps[name].astype(np.float32), i)
                dst.set_band_description(i, name)
            dst.update_tags(GEOSR_MAP="hallucination map: residual + detail, 8-bit luma levels (see geosr.scoring."
                                      "faithfulness)")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the map is an ordinary file
