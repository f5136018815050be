"""The quality protocol of ``shared/BENCHMARK.md``: fixed crops, two degradations, anchors in the same run.

Every method runs through :func:`geosr.enhance_array`, i.e. the same tiling path as real scenes.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import EnhanceConfig, data_dir
from .errors import ConfigError

log = logging.getLogger(__name__)

SCALE = 4
DEGRADATIONS = ("clean", "real", "noisy")  # the protocol's two, then noisy (outside it; see degrade)
CROP = 512
# (scene file, (row, col)); the index in this list seeds the noise of the `real` degradation
CROPS = (
    ("zurich_0p5m_rgb.tif", (0, 0)),
    ("zurich_0p5m_rgb.tif", (88, 363)),
    ("vegas_img0_0p3m_rgba.tif", (50, 50)),
    ("vegas_img0_0p3m_rgba.tif", (50, 750)),
    ("rotterdam_pan_0p5m.tif", (44, 44)),
)
ANCHORS = ("bicubic", "rrdn-gan", "realesrgan-x4plus")  # run as published: no LR-consistency projection
DEFAULT_METHODS = ANCHORS + ("default",)  # "default": what a plain `geosr enhance` runs, with its own settings


def method_config(name: str, base: EnhanceConfig | None = None) -> EnhanceConfig:
    """The run settings of one benchmark method: an anchor as published (``consistency=0`` and ``keep_grey=False``
    unless ``base`` sets the consistency), ``"default"`` as a plain ``geosr enhance`` runs, any other model name
    with its own defaults."""
    from dataclasses import replace

    base = base or EnhanceConfig()
    if name == "default":
        return replace(base, model=None, scale=SCALE)
    config = replace(base, model=name, scale=SCALE)
    if name in ANCHORS and base.consistency is None:
        config = replace(config, consistency=0.0, keep_grey=False)
    return config


@dataclass
class Row:
    degradation: str
    method: str
    psnr_y: float
    ssim_y: float
    lpips: float | None
    lrc: float
    seconds_per_512: float  # seconds per 512x512 output


def to_8bit(crop: np.ndarray) -> np.ndarray:
    """``(band, y, x)`` -> ``(y, x, 3)`` uint8: 1-99 percentile stretch over pixels > 0 unless already 8-bit."""
    rgb = crop[:3]
    if rgb.dtype != np.uint8:
        v = rgb.astype(np.float64)
        lo, hi = np.percentile(v[v > 0], [1, 99])
        rgb = np.clip(np.round((v - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    return np.moveaxis(rgb, 0, -1)


def load_crops(root: Path | None = None) -> list[np.ndarray]:
    import rasterio
    from rasterio.windows import Window

    root = Path(root or data_dir()) / "scenes"
    crops = []
    for name, (r, c) in CROPS:
        with rasterio.open(root / name) as src:
            crops.append(to_8bit(src.read(window=Window(c, r, CROP, CROP))))
    return crops


def _resize(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic (PIL) resize to ``size`` px square or ``(height, width)``."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))


def degrade(hr: np.ndarray, kind: str, index: int) -> np.ndarray:
    """The LR input for an HR crop (128x128 for the protocol's; any ``(H, W)`` gives ``(H/4, W/4)``): ``clean`` or
    ``real`` (blur, downscale, noise, JPEG 70); outside the protocol, ``noisy`` is ``real`` without its JPEG (damage
    that the default's choice of network, by compression, does not see)."""
    from PIL import Image

    size = (hr.shape[0] // SCALE, hr.shape[1] // SCALE)
    if kind == "clean":
        return _resize(hr, size)
    if kind not in DEGRADATIONS:
        raise ConfigError(f"unknown degradation {kind!r}")
    from PIL import ImageFilter

    # Pillow's GaussianBlur radius is the standard deviation; with it all three anchors of BENCHMARK.md reproduce
    # to <= 0.03 dB (scipy's gaussian_filter put Real-ESRGAN 0.08 dB off)
    blurred = np.asarray(Image.fromarray(hr).filter(ImageFilter.GaussianBlur(radius=1.0)))
    lr = _resize(blurred, size).astype(np.float64)
    lr = lr + np.random.default_rng(index).normal(0.0, 3.0, lr.shape)
    lr = np.clip(np.round(lr), 0, 255).astype(np.uint8)
    if kind == "noisy":
        return lr
    buf = io.BytesIO()
    Image.fromarray(lr).save(buf, format="JPEG", quality=70)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def luma(img: np.ndarray) -> np.ndarray:
    """BT.601 luminance Y in 16..235 from RGB uint8."""
    v = img.astype(np.float64)
    return 16.0 + (65.481 * v[..., 0] + 128.553 * v[..., 1] + 24.966 * v[..., 2]) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(a, b, data_range=255))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=255))


def lr_consistency(sr: np.ndarray, lr: np.ndarray) -> float:
    """PSNR (RGB) between the output downscaled to the LR's size (antialiased bicubic) and the LR input."""
    return psnr(_resize(sr, lr.shape[:2]), lr)


def run_method(method: str | EnhanceConfig, lr: np.ndarray) -> tuple[np.ndarray, float]:
    """Enhance one ``(y, x, 3)`` uint8 LR crop with a model name or a full configuration."""
    from .scene import enhance_array

    config = method if isinstance(method, EnhanceConfig) else EnhanceConfig(model=method, scale=SCALE)
    chw = np.moveaxis(lr, -1, 0)
    t0 = time.perf_counter()
    out = enhance_array(chw, config)
    return np.moveaxis(out, 0, -1), time.perf_counter() - t0


def run_bench(methods=None, degradations=("clean", "real"), *, lpips: bool = True, json_path: Path | None = None,
              progress=None, variants: dict[str, EnhanceConfig] | None = None) -> list[Row]:
    """Score ``methods`` (model names) and ``variants`` (label -> EnhanceConfig) on the protocol's crops."""
    from .models import get_model

    unknown = [k for k in degradations if k not in DEGRADATIONS]
    if unknown:
        raise ConfigError(f"unknown degradation {unknown[0]!r}: choose among {', '.join(DEGRADATIONS)}")
    configs = {m: method_config(m) for m in (methods or ([] if variants else DEFAULT_METHODS))}
    configs.update(variants or {})
    methods = list(configs)
    for config in configs.values():
        model = get_model(config.model)
        model.configure(config)
        model.prepare()  # fail early, with the fix, if weights are missing
    lpips_fn = None
    if lpips:
        from .scoring.lpips import lpips_distance

        lpips_fn = lpips_distance
    crops = load_crops()
    rows = []
    total, done = len(degradations) * len(methods) * len(crops), 0
    for kind in degradations:
        lrs = [degrade(hr, kind, i) for i, hr in enumerate(crops)]
        for method in methods:
            scores = []
            for hr, lr in zip(crops, lrs):
                sr, seconds = run_method(configs[method], lr)
                y_sr, y_hr = luma(sr), luma(hr)
                scores.append((psnr(y_hr, y_sr), ssim(y_hr, y_sr), lpips_fn(hr, sr) if lpips_fn else np.nan,
                               lr_consistency(sr, lr), seconds * (CROP * CROP) / (sr.shape[0] * sr.shape[1])))
                done += 1
                if progress:
                    progress(done, total, f"{kind} {method}")
            mean = np.mean(np.array(scores, dtype=np.float64), axis=0)
            rows.append(Row(kind, method, float(mean[0]), float(mean[1]), None if not lpips else float(mean[2]),
                            float(mean[3]), float(mean[4])))
            log.info("%s %s: %s", kind, method, rows[-1])
    if json_path is not None:
        Path(json_path).write_text(json.dumps({"protocol": "shared/BENCHMARK.md x4", "crops": CROPS,
                                               "settings": {k: c.to_dict() for k, c in configs.items()},
                                               "rows": [asdict(r) for r in rows]}, indent=2))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| degradation | method | PSNR-Y | SSIM-Y | LPIPS | LRC | s per 512² output |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lp = "-" if r.lpips is None else f"{r.lpips:.4f}"
        lines.append(f"| {r.degradation} | {r.method} | {r.psnr_y:.2f} | {r.ssim_y:.4f} | {lp} | {r.lrc:.2f} | "
                     f"{r.seconds_per_512:.1f} |")
    return "\n".join(lines)
