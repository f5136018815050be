"""×2: the default model at ``--scale 2`` against interpolation, waifu2x ×2 and the ×4 anchors brought down to ×2.

At ``--scale 2`` the default runs its ×2 network (``aerial-x2``: RRDN-GAN and Real-ESRGAN brought down to ×2 and
waifu2x ×2, fused per pixel) and its projection strength.

BENCHMARK.md's protocol is ×4 only. This is its ×2 analogue, on the same HR crops and metrics:
- ``clean``: antialiased bicubic downscale by 2 (256² LR);
- ``real``: Gaussian blur σ = 0.5 px (the protocol's σ = 1 scaled to the factor), bicubic downscale by 2, noise
  σ = 3 (``default_rng(crop_index)``), JPEG 70.

The ×4 anchors run ×4 as published and their output is downscaled by 2 with the protocol's antialiased bicubic (as
aerial-x2 gets them among its candidates); waifu2x's photo network is a native ×2 network (with its JPEG-noise removal level 1 too), run as geosr runs it (no projection):

    .venv/bin/python benchmarks/x2_default.py --json benchmarks/results/x2_default.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from geosr.bench import _resize, load_crops, lr_consistency, luma, psnr, ssim
from geosr.config import EnhanceConfig
from geosr.scene import enhance_array
from geosr.scoring.lpips import lpips_distance

FACTOR = 2


def degrade(hr: np.ndarray, kind: str, index: int) -> np.ndarray:
    from PIL import Image, ImageFilter

    size = (hr.shape[0] // FACTOR, hr.shape[1] // FACTOR)
    if kind == "clean":
        return _resize(hr, size)
    blurred = np.asarray(Image.fromarray(hr).filter(ImageFilter.GaussianBlur(radius=0.5)))
    lr = _resize(blurred, size).astype(np.float64) + np.random.default_rng(index).normal(0.0, 3.0, size + (3,))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(lr), 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=70)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def enhance(config: EnhanceConfig, lr: np.ndarray, down: bool) -> tuple[np.ndarray, float]:
    """``(y, x, 3)`` uint8 -> the ×2 output and its seconds; ``down``: run ×4 and downscale by 2."""
    t0 = time.perf_counter()
    out = np.moveaxis(enhance_array(np.moveaxis(lr, -1, 0), config), 0, -1)
    if down:
        out = _resize(out, (lr.shape[0] * FACTOR, lr.shape[1] * FACTOR))
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--degradations", default="clean,real")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    x2 = {"scale": FACTOR, "threads": args.threads}
    x4 = {"scale": 4, "threads": args.threads, "consistency": 0.0}  # the anchors as published
    methods = {
        "bicubic": (EnhanceConfig(model="bicubic", **x2), False),
        "lanczos": (EnhanceConfig(model="lanczos", **x2), False),
        "rrdn-gan x4, downscaled": (EnhanceConfig(model="rrdn-gan", **x4), True),
        "realesrgan-x4plus x4, downscaled": (EnhanceConfig(model="realesrgan-x4plus", **x4), True),
        "waifu2x-photo x2": (EnhanceConfig(model="waifu2x-photo", **x2), False),
        "waifu2x-photo-denoise x2": (EnhanceConfig(model="waifu2x-photo-denoise", **x2), False),
        "default (aerial-x4 at --scale 2: its x2 network, aerial-x2)": (EnhanceConfig(**x2), False),
        "aerial-x2-fast (no Real-ESRGAN)": (EnhanceConfig(model="aerial-x2-fast", **x2), False),
    }
    crops = load_crops()
    rows = []
    for kind in args.degradations.split(","):
        lrs = [degrade(hr, kind, i) for i, hr in enumerate(crops)]
        for name, (config, down) in methods.items():
            scores = []
            for hr, lr in zip(crops, lrs):
                sr, seconds = enhance(config, lr, down)
                y_sr, y_hr = luma(sr), luma(hr)
                scores.append((psnr(y_hr, y_sr), ssim(y_hr, y_sr), lpips_distance(hr, sr), lr_consistency(sr, lr),
                               seconds * 512 * 512 / (sr.shape[0] * sr.shape[1])))
                print(f"\r{kind} {name}: {len(scores)}/{len(crops)}", end="", file=sys.stderr, flush=True)
            m = np.mean(scores, axis=0)
            rows.append({"degradation": kind, "method": name, "psnr_y": m[0], "ssim_y": m[1], "lpips": m[2],
                         "lrc": m[3], "seconds_per_512": m[4]})
    print(file=sys.stderr)
    print("| degradation | method | PSNR-Y | SSIM-Y | LPIPS | LRC | s per 512² output |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['degradation']} | {r['method']} | {r['psnr_y']:.2f} | {r['ssim_y']:.4f} | {r['lpips']:.4f} | "
              f"{r['lrc']:.2f} | {r['seconds_per_512']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"protocol": "BENCHMARK.md crops and metrics, x2 analogue (see script)",
                                         "settings": {k: c.to_dict() for k, (c, _) in methods.items()},
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
