"""Peak memory does not grow with the scene: peak RSS for a 16384² synthetic u8 RGB scene / a 2048² one.

Each run is a fresh subprocess (bicubic x4, default tiling), so ``ru_maxrss`` is that run's own peak.
Targets (issue 2): ratio <= 1.3 and the large run under 2 GB.

    python benchmarks/memory.py [--sizes 2048 16384] [--workdir /tmp/geosr-mem]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

CHILD = r"""
import resource, sys, time, json
from geosr.config import EnhanceConfig
from geosr.scene import enhance_scene
t = time.perf_counter()
r = enhance_scene(sys.argv[1], sys.argv[2], EnhanceConfig(model="bicubic", scale=4, overwrite=True), )
print(json.dumps({"seconds": time.perf_counter() - t, "tiles": r.tiles,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthetic_scene(path: Path, size: int, block: int = 1024) -> Path:
    """A size x size u8 RGB GeoTIFF with texture everywhere (so compression and models see real work)."""
    if path.exists():
        return path
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32632",
                   transform=Affine(0.5, 0, 400000, 0, -0.5, 5300000), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", bigtiff="if_safer")
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, block):
            for c in range(0, size, block):
                h, w = min(block, size - r), min(block, size - c)
                yy, xx = np.mgrid[r:r + h, c:c + w]
                rng = np.random.default_rng(r * size + c)
                base = 128 + 60 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
                tile = np.stack([base + rng.normal(0, 12, (h, w)) + 10 * k for k in range(3)])
                dst.write(np.clip(tile, 0, 255).astype(np.uint8), window=Window(c, r, w, h))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/geosr-mem"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic inputs and outputs")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for size in args.sizes:
        src = synthetic_scene(args.workdir / f"synthetic_{size}.tif", size)
        out = args.workdir / f"synthetic_{size}_x4.tif"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return 1
        results[size] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[size]["output_gb"] = out.stat().st_size / 1e9
        print(f"{size}²: peak RSS {results[size]['peak_rss_mb']:.0f} MB, {results[size]['seconds']:.0f} s, "
              f"{results[size]['tiles']} tiles, output {results[size]['output_gb']:.2f} GB", flush=True)
        if not args.keep:
            out.unlink()
    if len(args.sizes) >= 2:
        small, large = results[min(args.sizes)], results[max(args.sizes)]
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        print(f"ratio {max(args.sizes)}²/{min(args.sizes)}²: {ratio:.3f} (target <= 1.3); "
              f"large peak {large['peak_rss_mb']:.0f} MB (target < 2048)")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
