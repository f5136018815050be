"""The MMSR engine's tiling, side by side in one run on BENCHMARK.md's crops: the stage-1 prior once per engine
tile with the diffusion in sub-tiles inside it (the default), against engine tiles of the model's training side
(the prior run on every small tile, as before), with Real-ESRGAN for the cost ratio:

    .venv/bin/python benchmarks/mmsr_tiling.py --json benchmarks/results/mmsr_tiling.json

Each row gives PSNR-Y / SSIM-Y / LPIPS / LRC and seconds per 512² output; compare the seconds within one run only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmsr_compare import run_variants  # noqa: E402

from geosr.bench import SCALE  # noqa: E402
from geosr.config import EnhanceConfig  # noqa: E402
from geosr.models.mmsr.bundle import MMSRBundle  # noqa: E402
from geosr.models.mmsr.model import embedded_checkpoint  # noqa: E402
from geosr.tiling import default_overlap  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="an MMSR checkpoint folder (default: the embedded one)")
    p.add_argument("--degradations", default="clean,real")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    checkpoint = str(args.checkpoint or embedded_checkpoint())
    side = MMSRBundle.load(checkpoint).config.tile  # the model's training side
    small = {"tile": side, "overlap": default_overlap(max(1, min(6, side // 8)))}  # the engine's former default
    variants = {
        "realesrgan-x4plus": EnhanceConfig(model="realesrgan-x4plus", scale=SCALE, threads=args.threads),
        f"mmsr, engine tiles of {side} (prior per small tile)": EnhanceConfig(
            model="mmsr", scale=SCALE, checkpoint=checkpoint, threads=args.threads, **small),
        "mmsr, default (prior per engine tile, diffusion in sub-tiles)": EnhanceConfig(
            model="mmsr", scale=SCALE, checkpoint=checkpoint, threads=args.threads),
    }
    run_variants(variants, args.degradations, args.json, checkpoint=checkpoint, small_tiles=small)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
