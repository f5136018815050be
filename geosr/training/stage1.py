"""Training the stage-1 fusion network (:class:`geosr.models.fusion.FusionNet`) on ``data/train``.

Two steps, both seeded and resumable by file:

1. :func:`make_pairs` cuts HR crops from the training corpus, degrades each with :func:`sample_degradation` and
   runs the frozen experts (RRDN-GAN, Real-ESRGAN x4plus) on the LR once. The expert outputs are the expensive
   part on a CPU, so they are stored (``pairs/NNNNN.npz``) and reused for every epoch.
2. :func:`train_fusion` fits the fusion network on the stored pairs with L1 + LPIPS (AlexNet, v0.1) and saves
   safetensors with its settings and the training record in the metadata.

The degradations are a mixture: the benchmark's ``clean`` downscale, a one-round "light" family around what
aerial and satellite products carry (mild optical blur, sensor noise of a few DN, JPEG at 50-95), and the
second-order Real-ESRGAN-style pipeline of :mod:`geosr.training.degrade` for heavier damage. The validation
scenes are never read (:func:`geosr.training.data.find_images` refuses them).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Stage1Config:
    data: str = "../shared/data/train"
    pairs: int = 320  # stored (LR, experts, HR) pairs
    crop: int = 192  # HR px (LR = crop / scale)
    scale: int = 4  # the fusion network's factor; its candidates are the experts' outputs at it
    p_clean: float = 0.3
    p_light: float = 0.5  # else second-order (geosr.training.degrade)
    light_blur: tuple[float, float] = (0.3, 1.6)  # Gaussian sigma, HR px (PIL GaussianBlur radius)
    light_noise: tuple[float, float] = (0.5, 6.0)  # Gaussian sigma, 8-bit units
    light_jpeg: tuple[int, int] = (50, 95)
    p_light_jpeg: float = 0.8
    steps: int = 1500
    batch: int = 8
    train_crop: int = 128  # HR px of the random sub-crops of the stored pairs that a step trains on
    lr: float = 5e-4
    lpips_weight: float = 0.5
    ssim_weight: float = 0.0  # weight of 1 - SSIM of the luma (the benchmark's SSIM-Y: 7x7 window, BT.601)
    # the SSIM-Y weight on pairs degraded by the clean downscale alone (the network sees the LR, so it can tell them
    # apart); None: ssim_weight on every pair
    ssim_weight_clean: float | None = None
    damaged_only: bool = False  # train on the pairs with damage only (a network that never sees clean input)
    # weight of the LR-consistency term: the L1 between the output downscaled as the benchmark's LRC does it (PIL's
    # antialiased bicubic) and the LR it was given, away from the crop's border. The network then learns to agree
    # with its input in the way that costs it least, instead of leaving all of it to the projection after it
    lrc_weight: float = 0.0
    features: int = 64
    blocks: int = 6
    residual: bool = True  # False: the network only mixes the candidates (no correction of its own)
    augment: bool = True  # a random flip and 90-degree turn per step (the experts are close to equivariant)
    holdout: int = 0  # the last N pairs are not trained on; their L1 / LPIPS are logged every `snapshot` steps
    snapshot: int = 0  # > 0: also save fusion-STEP.safetensors every that many steps
    seed: int = 0
    # the registry models whose x4 outputs are the candidates (stored with each pair; missing ones are added)
    experts: tuple[str, ...] = ("rrdn-gan", "realesrgan-x4plus", "rrdn-aerial")


def _pil_resize(a: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))


def sample_degradation(hr: np.ndarray, cfg: Stage1Config, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """HR ``(H, W, 3)`` uint8 -> (LR ``(H/s, W/s, 3)`` uint8, kind), s = ``cfg.scale``."""
    from PIL import Image, ImageFilter

    size = hr.shape[0] // cfg.scale
    u = rng.random()
    if u < cfg.p_clean:
        return _pil_resize(hr, size), "clean"
    if u < cfg.p_clean + cfg.p_light:
        sigma = rng.uniform(*cfg.light_blur)
        blurred = np.asarray(Image.fromarray(hr).filter(ImageFilter.GaussianBlur(radius=float(sigma))))
        lr = _pil_resize(blurred, size).astype(np.float64)
        noise_sigma = rng.uniform(*cfg.light_noise)
        shape = lr.shape[:2] + (1,) if rng.random() < 0.3 else lr.shape
        lr = np.clip(np.round(lr + rng.normal(0.0, noise_sigma, shape)), 0, 255).astype(np.uint8)
        if rng.random() < cfg.p_light_jpeg:
            buf = io.BytesIO()
            Image.fromarray(lr).save(buf, format="JPEG", quality=int(rng.integers(cfg.light_jpeg[0],
                                                                                 cfg.light_jpeg[1] + 1)))
            lr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        return lr, "light"
    import torch

    from .degrade import DegradationConfig, degrade, to_uint8

    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(hr, -1, 0), dtype=np.float32) / 255.0)
    out = degrade(t, scale=cfg.scale, config=DegradationConfig(p_clean=0.0), rng=rng)
    return to_uint8(out), "second-order"


def make_pairs(out: str | Path, cfg: Stage1Config, progress=None) -> Path:
    """Write ``cfg.pairs`` training pairs to ``out/pairs``; pairs already there are kept (resumable), and the
    outputs of experts they lack are added to them."""
    from ..errors import ConfigError
    from ..models import get_model
    from ..models.fusion import candidate
    from .data import CropSampler

    folder = Path(out) / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    experts = {name: get_model(name) for name in cfg.experts}
    for m in experts.values():
        m.prepare()
    sampler = CropSampler(cfg.data, crop=cfg.crop, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    for i in range(cfg.pairs):
        hr = sampler.sample_uint8()  # drawn even when the pair exists, so the sequence does not depend on resumes
        lr, kind = sample_degradation(hr, cfg, rng)
        path = folder / f"{i:05d}.npz"
        stored = {}
        if path.exists():
            z = np.load(path)
            hr, lr, kind = z["hr"], z["lr"], str(z["kind"])
            if hr.shape[0] != lr.shape[0] * cfg.scale:
                raise ConfigError(f"{path} holds a x{hr.shape[0] // lr.shape[0]} pair, not x{cfg.scale}: use "
                                  "another folder for each scale")
            stored = dict(zip(_expert_names(z), z["experts"]))
        missing = [name for name in cfg.experts if name not in stored]
        if missing:
            x = np.moveaxis(lr, -1, 0).astype(np.float32) / 255.0
            for name in missing:
                stored[name] = np.round(candidate(experts[name], x, cfg.scale) * 255.0).astype(np.uint8)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, hr=hr, lr=lr, experts=np.stack(list(stored.values())), expert_names=np.array(list(stored)),
                     kind=kind)
            tmp.rename(path)
        if progress:
            progress(i + 1, cfg.pairs)
    return folder


def _expert_names(z) -> list[str]:
    """The experts a stored pair holds, in order (pairs written before the names were stored hold the first two)."""
    from ..models.fusion import LEGACY_EXPERTS

    return [str(n) for n in z["expert_names"]] if "expert_names" in z.files else list(LEGACY_EXPERTS)


def pair_experts(z, names) -> np.ndarray:
    """The named experts' outputs of a stored pair, ``(3·len(names), H, W)`` uint8, in the order of ``names``."""
    from ..errors import ConfigError

    stored = _expert_names(z)
    missing = [n for n in names if n not in stored]
    if missing:
        raise ConfigError(f"stored pair lacks the outputs of {missing}: run make_pairs with these experts first")
    return np.concatenate([z["experts"][stored.index(n)] for n in names])


def _load_pairs(folder: Path, experts):
    import torch

    hr, lr, ex, clean = [], [], [], []
    for p in sorted(folder.glob("[0-9]*[0-9].npz")):  # not the .tmp.npz of an interrupted pair
        z = np.load(p)
        hr.append(np.moveaxis(z["hr"], -1, 0))
        lr.append(np.moveaxis(z["lr"], -1, 0))
        ex.append(pair_experts(z, experts))
        clean.append(str(z["kind"]) == "clean")
    f = lambda a: torch.from_numpy(np.stack(a)).float() / 255.0  # noqa: E731
    return f(hr), f(lr), f(ex), torch.tensor(clean)


def train_fusion(out: str | Path, cfg: Stage1Config, progress=None, init: str | Path | None = None) -> Path:
    """Fit the fusion network on ``out/pairs``; writes ``out/fusion.safetensors`` and ``out/train_log.jsonl``.

    ``init``: start from these weights (a file written by this function) and add ``cfg.steps`` steps to its
    record; the training log is appended to."""
    import torch

    from ..config import weights_dir
    from ..models.fusion import FusionNet
    from ..scoring.lpips import FILENAME, LPIPS

    out = Path(out)
    torch.manual_seed(cfg.seed)
    hr, lr, ex, clean = _load_pairs(out / "pairs", cfg.experts)
    if cfg.damaged_only:
        keep = ~clean
        hr, lr, ex, clean = hr[keep], lr[keep], ex[keep], clean[keep]
    if not 0 <= cfg.holdout < hr.shape[0]:
        from ..errors import ConfigError

        raise ConfigError(f"holdout={cfg.holdout}: must leave pairs to train on ({hr.shape[0]} in {out / 'pairs'})")
    if cfg.holdout:
        held = (hr[-cfg.holdout:], lr[-cfg.holdout:], ex[-cfg.holdout:])
        hr, lr, ex, clean = hr[:-cfg.holdout], lr[:-cfg.holdout], ex[:-cfg.holdout], clean[:-cfg.holdout]
    net = FusionNet(features=cfg.features, blocks=cfg.blocks, residual=cfg.residual, experts=cfg.experts,
                    scale=cfg.scale)
    done = 0
    if init is not None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(init)))
        with safe_open(str(init), framework="pt") as f:
            done = int((f.metadata() or {}).get("trained_steps", "0"))
    lpips = LPIPS.from_file(weights_dir() / FILENAME) if cfg.lpips_weight > 0 else None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(cfg.seed)
    n, crop, s = hr.shape[0], cfg.train_crop, cfg.scale
    t0 = time.perf_counter()
    log_path = (out / "train_log.jsonl").open("a" if init is not None else "w")
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        oy, ox = (torch.randint(0, (hr.shape[-1] - crop) // s + 1, (2,), generator=g) * s).tolist()
        h = hr[idx, :, oy:oy + crop, ox:ox + crop]
        e = ex[idx, :, oy:oy + crop, ox:ox + crop]
        low = lr[idx, :, oy // s:(oy + crop) // s, ox // s:(ox + crop) // s]
        if cfg.augment:
            v = int(torch.randint(0, 8, (1,), generator=g))
            h, e, low = (_dihedral(a, v % 4, v >= 4) for a in (h, e, low))
        pred = net(low, e)
        l1 = (pred - h).abs().mean()
        loss = l1
        lp = torch.zeros(())
        if lpips is not None:
            lp = lpips(pred * 2 - 1, h * 2 - 1).mean()
            loss = loss + cfg.lpips_weight * lp
        if cfg.ssim_weight_clean is not None:
            w = torch.where(clean[idx], cfg.ssim_weight_clean, cfg.ssim_weight)
            loss = loss + (w * (1 - ssim_luma(pred, h, per_sample=True))).mean()
        elif cfg.ssim_weight:
            loss = loss + cfg.ssim_weight * (1 - ssim_luma(pred, h))
        if cfg.lrc_weight:
            loss = loss + cfg.lrc_weight * lr_disagreement(pred, low)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        at_snapshot = bool(cfg.snapshot) and step % cfg.snapshot == 0
        if step % 25 == 0 or step == cfg.steps or at_snapshot:
            entry = {"step": done + step, "l1": float(l1.detach()), "lpips": float(lp.detach()),
                     "seconds": time.perf_counter() - t0}
            if cfg.holdout and (at_snapshot or step == cfg.steps):
                entry["holdout_l1"], entry["holdout_lpips"] = _evaluate(net, held, lpips)
            log_path.write(json.dumps(entry) + "\n")
            log_path.flush()
            log.info("stage-1 step %d/%d  l1 %.4f  lpips %.4f", step, cfg.steps, entry["l1"], entry["lpips"])
        if at_snapshot and step < cfg.steps:
            _save(net, cfg, done + step, n, out / f"fusion-{done + step}.safetensors")
        if progress:
            progress(step, cfg.steps)
    log_path.close()
    return _save(net, cfg, done + cfg.steps, n, out / "fusion.safetensors")


def lr_disagreement(sr, lr, border: int = 2):
    """Mean absolute difference between ``sr`` ``(B, 3, H, W)`` downscaled to ``lr``'s grid as the benchmark's LRC
    does it (:func:`geosr.models.consistency.resample_matrix`, PIL's antialiased bicubic) and ``lr`` ``(B, 3, h, w)``,
    leaving out ``border`` LR px on each side (there the crop's downscale sees less than the LR's did);
    differentiable."""
    import torch

    from ..models.consistency import resample_matrix

    h, w = lr.shape[-2:]
    rh = torch.tensor(resample_matrix(sr.shape[-2], h)).to(sr)
    rw = torch.tensor(resample_matrix(sr.shape[-1], w)).to(sr)
    down = torch.einsum("ih,bchw,jw->bcij", rh, sr, rw)
    b = min(border, (min(h, w) - 1) // 2)  # a small crop keeps its middle
    return (down - lr)[..., b:h - b, b:w - b].abs().mean()


def ssim_luma(a, b, win: int = 7, per_sample: bool = False):
    """Mean SSIM of the BT.601 luma (16-235) of two ``(B, 3, H, W)`` batches in [0, 1], differentiable, as
    ``skimage.metrics.structural_similarity`` computes it by default (uniform ``win``-px window, sample covariance,
    data range 255, the border of half a window left out): the SSIM-Y of BENCHMARK.md. ``per_sample``: ``(B,)``."""
    import torch
    import torch.nn.functional as F

    coef = torch.tensor([65.481, 128.553, 24.966], dtype=a.dtype, device=a.device).view(1, 3, 1, 1) / 255.0
    ya, yb = ((x * coef).sum(1, keepdim=True) + 16.0 / 255.0 for x in (a, b))
    mean = lambda x: F.avg_pool2d(x, win, stride=1)  # noqa: E731
    ma, mb = mean(ya), mean(yb)
    n = win * win / (win * win - 1)  # sample covariance
    va, vb, cov = n * (mean(ya * ya) - ma * ma), n * (mean(yb * yb) - mb * mb), n * (mean(ya * yb) - ma * mb)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return s.mean(dim=(1, 2, 3)) if per_sample else s.mean()


def _save(net, cfg: Stage1Config, steps: int, n: int, path: Path) -> Path:
    from safetensors.torch import save_file

    from .. import __version__

    arch = {"features": cfg.features, "blocks": cfg.blocks, "residual": cfg.residual, "experts": list(cfg.experts),
            "scale": cfg.scale}
    meta = {"config": json.dumps(asdict(cfg)), "net": json.dumps(arch), "trained_steps": str(steps),
            "pairs": str(n), "geosr_version": __version__}
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return path


def _dihedral(a, k: int, flip: bool):
    """One of the 8 flips/turns of a ``(B, C, H, W)`` tensor."""
    import torch

    a = torch.flip(a, (-1,)) if flip else a
    return torch.rot90(a, k, (-2, -1)) if k else a


def _evaluate(net, held, lpips) -> tuple[float, float]:
    """Mean L1 and LPIPS of ``net`` on held-out pairs (whole pairs, one at a time)."""
    import torch

    l1s, lps = [], []
    net.eval()
    with torch.no_grad():
        for h, low, e in zip(*held):
            pred = net(low[None], e[None])
            l1s.append(float((pred - h[None]).abs().mean()))
            if lpips is not None:
                lps.append(float(lpips(pred * 2 - 1, h[None] * 2 - 1).mean()))
    net.train()
    return float(np.mean(l1s)), float(np.mean(lps)) if lps else float("nan")


def add_priors(out: str | Path, weights: str | Path) -> int:
    """Store the trained fusion network's output next to each pair (``NNNNN.prior.npy``, float16), for training a
    diffusion residual over it (``TrainConfig.pairs``). Returns the number of pairs."""
    import torch

    from ..models.fusion import load_net

    net = load_net(weights)
    paths = sorted((Path(out) / "pairs").glob("[0-9]*[0-9].npz"))
    for p in paths:
        z = np.load(p)
        lr = torch.from_numpy(np.moveaxis(z["lr"], -1, 0).astype(np.float32) / 255.0)[None]
        ex = torch.from_numpy(pair_experts(z, net.experts).astype(np.float32) / 255.0)[None]
        with torch.inference_mode():
            prior = net(lr, ex)[0].clamp(0, 1).numpy().astype(np.float16)  # (3, H, W)
        np.save(p.with_suffix(".prior.npy"), prior)
    return len(paths)


class PairSampler:
    """Random aligned sub-crops of the stored pairs: ``sample(b)`` -> HR ``(b, 3, c, c)``, LR ``(b, 3, c/s, c/s)``
    and prior ``(b, 3, c, c)``, float32 in [0, 1]; flips and 90-degree turns. Seeded; state can be saved."""

    def __init__(self, folder: str | Path, *, crop: int, scale: int, seed: int = 0):
        from ..errors import ConfigError

        folder = Path(folder)
        folder = folder / "pairs" if (folder / "pairs").is_dir() else folder
        paths = sorted(p for p in folder.glob("[0-9]*[0-9].npz") if p.with_suffix(".prior.npy").is_file())
        if not paths:
            raise ConfigError(f"pairs: no pairs with stored priors in {folder}: run geosr.training.stage1's "
                              "make_pairs, train_fusion and add_priors first")
        hr, lr, prior = [], [], []
        for p in paths:
            z = np.load(p)
            hr.append(np.moveaxis(z["hr"], -1, 0))
            lr.append(np.moveaxis(z["lr"], -1, 0))
            prior.append(np.load(p.with_suffix(".prior.npy")))
        self.hr, self.lr, self.prior = np.stack(hr), np.stack(lr), np.stack(prior)
        if crop % scale or crop > self.hr.shape[-1]:
            raise ConfigError(f"pairs: crop {crop} must be a multiple of {scale} and at most {self.hr.shape[-1]}")
        self.crop, self.scale = crop, scale
        self.rng = np.random.default_rng([seed, 3])

    def sample(self, batch: int):
        import torch

        c, s = self.crop, self.scale
        out = []
        for _ in range(batch):
            i = int(self.rng.integers(len(self.hr)))
            oy, ox = (int(v) * s for v in self.rng.integers(0, (self.hr.shape[-1] - c) // s + 1, 2))
            h = self.hr[i, :, oy:oy + c, ox:ox + c].astype(np.float32) / 255.0
            low = self.lr[i, :, oy // s:(oy + c) // s, ox // s:(ox + c) // s].astype(np.float32) / 255.0
            pr = self.prior[i, :, oy:oy + c, ox:ox + c].astype(np.float32)
            k, flip = int(self.rng.integers(4)), bool(self.rng.random() < 0.5)
            views = []
            for a in (h, low, pr):
                a = a[:, :, ::-1] if flip else a
                views.append(np.ascontiguousarray(np.rot90(a, k, axes=(1, 2))))
            out.append(views)
        return tuple(torch.from_numpy(np.stack([v[j] for v in out])) for j in range(3))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
