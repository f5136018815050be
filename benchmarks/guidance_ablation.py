"""MMSR guidance ablation (issue 3): LPIPS etc. on BENCHMARK.md's crops for w in {2, 10, 14} x {cfg, m0-cfg, m-cfg}.

The paper (MMSR, arXiv 2503.14503) finds that m-cfg, whose negative branch keeps the real modalities, degrades
least at high w. Every setting runs on the same crops, in one run, next to bicubic and the unguided model (w=0).

    .venv/bin/python benchmarks/guidance_ablation.py --checkpoint models/mmsr-small --json out/guidance.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from pathlib import Path

from mmsr_compare import run_variants

from geosr.bench import SCALE
from geosr.config import EnhanceConfig

MODES = ("cfg", "m0-cfg", "m-cfg")
WEIGHTS = (2.0, 10.0, 14.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--degradations", default="clean,real")
    p.add_argument("--weights", default=",".join(map(str, WEIGHTS)))
    p.add_argument("--modes", default=",".join(MODES), help="guidance modes to run (split a long run over processes)")
    p.add_argument("--no-baselines", action="store_true", help="leave out bicubic and w=0 (another process runs them)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    base = EnhanceConfig(model="mmsr", scale=SCALE, checkpoint=args.checkpoint, steps=args.steps, threads=args.threads)
    variants = {} if args.no_baselines else {"bicubic": EnhanceConfig(model="bicubic", scale=SCALE), "mmsr w=0": base}
    for w in (float(v) for v in args.weights.split(",")):
        for mode in args.modes.split(","):
            variants[f"mmsr {mode} w={w:g}"] = replace(base, guidance=w, guidance_mode=mode)
    run_variants(variants, args.degradations, args.json, checkpoint=args.checkpoint, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
