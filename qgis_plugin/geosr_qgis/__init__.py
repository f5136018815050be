"""geosr for QGIS: a toolbar button and a Processing provider around the ``geosr`` library or its CLI.

The package is ``geosr_qgis`` so it never shadows the library ``geosr`` in QGIS's Python.
"""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from .plugin import GeosrPlugin

    return GeosrPlugin(iface)
