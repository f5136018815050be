"""Every error geosr raises on purpose: one base class, messages that say how to fix the problem."""


class GeosrError(Exception):
    """Base class: the CLI prints ``str(err)`` as one line and exits non-zero."""


class InputError(GeosrError):
    """The input raster is missing, unreadable or unsupported."""


class OutputError(GeosrError):
    """The output cannot be written where or how it was asked."""


class ConfigError(GeosrError):
    """A parameter (scale, tile, overlap, bands, ...) is out of range."""


class WeightsError(GeosrError):
    """Model weights are missing or cannot be fetched/converted."""


class GridError(InputError):
    """Rasters that must share a grid (SR and reference) or nest in one (SR and LR) do not line up."""


class VectorError(InputError):
    """A vector file (roads, buildings) is missing, unreadable, has no CRS or no usable layer."""


class ConditionError(GeosrError):
    """A conditioning input (DSM, land-cover raster, vector layer) is unusable for this scene."""


class BackendError(GeosrError):
    """An optional backend (transformers model, LLM endpoint) is not installed or cannot be reached."""


class Terminated(KeyboardInterrupt):
    """Not an error: a stop on purpose from outside that must leave nothing, unlike Ctrl-C (a plain
    ``KeyboardInterrupt``, after which a run keeps its partial store to resume). The CLI raises it on SIGTERM, which
    the QGIS plugin's Cancel sends; it prints "interrupted" and exits 130 for both."""
