"""The lazy engine streams: peak RSS of computing ``da.geosr.enhance(...)`` for a large and a small scene.

Each run is a fresh subprocess: the scene is opened with ``rioxarray.open_rasterio(path, chunks=512)``, enhanced
lazily (bicubic, default tiling) and every output chunk handed to a sink that forgets it (``dask.array.store``),
so ``ru_maxrss`` is the engine's own peak (input chunks, tiles, blending), not the size of the result. The
synthetic scenes are those of ``benchmarks/memory.py``.

    python benchmarks/lazy_memory.py [--sizes 2048 8192] [--scale 2] [--workdir /tmp/geosr-mem]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import synthetic_scene  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import dask.array as da, numpy as np, rioxarray
import geosr
t = time.perf_counter()
src = rioxarray.open_rasterio(sys.argv[1], chunks={"band": 1, "x": 512, "y": 512})
out = src.geosr.enhance(scale=int(sys.argv[2]), model="bicubic")
built = time.perf_counter() - t

class Sink:
    total = 0
    def __setitem__(self, key, value):
        Sink.total += int(value.sum(dtype=np.int64))

da.store(out.data, Sink(), lock=True)
print(json.dumps({"seconds": time.perf_counter() - t, "build_seconds": built, "tasks": len(out.data.dask),
                  "chunks": out.data.npartitions, "input_mb": src.nbytes / 1e6, "output_mb": out.nbytes / 1e6,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/geosr-mem"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for size in args.sizes:
        scene = synthetic_scene(args.workdir / f"synthetic_{size}.tif", size)
        out = subprocess.run([sys.executable, "-c", CHILD, str(scene), str(args.scale)], capture_output=True,
                             text=True, check=True)
        runs[size] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{size}² x{args.scale}: {json.dumps(runs[size])}", flush=True)
    small, large = min(runs), max(runs)
    print(f"peak RSS {large}² / {small}²: {runs[large]['peak_rss_mb'] / runs[small]['peak_rss_mb']:.2f} "
          f"(input {runs[large]['input_mb'] / runs[small]['input_mb']:.0f}x, "
          f"output {runs[large]['output_mb'] / runs[small]['output_mb']:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
