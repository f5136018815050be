"""The MMSR diffusion model as a tiled-engine model (``--model mmsr``).

Per scene (:meth:`MMSRModel.begin_scene`): one caption, from a decimated view of the whole scene.
Per engine tile (:meth:`MMSRModel.upscale`):

1. the conditioning image is bicubic(LR), or the checkpoint's stage-1 prior's output (what it was trained with),
   made once for the whole tile (the prior is the costly part and wants context: a checkpoint with a prior gets
   the prior's engine tile and overlap by default);
2. a tile larger than the side the model was trained at (``config.tile``) is cut into sub-tiles of that side,
   overlapping and cross-faded, diffused in batches; a smaller one is reflect-padded to a side the UNet accepts;
3. per (sub-)tile, edges and segmentation are extracted from its conditioning image and tokenized (depth is
   missing: its null token), exactly as in training (:class:`~geosr.models.mmsr.bundle.MMSRBundle`); with the
   user's land cover or vectors (``--landcover``, ``--vectors``) the segmentation is theirs, put into the model's
   classes on the tile's georeferenced output grid (:mod:`geosr.conditioning.user`);
4. the pipeline samples with the run's steps, guidance and temperatures (and, with SAMSR on, segment-shared
   noise and per-class strengths from the land-cover heuristic at the output resolution); the noise is seeded
   from the run's seed and the (sub-)tile's own pixels, so a tile gives the same output whatever order tiles run
   in;
5. the padding is cut off, or the sub-tiles are blended.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from ...errors import ConfigError, WeightsError
from ...tiling import reflect_indices
from ..base import SRModel

log = logging.getLogger(__name__)

SUBTILE_BATCH = 16  # sub-tiles diffused in one pipeline call

ALIASES = {"edge": "edges", "seg": "segmentation", "landcover": "segmentation", "height": "depth", "dsm": "depth",
           "caption": "text"}


def parse_temperatures(text: str | dict | None) -> dict[str, float]:
    """``"depth=0.5,edge=2"`` (or a dict) -> ``{"depth": 0.5, "edges": 2.0}``; aliases as in :data:`ALIASES`."""
    if text is None:
        return {}
    items = text.items() if isinstance(text, dict) else (
        part.split("=", 1) if "=" in part else (part, "") for part in str(text).replace(" ", "").split(",") if part)
    out: dict[str, float] = {}
    for key, value in items:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--temperature {key}={value}: give name=number pairs like depth=0.5,edges=2") from None
        if not (np.isfinite(number) and number > 0):
            raise ConfigError(f"--temperature {key}={value}: a temperature must be > 0 (1 is neutral)")
        out[ALIASES.get(key, key)] = number
    return out


def parse_strengths(text: str | dict | None) -> dict[int, float]:
    """``"water=0.3,shadow=0.5"`` -> ``{2: 0.3, 3: 0.5}`` (class ids of the land-cover heuristic)."""
    from ...conditioning import CLASSES

    if text is None:
        return {}
    items = text.items() if isinstance(text, dict) else (
        part.split("=", 1) if "=" in part else (part, "") for part in str(text).replace(" ", "").split(",") if part)
    out: dict[int, float] = {}
    for key, value in items:
        if key not in CLASSES:
            raise ConfigError(f"--samsr-strength {key}: unknown class; classes: {', '.join(CLASSES)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not 0 < number <= 1:
            raise ConfigError(f"--samsr-strength {key}={value}: give a strength in (0, 1] (1 = plain sampling)")
        out[CLASSES.index(key)] = number
    return out


def parse_drop(text: str | list | tuple | None, known=("text", "depth", "segmentation", "edges")) -> frozenset[str]:
    """``"text,edges"`` -> the conditions to replace by their null inputs (aliases as in :data:`ALIASES`)."""
    if text is None:
        return frozenset()
    items = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    names = {ALIASES.get(k, k) for k in items if k}
    unknown = sorted(names - set(known))
    if unknown:
        raise ConfigError(f"--drop {', '.join(unknown)}: unknown condition; choose from {', '.join(known)}")
    return frozenset(names)


EMBEDDED = Path(__file__).resolve().parents[2] / "checkpoints" / "mmsr-aerial-x4"  # committed, trained here


def embedded_checkpoint() -> Path | None:
    """The checkpoint committed with geosr (``geosr/checkpoints/mmsr-aerial-x4``), if this copy has it."""
    from .bundle import INDEX

    return EMBEDDED if (EMBEDDED / INDEX).is_file() else None


def tile_seed(seed: int, x: np.ndarray) -> int:
    """A 63-bit seed from the run's seed and the tile's pixels (order-independent, reproducible)."""
    h = hashlib.blake2b(np.ascontiguousarray(x, dtype=np.float32).tobytes(), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "little") >> 1


class MMSRModel(SRModel):
    """Multimodal diffusion SR from a checkpoint written by ``geosr train`` (or a Hugging Face id)."""

    name = "mmsr"
    channels = 3
    description = "multimodal diffusion SR (MMSR): caption + segmentation + edges (+ depth)"
    reads_geodata = True
    missing_hint = "pass --checkpoint DIR (a folder written by `geosr train`) or a Hugging Face id"

    def __init__(self, *, device: str = "cpu", checkpoint: str | Path | None = None):
        self.device = device
        self.default_checkpoint = checkpoint  # a run without --checkpoint uses this; None: the embedded one
        self.checkpoint = checkpoint if checkpoint is not None else embedded_checkpoint()
        self.steps, self.guidance, self.guidance_mode = 4, 0.0, "m-cfg"
        self.temperatures: dict[str, float] = {}
        self.seed = 0
        self.samsr_noise, self.samsr_strength, self.strength = 0.0, {}, 1.0
        self.drop: frozenset[str] = frozenset()  # conditions replaced by their null inputs (ablations)
        self.negative_prompt: str | None = None
        self.caption = ""
        self.user_files: dict[str, str] = {}  # dsm / landcover / vectors paths of the run
        self.user = None  # UserConditions of the scene, when the run has user files
        self.condition_sources: dict[str, str] = {}  # modality -> where it came from (recorded in the tags)
        self._tile_grid = None
        self._bundle = None
        self._loaded_from: str | None = None

    # -- SRModel -------------------------------------------------------------------------------------------------

    @property
    def scales(self) -> tuple[int, ...]:
        """The checkpoint's scale and, for an even one, half of it (its output downscaled by 2, as aerial-x4-v1's)."""
        native = self._bundle.config.scale if self._bundle is not None else 4
        return (native // 2, native) if native % 2 == 0 and native >= 4 else (native,)

    @property
    def default_tile(self) -> int:
        """The checkpoint's recommended tile; else the prior's engine tile (the prior runs once per tile and the
        diffusion in sub-tiles inside it); else the side the model was trained at."""
        if self._bundle is None:
            return 64
        prior = self._prior_traits()
        fallback = max(prior[1], self._bundle.config.tile) if prior else self._bundle.config.tile
        return int(self.inference_defaults().get("tile", fallback))

    @property
    def edge(self) -> str:
        """With a stage-1 prior, tiles are cut at the scene edge, as the prior's own are (the sub-tiles inside are
        reflect-padded to the training side); without one, every tile is the full side the model was trained at."""
        return "cut" if self._prior_traits() else "reflect"

    def _prior_traits(self) -> tuple[int, int] | None:
        """(receptive field, default tile) of the checkpoint's stage-1 prior, or None without one."""
        if self._bundle is None or self._bundle.config.prior is None:
            return None
        from .. import get_model

        prior = get_model(self._bundle.config.prior)
        return int(prior.receptive_field), int(prior.default_tile)

    def inference_defaults(self) -> dict:
        """The loaded checkpoint's recommended run settings (``meta["inference"]``: strength, consistency,
        tile, steps); empty when it records none."""
        return dict(self._bundle.meta.get("inference", {})) if self._bundle is not None else {}

    @property
    def receptive_field(self) -> int:
        # the cross-attention makes every output pixel depend on the whole tile; the convolutions reach a few px.
        # Capped at tile / 8 so the default overlap always fits the tile the model was trained at. A stage-1 prior
        # runs on the whole engine tile: its own receptive field counts.
        own = max(1, min(6, self.default_tile // 8))
        prior = self._prior_traits()
        return max(own, prior[0]) if prior else own

    def configure(self, config) -> None:
        """Take the run's MMSR settings (checkpoint, steps, guidance, temperatures, seed) from EnhanceConfig."""
        super().configure(config)
        self.checkpoint = config.checkpoint if config.checkpoint is not None else (
            self.default_checkpoint if self.default_checkpoint is not None else embedded_checkpoint())
        self.steps = 4 if config.steps is None else config.steps
        self.guidance = config.guidance
        self.guidance_mode = config.guidance_mode
        self.temperatures = parse_temperatures(config.temperatures)
        self.seed = config.seed
        self.samsr_noise = float(config.samsr_noise)
        self.samsr_strength = parse_strengths(config.samsr_strength)
        strength = getattr(config, "strength", None)
        self.strength = 1.0 if strength is None else float(strength)
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"--strength {strength}: give a share of the schedule in (0, 1] (1 = from pure noise)")
        self.drop = parse_drop(getattr(config, "drop", None))
        self.user_files = {k: str(v) for k in ("dsm", "landcover", "vectors") if (v := getattr(config, k, None))}
        if not (np.isfinite(self.samsr_noise) and self.samsr_noise >= 0):
            raise ConfigError(f"--samsr-noise {config.samsr_noise}: give a weight >= 0 (0 = off)")
        if self.checkpoint is not None:
            self.prepare()
        if self._bundle is not None:
            # settings the checkpoint recommends (meta "inference", chosen on the benchmark when it was packaged),
            # for whatever the run leaves unset
            recommended = self.inference_defaults()
            if strength is None:
                self.strength = float(recommended.get("strength", 1.0))
            if config.steps is None:
                self.steps = int(recommended.get("steps", 4))
            if getattr(config, "consistency", None) is None:
                self.consistency = float(recommended.get("consistency", self.default_consistency))
            known = set(self._bundle.pipeline.conditioner.keys)
            unknown = sorted(set(self.temperatures) - known)
            if unknown:
                raise ConfigError(f"--temperature: unknown name {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ConfigError(f"--steps {self.steps}: give at least 1 denoising step")
        if self.guidance < 0:
            raise ConfigError(f"--guidance {self.guidance}: give w >= 0 (0 = unguided)")

    def weights_present(self) -> bool:
        return self.checkpoint is not None

    def prepare(self) -> None:
        from .bundle import MMSRBundle, resolve_checkpoint

        if self.checkpoint is None:
            raise WeightsError("model 'mmsr' needs trained weights: pass --checkpoint DIR (a folder written by "
                               "`geosr train`) or a Hugging Face id")
        key = str(self.checkpoint)
        if self._loaded_from == key:
            return
        path = resolve_checkpoint(self.checkpoint)
        self._bundle = MMSRBundle.load(path, device=self._torch_device())
        self._loaded_from = key
        log.info("loaded MMSR checkpoint %s (%s training steps)", path, self._bundle.meta.get("trained_steps", "?"))

    def provenance(self) -> dict[str, str]:
        """Where the weights come from: the bundle's own record (read from its index if not loaded yet)."""
        import json

        from .bundle import INDEX

        if self._bundle is not None and self._loaded_from == str(self.checkpoint):
            meta = self._bundle.meta
        elif self.checkpoint is not None and (Path(str(self.checkpoint)) / INDEX).is_file():
            meta = json.loads((Path(str(self.checkpoint)) / INDEX).read_text()).get("meta", {})
        else:
            return {}
        embedded = self.checkpoint is not None and Path(str(self.checkpoint)).resolve() == EMBEDDED
        return {"package": f"geosr-trained:{Path(str(self.checkpoint)).name}",
                "version": f"{meta.get('trained_steps', '?')} steps",
                "registry": "committed with geosr (trained here, see its MODEL_CARD.md)" if embedded
                else "local checkpoint",
                "member": str(self.checkpoint),
                "sha256": str(meta.get("sha256", "unrecorded")), "license": str(meta.get("license", "Apache-2.0"))}

    def _torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def begin_scene(self, overview: np.ndarray, *, gsd: float | None = None, grid=None,
                    sample: np.ndarray | None = None) -> None:
        """One caption for the whole scene from its decimated, scaled view ``(C, h, w)``; the user's files opened
        and checked against the scene's ``grid``."""
        import torch

        self.prepare()
        self.user = None
        self.condition_sources = {"edges": "image (Canny)", "segmentation": "image (heuristic)",
                                  "depth": "none (null token)"}
        if self.user_files:
            from ...conditioning.user import UserConditions
            from ...errors import ConditionError

            if grid is None:
                name = next(iter(self.user_files.values()))
                raise ConditionError(f"{name}: the scene has no CRS, so the user's data cannot be placed on it; "
                                     "georeference the scene")
            self.user = UserConditions(scene=grid, **self.user_files)
            self.condition_sources.update(self.user.sources())
            if self.user.dsm is not None and "depth" not in self._bundle.tokenizers:
                log.warning("--dsm %s is not used: checkpoint %s was trained without depth (no depth tokenizer), so "
                            "its depth null token stands in", self.user.dsm.path, self.checkpoint)
                self.condition_sources["depth"] = "none (null token; the checkpoint has no depth tokenizer)"
        rgb = np.clip(np.nan_to_num(overview[:3] if overview.shape[0] >= 3 else np.repeat(overview[:1], 3, 0)), 0, 1)
        self.caption = self._bundle.captions(torch.from_numpy(rgb[None].astype(np.float32)))[0]
        log.info("scene caption: %s", self.caption)

    def begin_tile(self, grid) -> None:
        self._tile_grid = grid

    def _user_segmentation(self, cond: np.ndarray, scale: int) -> np.ndarray:
        """The segmentation of the conditioning image ``(3, H', W')`` with the user's data laid over it."""
        from affine import Affine

        from ...conditioning import heuristic_segmentation
        from ...conditioning.base import TileContext

        heuristic = heuristic_segmentation(cond)
        if self._tile_grid is None:
            raise RuntimeError("mmsr: user data given but the engine did not say where the tile lies (begin_tile)")
        tile = TileContext(image=cond, transform=self._tile_grid.transform @ Affine.scale(1 / scale),
                           crs=self._tile_grid.crs)
        return self.user.maps(tile, heuristic).segmentation

    def upscale(self, x: np.ndarray, scale: int) -> np.ndarray:
        """One engine tile ``(3, h, w)`` -> ``(3, h*s, w*s)``.

        The conditioning image (the stage-1 prior, which is the costly part) is made once for the whole tile.
        A tile larger than the side the model was trained at (``config.tile``) is then diffused in sub-tiles of
        that side, batched, each reading its own slice of the conditioning image and cross-faded with
        :class:`~geosr.tiling.AxisPlan` weights: the model sees tiles of the geometry it was trained on, and a
        large engine tile gives the prior the context it needs.
        """
        import torch

        self.check_scale(scale)
        self.prepare()
        c, h, w = x.shape
        if c != 3:
            raise ConfigError(f"mmsr takes 3 bands (RGB), got {c}")
        native = int(self._bundle.config.scale)
        if scale != native:  # half the checkpoint's scale: its output brought down by the projection's operator
            from ..consistency import downscale

            return downscale(self.upscale(x, native), (h * scale, w * scale)).astype(np.float32)
        sub = int(self._bundle.config.tile)
        if max(h, w) <= sub:
            return self._upscale_whole(x, scale)
        bundle, device = self._bundle, self._bundle.pipeline.device
        lr = np.ascontiguousarray(np.clip(x, 0, 1), dtype=np.float32)
        cond = bundle.condition_image(torch.from_numpy(lr)[None].to(device))[0]  # (3, H, W), made once
        seg = self._segmentation(cond.cpu().numpy(), scale)
        rows, cols = (self._subtile_plan(n, sub, scale) for n in (h, w))
        H, W = h * scale, w * scale
        out = np.zeros((3, H, W), dtype=np.float64)
        jobs = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
        for k in range(0, len(jobs), SUBTILE_BATCH):
            batch = jobs[k:k + SUBTILE_BATCH]
            lrs, conds, segs, spans = [], [], [], []
            for i, j in batch:
                y0, x0 = rows.starts[i], cols.starts[j]
                ry, rx = reflect_indices(y0, y0 + sub, h), reflect_indices(x0, x0 + sub, w)
                oy = reflect_indices(y0 * scale, (y0 + sub) * scale, H)
                ox = reflect_indices(x0 * scale, (x0 + sub) * scale, W)
                lrs.append(lr[:, ry][:, :, rx])
                conds.append(cond[:, torch.from_numpy(oy)][:, :, torch.from_numpy(ox)])
                if seg is not None:
                    segs.append(seg[oy][:, ox])
                spans.append((y0 * scale, x0 * scale, rows.weights(i), cols.weights(j)))
            res = self._sample(np.stack(lrs), torch.stack(conds), None if seg is None else np.stack(segs))
            for (a, b, wr, wc), o in zip(spans, res):
                ya, yb, xa, xb = max(a, 0), min(a + len(wr), H), max(b, 0), min(b + len(wc), W)
                weight = wr[ya - a:yb - a, None] * wc[None, xa - b:xb - b]
                out[:, ya:yb, xa:xb] += o[:, ya - a:yb - a, xa - b:xb - b] * weight
        return out.astype(np.float32)

    def _segmentation(self, cond: np.ndarray, scale: int) -> np.ndarray | None:
        """``(H, W)`` classes of a conditioning image ``(3, H, W)`` for the conditions (the user's data laid over
        the heuristic) or for SAMSR (the heuristic's); None when neither is in play (the conditions then use each
        (sub-)tile's own heuristic, as in training)."""
        if self.user is not None and self.user.layers:
            return self._user_segmentation(cond, scale)
        if self.samsr_noise > 0 or self.samsr_strength:
            from ...conditioning import heuristic_segmentation

            return heuristic_segmentation(cond)
        return None

    @staticmethod
    def _subtile_plan(length: int, sub: int, scale: int):
        """Sub-tiles of side ``sub`` along one axis, overlapping by a quarter of it (a halo of an eighth, less one
        px, so each sub-tile's border pixels carry no weight, and a cross-fade ramp)."""
        from ...tiling import AxisPlan

        overlap = max(2, sub // 4)
        return AxisPlan(length=length, tile=sub, overlap=overlap, scale=scale, halo_px=max(0, overlap // 2 - 1))

    def _upscale_whole(self, x: np.ndarray, scale: int) -> np.ndarray:
        """A tile no larger than the model's training side, in one pass (padded to a side the UNet accepts)."""
        import torch

        pipe = self._bundle.pipeline
        h, w = x.shape[-2:]
        multiple = pipe.size_multiple // np.gcd(pipe.size_multiple, scale)
        ph, pw = -h % multiple, -w % multiple
        lr = np.clip(x, 0, 1)
        if ph or pw:
            lr = np.pad(lr, ((0, 0), (0, ph), (0, pw)), mode="reflect" if min(h, w) > max(ph, pw) else "edge")
        lr = np.ascontiguousarray(lr, dtype=np.float32)
        cond = self._bundle.condition_image(torch.from_numpy(lr)[None].to(pipe.device))  # (1, 3, H', W')
        seg = self._segmentation(cond[0].cpu().numpy(), scale)
        out = self._sample(lr[None], cond, None if seg is None else seg[None])[0]
        return np.ascontiguousarray(out[:, : h * scale, : w * scale], dtype=np.float32)

    def _sample(self, lr: np.ndarray, cond, seg: np.ndarray | None) -> np.ndarray:
        """Diffuse a batch: ``lr (B, 3, h, w)`` numpy, ``cond (B, 3, H, W)`` tensor (the conditioning images),
        ``seg (B, H, W)`` classes or None -> ``(B, 3, H, W)`` float32 numpy.

        ``seg`` is the user's segmentation (then it also feeds the conditions) or, without user data, the
        SAMSR segmentation. Each sample's noise is seeded from the run's seed and its own LR pixels."""
        import torch

        bundle = self._bundle
        pipe = bundle.pipeline
        device = pipe.device
        B = lr.shape[0]
        user_seg = seg if (self.user is not None and self.user.layers) else None
        codes = bundle.encode_maps(bundle.conditions(cond, segmentation=user_seg)[0])
        codes.update({m: None for m in self.drop & set(codes)})  # dropped: the null token stands in
        generators = [torch.Generator(device="cpu").manual_seed(tile_seed(self.seed, a)) for a in lr]
        samsr = {}
        if self.samsr_noise > 0 or self.samsr_strength:  # SAMSR: segments at the output resolution
            samsr = {"segmentation": torch.from_numpy(np.asarray(seg)).to(device), "samsr_noise": self.samsr_noise,
                     "samsr_strength": self.samsr_strength or None}
        if self.strength < 1.0:  # img2img from the conditioning image, on top of any per-class strengths
            from .pipeline import strength_map

            H, W = cond.shape[-2:]
            base = (strength_map(self.samsr_strength, samsr["segmentation"]) if self.samsr_strength
                    else torch.ones((B, H, W), device=device))
            samsr["samsr_strength"] = base * self.strength
        prompt = self.caption if pipe.text_encoder is not None else None
        negative = self.negative_prompt if (self.guidance > 0 and self.guidance_mode != "cfg"
                                            and pipe.text_encoder is not None) else None
        images = pipe(torch.from_numpy(lr).to(device), modalities=codes, prompt=prompt, negative_prompt=negative,
                      num_inference_steps=self.steps, guidance_scale=self.guidance, guidance_mode=self.guidance_mode,
                      temperatures=self.temperatures or None, generator=generators if B > 1 else generators[0],
                      output_type="np", cond_image=cond, drop_text="text" in self.drop, **samsr).images
        return np.asarray(images, dtype=np.float32)
