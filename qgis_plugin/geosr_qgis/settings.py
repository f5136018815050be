"""The plugin's settings (QgsSettings under ``geosr/``): which backend, which interpreter, extra PYTHONPATH."""

from __future__ import annotations

from qgis.core import QgsSettings

from .backend import AUTO, BACKENDS, choose_backend

PREFIX = "geosr/"


def get(name: str, default: str = "") -> str:
    return str(QgsSettings().value(PREFIX + name, default) or default)


def set_value(name: str, value: str) -> None:
    QgsSettings().setValue(PREFIX + name, value)


def backend_mode() -> str:
    mode = get("backend", AUTO)
    return mode if mode in BACKENDS else AUTO


def interpreter() -> str:
    """The Python that has geosr installed (used when geosr does not import in QGIS's Python)."""
    return get("interpreter")


def pythonpath() -> str:
    """Extra PYTHONPATH for that interpreter (e.g. a source checkout); usually empty."""
    return get("pythonpath")


def configured_backend():
    return choose_backend(backend_mode(), interpreter(), pythonpath())
