"""Fine-tuning a third-party expert on aerial imagery: the difference from its registry weights is what is kept.

RRDN-GAN (idealo, DIV2K) was never shown noise or JPEG: on damaged aerial inputs it sharpens the blocks
(``shared/BENCHMARK.md``: LPIPS 0.40 on the ``real`` crops). :func:`tune_expert` continues its training on HR crops
of ``data/train`` degraded as the stage-1 pairs are (:func:`geosr.training.stage1.sample_degradation`, in the mix
``p_clean`` / ``p_light``), for L1 + ``lpips_weight`` · LPIPS (+ ``ssim_weight`` · (1 − SSIM-Y), + ``gan_weight`` ·
the GAN loss of :mod:`geosr.training.adversarial`'s patch discriminator), and writes the tuned tensors *minus* the
registry's, in half precision, as a safetensors file. Training starts from the registry's weights, or from an
earlier tuned network (``start``); either way the file holds the difference from the registry's weights. That file
is useless without the registry package, which is how third-party weights stay out of the repository;
:class:`geosr.models.networks.TunedSR` adds it back at load time, after checking it was computed against the same
base tensors.

Example::

    from geosr.training.expert import ExpertConfig, tune_expert
    tune_expert("runs/rrdn-aerial", ExpertConfig())  # -> runs/rrdn-aerial/delta.safetensors
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DELTA = "delta.safetensors"


@dataclass
class ExpertConfig:
    data: str = "../shared/data/train"
    base: str = "rrdn-gan"  # a registry model whose network is a torch module (TorchSR)
    steps: int = 500
    batch: int = 8
    crop: int = 128  # HR px
    pool: int = 1500  # HR crops drawn once; every step degrades a batch of them afresh
    holdout: int = 32  # further crops, degraded once, never trained on: their L1 / LPIPS are logged
    log_every: int = 250
    lr: float = 1e-4  # Adam, cosine down to lr / 10
    lpips_weight: float = 1.0
    ssim_weight: float = 0.0  # weight of 1 - SSIM-Y (the benchmark's, stage1.ssim_luma)
    p_clean: float = 0.3  # share of pairs that are the clean downscale alone (stage1.Stage1Config's mix)
    p_light: float = 0.5  # share with light blur / noise / JPEG; the rest are second-order
    gan_weight: float = 0.0  # > 0: + that times the non-saturating GAN loss of a patch discriminator trained alongside
    d_lr: float = 1e-4  # the discriminator's Adam learning rate (constant)
    by_source: bool = False  # True: every source folder of ``data`` gives crops equally often (data.CropSampler)
    start: str = ""  # a registry TunedSR over ``base`` (e.g. "realesrgan-aerial"): training continues from its network
    seed: int = 11


def tensors_sha256(state: dict) -> str:
    """A hash of a state dict's names and float32 values (independent of the file's metadata and key order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state[k].detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()


def _batch(arrays):
    """HWC uint8 arrays -> a (B, 3, H, W) float32 batch in [0, 1]."""
    import torch

    return torch.from_numpy(np.stack([np.moveaxis(a, -1, 0) for a in arrays])).float() / 255.0


def tune_expert(out: str | Path, cfg: ExpertConfig, progress=None) -> Path:
    """Fine-tune ``cfg.base`` on ``cfg.data``; writes ``out/delta.safetensors`` and ``out/train_log.jsonl``."""
    import importlib

    import torch
    from safetensors.torch import save_file

    from ..config import weights_dir
    from ..errors import ConfigError, WeightsError
    from ..models import get_model
    from ..models.networks import TorchSR
    from ..scoring.lpips import FILENAME, LPIPS
    from .data import CropSampler
    from .stage1 import Stage1Config, sample_degradation, ssim_luma

    base = get_model(cfg.base)
    if not isinstance(base, TorchSR):
        raise ConfigError(f"ExpertConfig.base={cfg.base!r}: only a converted torch network (TorchSR) can be fine-tuned")
    if not base.weights_present():
        raise WeightsError(f"{cfg.base}: weights not found at {base.path}; run 'geosr weights fetch'")
    net = importlib.import_module(base.module).load(base.path)  # a private copy: the shared one stays frozen
    base_state = {k: v.clone() for k, v in net.state_dict().items()}
    if cfg.start:
        from ..models.networks import TunedSR

        start = get_model(cfg.start)
        if not isinstance(start, TunedSR) or start.path != base.path:
            raise ConfigError(f"ExpertConfig.start={cfg.start!r}: not a network tuned from {cfg.base!r}")
        start._check_weights()
        net = start._load("cpu")  # its own copy: base + interpolation x its difference, written back in the end
    net.requires_grad_(True).train()
    lpips = LPIPS.from_file(weights_dir() / FILENAME)
    degradations = Stage1Config(scale=4, p_clean=cfg.p_clean, p_light=cfg.p_light)

    sampler = CropSampler(cfg.data, crop=cfg.crop, seed=cfg.seed, by_source=cfg.by_source)
    crops = [sampler.sample_uint8() for _ in range(cfg.pool + cfg.holdout)]
    pool, held_hr = crops[:cfg.pool], crops[cfg.pool:]
    rng = np.random.default_rng(cfg.seed + 1)
    held_lr = [sample_degradation(h, degradations, rng)[0] for h in held_hr]
    held = (_batch(held_lr), _batch(held_hr)) if held_hr else None

    def evaluate() -> dict:
        if held is None:
            return {}
        net.eval()
        with torch.no_grad():
            sr = torch.cat([net(held[0][i:i + 8]) for i in range(0, len(held_hr), 8)]).clamp(0, 1)
            result = {"holdout_l1": float((sr - held[1]).abs().mean()),
                      "holdout_lpips": float(lpips(sr * 2 - 1, held[1] * 2 - 1).mean()),
                      "holdout_ssim_y": float(ssim_luma(sr, held[1]))}
        net.train()
        return result

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.1)
    if cfg.gan_weight:
        from .adversarial import discriminator_loss, generator_loss, patch_discriminator

        torch.manual_seed(cfg.seed)
        disc = patch_discriminator().train()
        d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr, betas=(0.9, 0.99))
    with open(folder / "train_log.jsonl", "w") as logfile:
        logfile.write(json.dumps({"step": 0, **evaluate()}) + "\n")
        for step in range(1, cfg.steps + 1):
            hrs, lrs = [], []
            for i in rng.integers(0, len(pool), cfg.batch):
                hr = np.rot90(pool[i], int(rng.integers(4)))
                if rng.random() < 0.5:
                    hr = hr[:, ::-1]
                hr = np.ascontiguousarray(hr)
                hrs.append(hr)
                lrs.append(sample_degradation(hr, degradations, rng)[0])
            hr, lr = _batch(hrs), _batch(lrs)
            sr = net(lr)
            l1 = (sr - hr).abs().mean()
            lp = lpips(sr.clamp(-0.1, 1.1) * 2 - 1, hr * 2 - 1).mean()
            loss = l1 + cfg.lpips_weight * lp
            if cfg.ssim_weight:
                loss = loss + cfg.ssim_weight * (1 - ssim_luma(sr, hr))
            extra = {}
            if cfg.gan_weight:
                disc.requires_grad_(False)
                g_adv = generator_loss(disc(sr))
                loss = loss + cfg.gan_weight * g_adv
                extra["g_adv"] = float(g_adv.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if cfg.gan_weight:
                disc.requires_grad_(True)
                d_loss = discriminator_loss(disc(hr), disc(sr.detach()))
                d_opt.zero_grad()
                d_loss.backward()
                d_opt.step()
                extra["d_loss"] = float(d_loss.detach())
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = {"step": step, "l1": float(l1.detach()), "lpips": float(lp.detach()), **extra, **evaluate()}
                logfile.write(json.dumps(entry) + "\n")
                logfile.flush()
                log.info("expert step %d/%d %s", step, cfg.steps, entry)
            if progress:
                progress(step, cfg.steps)

    tuned = net.state_dict()
    # half precision: the difference is small next to the weights, and the file half the size
    delta = {k: (tuned[k].detach() - base_state[k]).half().contiguous() for k in base_state}
    meta = {"base": cfg.base, "base_file": base.filename, "base_tensors_sha256": tensors_sha256(base_state),
            "trained_steps": str(cfg.steps), "config": json.dumps(asdict(cfg)), "converter": "geosr.training.expert"}
    path = folder / DELTA
    tmp = path.with_suffix(".part")
    save_file(delta, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def quantize_delta(src: str | Path, dst: str | Path) -> Path:
    """A difference written by :func:`tune_expert` -> the same in int8, one symmetric scale per tensor (half the size
    of float16; the scales travel in the metadata as ``int8_scales``, which
    :class:`geosr.models.networks.TunedSR` reads)."""
    import torch
    from safetensors.torch import load_file, save_file

    from ..models.sources import read_provenance

    meta = read_provenance(Path(src))
    quantized, scales = {}, {}
    for k, v in load_file(str(src)).items():
        v = v.float()
        scale = float(v.abs().max()) / 127 or 1.0
        quantized[k] = torch.round(v / scale).clamp(-127, 127).to(torch.int8).contiguous()
        scales[k] = scale
    path = Path(dst)
    tmp = path.with_suffix(".part")
    save_file(quantized, str(tmp), metadata={**meta, "int8_scales": json.dumps(scales)})
    tmp.replace(path)
    return path
