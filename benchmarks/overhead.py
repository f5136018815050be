"""Pipeline overhead: end-to-end ``enhance_scene`` time / model-only time on the same tiles, in one run.

Model-only runs the model on exactly the tiles the pipeline cuts (read beforehand, so no I/O is timed);
end-to-end includes opening, statistics, reading, blending, dtype conversion, compression and the atomic rename.
Target (issue 2): <= 1.10 on the Zurich scene with Real-ESRGAN.

    python benchmarks/overhead.py [--model realesrgan-x4plus] [--scene PATH] [--repeat 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from geosr.config import EnhanceConfig, data_dir
from geosr.io.read import open_scene
from geosr.models import get_model
from geosr.scene import _read_tile, _run_model, _set_threads, band_groups, edge_mode, enhance_scene, plan


def model_only(scene_path: Path, config: EnhanceConfig) -> tuple[float, int]:
    scene = open_scene(scene_path)
    model = get_model(config.model)
    grid = plan((scene.height, scene.width), model, config)
    model.prepare()
    _set_threads(config)
    groups = band_groups(model, scene.alpha)
    tiles = [_read_tile(scene, t, edge_mode(model, config))[0] for t in grid.tiles()]
    t0 = time.perf_counter()
    for x in tiles:
        _run_model(model, x, groups, config.scale)
    return time.perf_counter() - t0, len(tiles)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="realesrgan-x4plus")
    ap.add_argument("--scene", type=Path, default=data_dir() / "scenes" / "zurich_0p5m_rgb.tif")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two measurements this many times")
    args = ap.parse_args()
    config = EnhanceConfig(model=args.model, scale=4, overwrite=True)
    get_model(args.model).prepare()  # load outside both timings
    e2e, mo, inside = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            res = enhance_scene(args.scene, Path(tmp) / "out.tif", config)
            e2e.append(time.perf_counter() - t0)
            seconds, n = model_only(args.scene, config)
            mo.append(seconds)
            inside.append(e2e[-1] / res.model_seconds)
            print(f"end-to-end {e2e[-1]:.1f} s ({res.tiles} tiles; model inside the run {res.model_seconds:.1f} s, "
                  f"ratio {inside[-1]:.3f}), model-only {mo[-1]:.1f} s ({n} tiles): ratio {e2e[-1] / mo[-1]:.3f}",
                  flush=True)
    print(f"overhead ratio, separate passes (min/min over {args.repeat}): {min(e2e) / min(mo):.3f} (target <= 1.10)")
    print(f"overhead ratio, model time inside the same run (min): {min(inside):.3f}; this one is immune to load "
          "changing between the two passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
