"""geosr: sharper satellite and aerial imagery that keeps its georeferencing and invents nothing.

``import geosr`` is cheap: no network, no torch. The entry point every interface calls is
:func:`geosr.enhance_scene`.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("enhance_scene", "enhance_array"):
        from . import scene

        return getattr(scene, name)
    raise AttributeError(f"module 'geosr' has no attribute {name!r}")


__all__ = ["__version__", "enhance_scene", "enhance_array"]
