"""The xarray accessor ``da.geosr``: thin, every method calls the library's entry points and returns new objects.

Registered when xarray is imported (``import geosr`` arranges it without importing xarray itself, see
``geosr/__init__.py``)::

    import geosr, rioxarray
    da = rioxarray.open_rasterio("scene.tif", chunks={"x": 1024, "y": 1024})
    sr = da.geosr.enhance(scale=4, model="bicubic")      # lazy (dask); coords, CRS, transform as the CLI writes
    sr.rio.to_raster("sr.tif", recalc_transform=False)   # the exact transform (rioxarray's default recomputes
                                                         # it from the coordinates, last digits may differ)
    maps = da.geosr.modalities()                         # xr.Dataset: edges, segmentation (, height, vectors)
    result = sr.geosr.score(lr=da, reference=None)       # geosr.scoring.ScoreResult (report, maps)
"""

from __future__ import annotations

import tempfile
from dataclasses import fields
from pathlib import Path

import xarray as xr

from .errors import ConfigError, InputError


def _config(cls, options: dict, what: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown option {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**options)


def _as_raster(obj, role: str):
    """A path stays a path; a DataArray becomes a scoring Raster (its first three bands, computed)."""
    import numpy as np

    from .io.read import _file_view
    from .scoring.inputs import Raster

    if obj is None or isinstance(obj, (str, Path)):
        return obj
    if not isinstance(obj, xr.DataArray):
        raise InputError(f"{role}={type(obj).__name__}: give a path or an xarray DataArray")
    da = obj if obj.ndim == 3 else obj.expand_dims("band")
    view = _file_view(da)
    if view is not None and len(view[1]) == int(_band_count(view[0])):
        return view[0]  # the file itself: read as `geosr score` reads it (alpha bands dropped by their colour)
    try:
        transform = da.rio.transform() if da.rio.crs is not None else None
    except Exception:
        transform = None
    from affine import Affine

    return Raster(path=None, raw=np.asarray(da[:3].values), crs=da.rio.crs, transform=transform or Affine.identity())


def _band_count(path) -> int:
    import rasterio

    with rasterio.open(path) as src:
        return src.count


@xr.register_dataarray_accessor("geosr")
class GeosrAccessor:
    """``da.geosr``: enhance, modalities, score. ``da`` is ``(band, y, x)`` or ``(y, x)``."""

    def __init__(self, da: xr.DataArray):
        self._da = da

    def enhance(self, scale: int = 4, model: str | None = None, *, progress=None, should_stop=None,
                **options) -> xr.DataArray:
        """A new, lazily computed (dask) DataArray of the enhanced image.

        ``options`` are :class:`geosr.config.EnhanceConfig` fields (``tile``, ``overlap``, ``edge``, ``nodata``,
        ``bands``, ``threads``, mmsr's ``checkpoint``, ``steps``, ``temperatures``, ...). Its x/y coordinates are
        the output pixel centres; ``rio.crs``, ``rio.transform()`` and ``rio.nodata`` are those the CLI writes,
        and its values equal the CLI's output for the same file and settings. The model's per-scene step (the
        mmsr caption) runs now; the tiles run on ``.compute()`` (or ``.rio.to_raster``), streamed.

        ``progress``: a callback ``(done, total, message)`` called as tiles are done during the compute, or True
        for a ``tqdm.auto`` progress bar; ``should_stop()``: asked before each tile, True stops the compute with
        :class:`geosr.scene.Cancelled` (see :class:`geosr.lazy.TileProgress`; both act under dask's threaded and
        synchronous schedulers). Neither changes the values.
        """
        from .config import EnhanceConfig
        from .io.read import scene_from_dataarray
        from .lazy import enhance_lazy, to_dataarray

        config = _config(EnhanceConfig, dict(options, scale=scale, model=model), "enhance")
        da = self._da if self._da.ndim != 2 else self._da.expand_dims("band")
        if config.bands is not None:
            if "band" not in da.dims or any(not 1 <= b <= da.sizes["band"] for b in config.bands):
                raise ConfigError(f"bands={list(config.bands)}: out of range; the array has bands 1..{da.sizes.get('band', 1)}")
            da = da.isel(band=[b - 1 for b in config.bands])
        scene = scene_from_dataarray(da, nodata=config.nodata)
        coords = da.coords["band"].values if "band" in da.coords else None
        return to_dataarray(enhance_lazy(scene, config, progress=progress, should_stop=should_stop),
                            band_coords=coords)

    def modalities(self, **options) -> xr.Dataset:
        """Every condition the diffusion core reads, as a Dataset on this array's grid (computed now).

        ``options`` are :class:`geosr.config.ModalitiesConfig` fields (``dsm``, ``landcover``, ``vectors``,
        ``segmentation``, ``depth``, ...). Variables: ``edges``, ``segmentation`` (and ``height``, ``vectors``
        when asked for); ``attrs["caption"]`` holds the scene caption, ``attrs["report"]`` caption.json.
        Runs :func:`geosr.modalities.extract_modalities` on the file (or on a temporary GeoTIFF of the array).
        """
        import json

        import rioxarray

        from .config import ModalitiesConfig
        from .io.read import _file_view
        from .modalities import extract_modalities

        config = _config(ModalitiesConfig, options, "modalities")
        da = self._da if self._da.ndim == 3 else self._da.expand_dims("band")
        with tempfile.TemporaryDirectory(prefix="geosr-modalities-") as tmp:
            view = _file_view(da)
            if view is not None:
                src = view[0]
                if config.bands is None:
                    config.bands = view[1]
            else:
                src = Path(tmp) / "input.tif"
                da.rio.to_raster(src)
            result = extract_modalities(src, Path(tmp) / "out", config)
            variables = {}
            for name, path in result.files.items():
                if name == "caption":
                    continue
                var = "height" if name == "depth" else name
                m = rioxarray.open_rasterio(path).squeeze("band", drop=True).load()
                m.attrs = {k: v for k, v in m.attrs.items() if k.startswith(("GEOSR", "CLASS", "HEIGHT"))}
                variables[var] = m
        ds = xr.Dataset(variables)
        ds.attrs["caption"] = result.report["caption"]
        ds.attrs["report"] = json.dumps(result.report, ensure_ascii=False)
        return ds

    def score(self, *, lr, reference=None, **kwargs):
        """Score this array (an SR output) against ``lr``, its input (and an HR ``reference`` on its grid).

        ``lr`` and ``reference`` are DataArrays or paths; ``kwargs`` go to :func:`geosr.scoring.score_scene`
        (``roads_path``, ``buildings_path``, ``config``, ``json_path``, ``html_path``, ``map_path``, ...).
        Returns its :class:`~geosr.scoring.score.ScoreResult` (``.report``: every number; ``.maps``: the
        hallucination map components). A DataArray is scored by its first three bands.
        """
        from .scoring import score_scene

        if lr is None:
            raise ConfigError("score: lr=None; give the low-resolution input (a DataArray or a path)")
        return score_scene(_as_raster(self._da, "sr"), _as_raster(lr, "lr"),
                           reference=_as_raster(reference, "reference"), **kwargs)
