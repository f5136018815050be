"""geosr: sharper satellite and aerial imagery that keeps its georeferencing and invents nothing.

``import geosr`` is cheap: no network, no torch, no xarray. The entry point every interface calls is
:func:`geosr.enhance_scene`. The xarray accessor ``da.geosr`` (:mod:`geosr.accessor`) is registered as soon as
xarray is imported: now if it already is, else right after its import finishes (a one-shot import hook), so a
DataArray always has it and a CLI run never pays for importing xarray.
"""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("enhance_scene", "enhance_array"):
        from . import scene

        return getattr(scene, name)
    raise AttributeError(f"module 'geosr' has no attribute {name!r}")


__all__ = ["__version__", "enhance_scene", "enhance_array"]


def _register_accessor() -> None:
    from . import accessor  # noqa: F401  (its import registers da.geosr)


class _LoaderThenRegister(importlib.abc.Loader):
    """Wraps xarray's loader: executes the module, then registers the accessor."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _AfterXarrayImport.remove()
        _register_accessor()

    def __getattr__(self, name):  # everything else (resource readers, ...) is the real loader's
        return getattr(self._loader, name)


class _AfterXarrayImport(importlib.abc.MetaPathFinder):
    """Finds ``xarray`` with the other finders and wraps its loader. It stays in ``sys.meta_path`` until xarray is
    actually executed: libraries may look xarray up (``importlib.util.find_spec``) without importing it."""

    _resolving = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "xarray" or _AfterXarrayImport._resolving:
            return None
        _AfterXarrayImport._resolving = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            _AfterXarrayImport._resolving = False
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenRegister(spec.loader)
        return spec

    @staticmethod
    def remove() -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterXarrayImport)]


if "xarray" in sys.modules:
    _register_accessor()
elif not any(isinstance(f, _AfterXarrayImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterXarrayImport())
