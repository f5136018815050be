"""Training MMSR bundles: HR crops (``data``), Real-ESRGAN-style degradations (``degrade``), the loop (``loop``).

Example::

    from geosr.training import TrainConfig, train
    result = train(TrainConfig.from_yaml(Path("configs/mmsr_small.yaml").read_text()))
    result.final  # an MMSR bundle folder: MMSRBundle.load(result.final)
"""

from __future__ import annotations

from .data import CropSampler, find_images
from .degrade import DegradationConfig, degrade, degrade_batch
from .loop import DropFlags, Trainer, TrainConfig, TrainResult, draw_drop_flags, train

__all__ = [
    "CropSampler",
    "DegradationConfig",
    "DropFlags",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "degrade",
    "degrade_batch",
    "draw_drop_flags",
    "find_images",
    "train",
]
