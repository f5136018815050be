"""Where a method sits on the LPIPS / SSIM-Y trade-off: its own point, and the points that sharpening or blurring its
luma reaches, on BENCHMARK.md's crops.

Issue 6 asks for LPIPS at or under a target while SSIM-Y stays at or above the best anchor's (on the ``real`` crops
that anchor is bicubic). Most changes to the default trade one for the other. This script measures the exchange rate
that a plain post-process gives: a luma unsharp mask ``Y + amount * (Y - G_sigma * Y)`` (a negative amount blurs)
applied to the method's output before its own LR-consistency projection. A new candidate or recipe is only worth
having if it beats this curve. A point on the curve could have been had with a filter.

    .venv/bin/python benchmarks/tradeoff.py --model aerial-x4-jpeg --json benchmarks/results/tradeoff.json

The first row (sigma 0) is the method as ``geosr bench`` runs it, but projected in float64 after the run instead of in
float32 inside it: for aerial-x4-jpeg that moved SSIM-Y by 0.0002 and LPIPS by 0.0001. Each further row also gives its
LPIPS change per 0.01 SSIM-Y change from the first row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FILTERS = "0.5:0.3,0.7:0.3,1.0:0.3,0.7:0.6,1.0:-0.3,1.5:-0.3"
LUMA = np.array([0.299, 0.587, 0.114])  # BT.601; the weights sum to 1, so adding d to R, G and B adds d to Y


def luma_unsharp(rgb: np.ndarray, sigma: float, amount: float) -> np.ndarray:
    """``(3, H, W)`` float: its luma's detail above ``sigma`` (HR px) scaled by ``1 + amount``; colour unchanged."""
    from scipy.ndimage import gaussian_filter

    if amount == 0.0:
        return rgb
    y = np.einsum("c,chw->hw", LUMA, rgb)
    return rgb + amount * (y - gaussian_filter(y, sigma))[None]


def _parse_filters(text: str) -> list[tuple[float, float]]:
    try:
        pairs = [tuple(float(v) for v in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"--filters: expected SIGMA:AMOUNT,..., got {text!r}") from None
    if any(len(p) != 2 or p[0] <= 0 for p in pairs):
        raise SystemExit(f"--filters: expected SIGMA:AMOUNT,... with SIGMA > 0, got {text!r}")
    return [(0.0, 0.0)] + pairs


def main(argv=None) -> None:
    from geosr import bench
    from geosr.config import EnhanceConfig
    from geosr.models import get_model
    from geosr.models.consistency import project
    from geosr.models.routed import RoutedSR
    from geosr.scoring.lpips import lpips_distance

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="aerial-x4-jpeg")
    p.add_argument("--degradation", default="real", choices=bench.DEGRADATIONS)
    p.add_argument("--filters", default=FILTERS, help="SIGMA:AMOUNT pairs, comma-separated (negative AMOUNT blurs)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    filters = _parse_filters(args.filters)

    model = get_model(args.model)
    if isinstance(model, RoutedSR):  # its projection is the route's, chosen per scene; this script needs one
        routes = " or ".join(m.name for m in model.routes.values())
        raise SystemExit(f"--model {args.model} picks a network per scene: pass that network instead ({routes})")
    strength, chroma = model.default_consistency, model.default_chroma_consistency
    crops = bench.load_crops()
    lrs = [bench.degrade(hr, args.degradation, i) for i, hr in enumerate(crops)]
    raw = EnhanceConfig(model=args.model, scale=bench.SCALE, consistency=0.0)  # projected below, after the filter
    outs = [np.moveaxis(bench.run_method(raw, lr)[0], -1, 0).astype(np.float64) for lr in lrs]

    rows = []
    print(f"{args.model} on the {args.degradation} crops, projection luma {strength}, colour {chroma}")
    print("| luma sigma | amount | PSNR-Y | SSIM-Y | LPIPS | LRC | LPIPS change per 0.01 SSIM-Y |")
    print("|---|---|---|---|---|---|---|")
    for sigma, amount in filters:
        scores = []
        for hr, lr, out in zip(crops, lrs, outs):
            chw = np.moveaxis(lr, -1, 0)
            x = project(luma_unsharp(out, sigma, amount), chw, strength, chroma if out.shape[0] == 3 else None)
            sr = np.moveaxis(np.clip(np.round(x), 0, 255).astype(np.uint8), 0, -1)
            yh, ys = bench.luma(hr), bench.luma(sr)
            scores.append((bench.psnr(yh, ys), bench.ssim(yh, ys), lpips_distance(hr, sr), bench.lr_consistency(sr, lr)))
        m = np.mean(scores, axis=0)
        row = {"sigma": sigma, "amount": amount, "psnr_y": m[0], "ssim_y": m[1], "lpips": m[2], "lrc": m[3]}
        if rows and row["ssim_y"] != rows[0]["ssim_y"]:
            row["lpips_per_0.01_ssim_y"] = 0.01 * (row["lpips"] - rows[0]["lpips"]) / (row["ssim_y"] - rows[0]["ssim_y"])
        rows.append(row)
        slope = f"{row['lpips_per_0.01_ssim_y']:.4f}" if "lpips_per_0.01_ssim_y" in row else "-"
        print(f"| {sigma:g} | {amount:g} | {m[0]:.2f} | {m[1]:.4f} | {m[2]:.4f} | {m[3]:.2f} | {slope} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "degradation": args.degradation,
                                         "projection": {"luma": strength, "colour": chroma}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
