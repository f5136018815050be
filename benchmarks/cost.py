"""CPU cost of the default's networks next to Real-ESRGAN x4plus, measured side by side in one run.

`geosr bench` times each method in a block of its own, so a machine that slows down halfway skews its ratios. Here
the methods take turns: every round runs each method once on each of BENCHMARK.md's LR crops (the ``real``
degradation unless told otherwise), and the report gives each method's median seconds per 512² output over the
rounds and its ratio to Real-ESRGAN's median.

    .venv/bin/python benchmarks/cost.py --json benchmarks/results/cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

METHODS = "realesrgan-x4plus,default,aerial-x4-jpeg,rrdn-aerial-clean,realesrgan-aerial-2v"


def main(argv=None) -> None:
    from geosr import bench
    from geosr.config import EnhanceConfig
    from geosr.models import get_model
    from geosr.scene import enhance_array

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--degradation", default="real", choices=bench.DEGRADATIONS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    methods = args.methods.split(",")
    configs = {}
    for m in methods:
        config = bench.method_config(m, EnhanceConfig(threads=args.threads))
        model = get_model(config.model)
        model.configure(config)
        model.prepare()
        configs[m] = config
    lrs = [bench.degrade(hr, args.degradation, i) for i, hr in enumerate(bench.load_crops())]
    for m in methods:  # one untimed pass: first calls pay for allocations the later ones reuse
        enhance_array(lrs[0].transpose(2, 0, 1), configs[m])
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            t0 = time.perf_counter()
            for lr in lrs:
                enhance_array(lr.transpose(2, 0, 1), configs[m])
            out_px = sum(lr.shape[0] * lr.shape[1] * bench.SCALE ** 2 for lr in lrs)
            seconds[m].append((time.perf_counter() - t0) * bench.CROP ** 2 / out_px)
    ref = statistics.median(seconds[methods[0]])
    rows = [{"method": m, "seconds_per_512": statistics.median(s), "rounds": s,
             "ratio_to_" + methods[0]: statistics.median(s) / ref} for m, s in seconds.items()]
    print(f"| method | s per 512² output (median of {args.rounds}) | × {methods[0]} |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds_per_512']:.2f} | {r['ratio_to_' + methods[0]]:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"degradation": args.degradation, "threads": args.threads, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
