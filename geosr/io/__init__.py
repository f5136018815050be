"""Reading scenes lazily and writing enhanced ones."""

from .read import BandScaling, Scene, open_scene
from .write import BlockWriter, atomic_output, check_output_path

__all__ = ["BandScaling", "Scene", "open_scene", "BlockWriter", "atomic_output", "check_output_path"]
