"""Training data: seeded random HR crops ``(3, crop, crop)`` float32 in [0, 1] from a folder of images.

Every image file below the folder (.jpg .jpeg .png .tif .tiff) is read with rasterio and converted to 8-bit
RGB exactly as the benchmark converts its scenes (:func:`geosr.bench.to_8bit`: a 1-99 percentile stretch over
pixels > 0 for non-8-bit data; the first 3 bands, or the first band repeated). A crop picks an image uniformly
(each file, not each pixel, is equally likely, so the many large Dubai tiles do not drown the other sources; with
``by_source`` each source folder, i.e. each folder directly below the data folder, is equally likely first), a
uniform position, a random flip and a random multiple of 90 degrees. Decoded images stay in an LRU cache bounded in
bytes. All randomness comes from one ``numpy.random.Generator`` whose state can be saved and restored.
Validation scenes (any folder named ``scenes``) are refused: never train on them.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
VALIDATION_FOLDER = "scenes"


def find_images(folder: str | Path) -> list[Path]:
    """Sorted image files below ``folder``; refuses validation scenes, a missing folder and an empty one."""
    root = Path(folder).expanduser().resolve()
    if VALIDATION_FOLDER in root.parts:
        raise ConfigError(f"training data {root} is (inside) a '{VALIDATION_FOLDER}' folder of validation scenes: "
                          "never train on them; use data/train")
    if not root.is_dir():
        raise ConfigError(f"training data folder {root} does not exist: set data: to a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    leaked = [p for p in files if VALIDATION_FOLDER in p.relative_to(root).parts]
    if leaked:
        raise ConfigError(f"training data {root} contains validation scenes ({leaked[0]}): point data: at a "
                          f"folder without a '{VALIDATION_FOLDER}' subfolder, e.g. data/train")
    if not files:
        raise ConfigError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in {root}: point data: at a folder of images")
    return files


def read_rgb8(path: Path) -> np.ndarray:
    """An image file -> ``(H, W, 3)`` uint8, converted as the benchmark converts scenes."""
    import rasterio

    from ..bench import to_8bit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            data = src.read(indexes=[1, 2, 3] if src.count >= 3 else [1])  # (3 or 1, H, W)
    return np.ascontiguousarray(to_8bit(data))  # (H, W, 3)


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the header alone."""
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.height, src.width


class CropSampler:
    """Seeded random HR crops from a folder.

    Example::

        sampler = CropSampler(data_dir() / "train", crop=128, seed=0)
        hr = sampler.sample(8)  # (8, 3, 128, 128) float32 in [0, 1]
    """

    def __init__(self, folder: str | Path, *, crop: int, seed: int = 0, cache_mb: float = 512.0,
                 by_source: bool = False):
        if crop < 1:
            raise ConfigError(f"crop={crop}: give the HR crop side in pixels (>= 1)")
        self.folder, self.crop, self.cache_bytes = Path(folder), int(crop), int(cache_mb * 2**20)
        self.files: list[Path] = []
        for path in find_images(folder):
            h, w = image_size(path)
            if min(h, w) < crop:
                log.info("skipping %s: %dx%d is smaller than the %d px crop", path, w, h, crop)
                continue
            self.files.append(path)
        if not self.files:
            raise ConfigError(f"every image in {self.folder} is smaller than crop={crop}: use a smaller crop")
        # the groups a crop first picks one of uniformly: every file alone, or every source folder's files
        groups: dict[str, list[Path]] = {}
        root = self.folder.expanduser().resolve()  # find_images lists resolved paths
        for path in self.files:
            rel = path.relative_to(root).parts
            groups.setdefault(rel[0] if by_source and len(rel) > 1 else str(path), []).append(path)
        self.groups = list(groups.values())
        self.rng = np.random.default_rng(seed)
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        log.info("training crops of %d px from %d images in %s%s", crop, len(self.files), self.folder,
                 f" ({len(self.groups)} sources, equally likely)" if by_source else "")

    def image(self, path: Path) -> np.ndarray:
        """Decoded ``(H, W, 3)`` uint8, through the LRU cache (the newest image is always kept)."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        img = read_rgb8(path)
        self._cache[path] = img
        self._cached_bytes += img.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return img

    def sample_uint8(self) -> np.ndarray:
        """One random crop ``(crop, crop, 3)`` uint8 with a random flip and rotation."""
        rng, c = self.rng, self.crop
        group = self.groups[int(rng.integers(len(self.groups)))]
        img = self.image(group[int(rng.integers(len(group)))] if len(group) > 1 else group[0])
        y = int(rng.integers(img.shape[0] - c + 1))
        x = int(rng.integers(img.shape[1] - c + 1))
        out = img[y:y + c, x:x + c]
        if rng.random() < 0.5:
            out = out[:, ::-1]
        return np.rot90(out, k=int(rng.integers(4)))  # (c, c, 3)

    def sample(self, batch: int) -> Tensor:
        """``batch`` random crops ``(B, 3, crop, crop)`` float32 in [0, 1] (exact multiples of 1/255)."""
        crops = np.stack([self.sample_uint8() for _ in range(batch)])  # (B, c, c, 3)
        return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)

    # -- resumable state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable state of the sampler's generator."""
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
