"""The committed mmsr at several LR-consistency strengths, side by side in one run on BENCHMARK.md's crops (the
engine's defaults otherwise; the prior's output is cached, so later strengths re-use it):

    .venv/bin/python benchmarks/mmsr_consistency.py --strengths 0.5,0.25 --json benchmarks/results/mmsr_consistency.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmsr_compare import run_variants

from geosr.bench import SCALE
from geosr.config import EnhanceConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="an MMSR checkpoint folder (default: the embedded one)")
    p.add_argument("--strengths", default="0.5,0.25")
    p.add_argument("--degradations", default="clean,real")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    variants = {f"mmsr consistency {s:g}": EnhanceConfig(model="mmsr", scale=SCALE, checkpoint=args.checkpoint,
                                                         consistency=s, threads=args.threads)
                for s in (float(v) for v in args.strengths.split(","))}
    run_variants(variants, args.degradations, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
