"""Modality ablation of one MMSR checkpoint on BENCHMARK.md's crops: LR only, +text, +edges, +segmentation, all.

Each variant runs the same checkpoint with the other conditions replaced by their null inputs (``--drop``: null
modality tokens, the caption masked out, as training's condition drops do), side by side in one run, optionally
with the anchors:

    .venv/bin/python benchmarks/modality_ablation.py runs/mmsr_prior/final --steps 1 --anchors \\
        --json benchmarks/results/modality_ablation.json

``--guidance 2,10,14`` adds the guidance ablation (every mode of ``guidance_ablation.py`` at each w, all
conditions) to the same run: one process, so a checkpoint with a stage-1 prior runs the prior once per tile
(``MMSRBundle`` caches it) instead of once per variant.

Height is not in the list: checkpoints trained on ../shared/data/train have no depth tokenizer (no heights there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guidance_ablation import MODES  # noqa: E402
from mmsr_compare import run_variants  # noqa: E402

from geosr.bench import DEFAULT_METHODS, SCALE  # noqa: E402
from geosr.config import EnhanceConfig  # noqa: E402

CONDITIONS = ("text", "edges", "segmentation", "depth")
VARIANTS = {"LR only": (), "+text": ("text",), "+edges": ("edges",), "+segmentation": ("segmentation",),
            "all": ("text", "edges", "segmentation")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="an MMSR checkpoint folder")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--degradations", default="clean,real")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--anchors", action="store_true", help="also run bicubic, RRDN-GAN and Real-ESRGAN")
    p.add_argument("--only", default=None, help="comma list of variant names to run (default: all)")
    p.add_argument("--guidance", default=None, help="comma list of w: also run every guidance mode at each")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    variants = {m: EnhanceConfig(model=m, scale=SCALE, threads=args.threads) for m in DEFAULT_METHODS} \
        if args.anchors else {}
    chosen = args.only.split(",") if args.only else list(VARIANTS)
    for name in chosen:
        keep = VARIANTS[name]
        drop = ",".join(c for c in CONDITIONS if c not in keep) or None
        variants[f"mmsr {name}"] = EnhanceConfig(model="mmsr", scale=SCALE, checkpoint=args.checkpoint,
                                                 steps=args.steps, drop=drop, threads=args.threads)
    for w in (float(v) for v in (args.guidance.split(",") if args.guidance else [])):
        for mode in MODES:
            variants[f"mmsr all {mode} w={w:g}"] = EnhanceConfig(model="mmsr", scale=SCALE, checkpoint=args.checkpoint,
                                                                 steps=args.steps, guidance=w, guidance_mode=mode,
                                                                 threads=args.threads)
    run_variants(variants, args.degradations, args.json, checkpoint=args.checkpoint, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
