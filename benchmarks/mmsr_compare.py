"""Compare MMSR checkpoints side by side on BENCHMARK.md's crops (one run, same crops, bicubic alongside).

Used to decide defaults by measurement, e.g. residual vs direct (x0) diffusion at the same training budget:

    .venv/bin/python benchmarks/mmsr_compare.py residual=runs/mmsr_small/checkpoints/step-000500 \\
        x0=runs/cmp_x0/checkpoints/step-000500 --json out/compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from geosr.bench import SCALE, format_table, run_bench
from geosr.config import EnhanceConfig


def run_variants(variants: dict[str, EnhanceConfig], degradations: str, json_path: Path | None, **extra) -> None:
    """Score every variant on the protocol's crops in one run; print the table; write JSON (+ ``extra``)."""

    def progress(done, total, message):
        print(f"\r{done}/{total} {message:<40}", end="", file=sys.stderr, flush=True)

    rows = run_bench(degradations=degradations.split(","), variants=variants, progress=progress)
    print(file=sys.stderr)
    print(format_table(rows))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({**extra, "variants": {k: v.to_dict() for k, v in variants.items()},
                                         "rows": [r.__dict__ for r in rows]}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", metavar="LABEL=DIR")
    p.add_argument("--steps", default="4", help="denoising steps; a comma list (e.g. 2,4,8) runs each")
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--guidance-mode", default="m-cfg")
    p.add_argument("--degradations", default="clean,real")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    steps_list = [int(v) for v in args.steps.split(",")]
    variants = {"bicubic": EnhanceConfig(model="bicubic", scale=SCALE)}
    for item in args.checkpoints:
        label, _, path = item.partition("=")
        if not path:
            p.error(f"{item}: give LABEL=DIR")
        for steps in steps_list:
            name = label if len(steps_list) == 1 else f"{label} steps={steps}"
            variants[name] = EnhanceConfig(model="mmsr", scale=SCALE, checkpoint=path, steps=steps,
                                           guidance=args.guidance, guidance_mode=args.guidance_mode,
                                           threads=args.threads)
    run_variants(variants, args.degradations, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
