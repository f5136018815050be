"""Roads and buildings of the default model's output vs Real-ESRGAN's (and bicubic's), measured with `geosr score`.

Issue 6: "In geosr score, the roads and buildings of the default's output must agree with the HR reference at least
as well as Real-ESRGAN's do." For each case an HR crop is cut from a validation scene and converted to 8 bit as in
shared/BENCHMARK.md (first 3 bands, 1-99 percentile stretch over pixels > 0 unless already 8-bit, a single band
repeated to 3), written georeferenced (the window's transform); the LR input is its x4 degradation (``clean``:
antialiased PIL bicubic; ``real``: blur, bicubic, noise, JPEG 70, as ``geosr.bench.degrade``) written with the
transform scaled x4. Each method runs through the CLI (``geosr enhance LR -o SR --model M``) and each output is
scored through the CLI (``geosr score SR --lr LR --reference HR [--roads V] --no-nr --json J``): roads are compared
with APLS against the road vectors where given, else against the same road heuristic on the HR reference;
buildings against the building heuristic on the HR reference (no building vectors overlap any scene). Method
``hr`` scores the HR crop itself: how far the heuristics get on the truth (vs vectors; against the HR-derived
structures it agrees perfectly by construction).

    .venv/bin/python benchmarks/structure_compare.py --json benchmarks/results/structure_compare.json
    .venv/bin/python benchmarks/structure_compare.py --methods hr --degradations clean --append \
        --json benchmarks/results/structure_compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from geosr.bench import degrade, to_8bit
from geosr.config import data_dir

SCALE = 4
# name -> (scene, (row, col, height, width), roads vectors or None)
CASES = {
    "vegas_1200": ("vegas_img0_0p3m_rgba.tif", (0, 0, 1200, 1200), "vegas_img0_roads.geojson"),
    "zurich_872x600": ("zurich_0p5m_rgb.tif", (0, 0, 600, 872), None),
    "rotterdam_pan_600": ("rotterdam_pan_0p5m.tif", (0, 0, 600, 600), None),
    # vegas_1200 with roads against the heuristic's graph on the HR crop, as for the other scenes, instead of the
    # centrelines (last, so the other cases keep their degradation seeds; its own seed makes its `real` LR differ)
    "vegas_1200_hr_roads": ("vegas_img0_0p3m_rgba.tif", (0, 0, 1200, 1200), None),
}
METHODS = ("aerial-x4", "realesrgan-x4plus", "bicubic")  # and "hr": score the HR crop itself (the ceiling)


def write_tif(path: Path, rgb: np.ndarray, crs, transform) -> None:
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=rgb.shape[1], height=rgb.shape[0], count=3, dtype="uint8",
                       crs=crs, transform=transform) as dst:
        dst.write(np.moveaxis(rgb, -1, 0))


def make_inputs(root: Path, work: Path, name: str, index: int, kinds: list[str]) -> tuple[Path, dict[str, Path]]:
    import rasterio
    from rasterio.windows import Window

    scene, (r, c, h, w), _ = CASES[name]
    with rasterio.open(root / "scenes" / scene) as src:
        window = Window(c, r, w, h)
        hr = to_8bit(src.read(window=window))
        crs, transform = src.crs, src.window_transform(window)
    hr_path = work / f"{name}_hr.tif"
    write_tif(hr_path, hr, crs, transform)
    lrs = {}
    for kind in kinds:
        lrs[kind] = work / f"{name}_{kind}_lr.tif"
        write_tif(lrs[kind], degrade(hr, kind, index), crs, transform * transform.scale(SCALE))
    return hr_path, lrs


def run(cmd: list[str], log: list) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    log.append({"cmd": " ".join(cmd), "seconds": round(seconds, 1)})
    return seconds


def summary(report: dict) -> dict:
    fr, rd, bd, sem = report["full_reference"], report["roads"], report["buildings"], report["semantic"]
    return {"psnr_y": fr["psnr_y"], "ssim_y": fr["ssim_y"], "lpips": fr["lpips"],
            "lrc_db": report["faithfulness"]["lr_consistency_db"],
            "roads_against": rd["against"], "apls": rd["apls"], "apls_ref_to_out": rd["ref_to_prop"],
            "apls_out_to_ref": rd["prop_to_ref"], "roads_note": rd["note"],
            "road_len_ref_m": rd["reference_graph"]["length_m"], "road_len_out_m": rd["output_graph"]["length_m"],
            "buildings_against": bd["against"], "ref_buildings": bd["reference_buildings"],
            "out_buildings": bd["output_buildings"], "matched": bd["matched"], "recall": bd["recall"],
            "precision": bd["precision"], "f1": bd.get("f1"), "angle_err_median_abs_deg": bd["angle_error_median_abs_deg"],
            "dominant_shift_deg": bd["dominant_shift_deg"], "orientation_hist_intersection": bd["histogram_intersection"],
            "semantic_miou": sem["mean_iou"], "semantic_pixel_agreement": sem["pixel_agreement"]}


def fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table(rows: list[dict]) -> str:
    cols = [("case", "case", None), ("deg", "degradation", None), ("method", "method", None),
            ("PSNR-Y", "psnr_y", 2), ("LPIPS", "lpips", 4), ("LRC", "lrc_db", 2), ("APLS", "apls", 3),
            ("bld ref/out/match", None, None), ("bld recall", "recall", 3), ("bld prec", "precision", 3), ("bld F1", "f1", 3),
            ("ang err med", "angle_err_median_abs_deg", 1), ("orient hist ∩", "orientation_hist_intersection", 3),
            ("sem mIoU", "semantic_miou", 3), ("s", "seconds", 1)]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, key, nd in cols:
            if key is None:
                cells.append(f"{r['ref_buildings']}/{r['out_buildings']}/{r['matched']}")
            else:
                cells.append(fmt(r.get(key), nd) if nd is not None else str(r.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(args, rows: list[dict], commands: list[dict]) -> None:
    if not args.json:
        return
    names = {row["case"] for row in rows} | set(args.cases.split(","))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "issue": 6, "protocol": "HR crop -> 8 bit (BENCHMARK.md) -> x4 LR (clean / real) -> geosr enhance -> "
        "geosr score --reference HR --no-nr",
        "cases": {k: {"scene": v[0], "row_col_h_w": v[1], "roads": v[2]} for k, v in CASES.items() if k in names},
        "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores (shared)",
        "rows": rows, "commands": commands}, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--degradations", default="clean,real")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("out/structure_compare"), help="rasters and score JSONs")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--append", action="store_true", help="keep the rows already in --json; rows measured now replace the same case, degradation and method")
    args = p.parse_args(argv)

    root = Path(data_dir())
    args.work.mkdir(parents=True, exist_ok=True)
    geosr = [sys.executable, "-m", "geosr"]
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    rows, commands = [], []
    if args.append and args.json and args.json.is_file():  # add rows to an earlier run's file
        earlier = json.loads(args.json.read_text())
        rows, commands = earlier["rows"], earlier["commands"]
    kinds, names = args.degradations.split(","), args.cases.split(",")
    inputs = {name: make_inputs(root, args.work, name, list(CASES).index(name), kinds) for name in names}
    for kind in kinds:  # every case clean first, then real
        for name in names:
            hr, lrs = inputs[name]
            roads = CASES[name][2]
            for method in args.methods.split(","):
                stem = args.work / f"{name}_{kind}_{method}"
                sr, js = stem.with_suffix(".tif"), Path(f"{stem}_score.json")
                if method == "hr":  # the HR crop itself: what the heuristics reach on the truth (the ceiling)
                    sr, seconds = hr, 0.0
                else:
                    seconds = run([*geosr, "enhance", str(lrs[kind]), "-o", str(sr), "--model", method, *threads,
                                   "--overwrite", "-q"], commands)
                run([*geosr, "score", str(sr), "--lr", str(lrs[kind]), "--reference", str(hr),
                     *(["--roads", str(root / "vectors" / roads)] if roads else []), "--no-nr", "--json", str(js),
                     "--overwrite", "-q"], commands)
                row = {"case": name, "degradation": kind, "method": method, "seconds": seconds,
                       **summary(json.loads(js.read_text()))}
                rows = [r for r in rows if (r["case"], r["degradation"], r["method"]) != (name, kind, method)]
                rows.append(row)  # replaces the same case's row of an --append'ed earlier run
                print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
                save(args, rows, commands)  # after every row, so an interrupted run keeps what it measured
    print(table(rows))
    save(args, rows, commands)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
