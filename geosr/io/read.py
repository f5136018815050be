"""Open a scene lazily and validate it; scene-wide radiometric statistics.

The pixels stay on disk: :func:`open_scene` returns a :class:`Scene` whose ``data`` is a dask-backed
``xarray.DataArray`` (rioxarray), and tiles are read from it window by window.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, Resampling

from ..errors import InputError

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
STATS_SAMPLE = 1024  # scene statistics come from a read decimated to at most this many px per side


@dataclass(frozen=True)
class BandScaling:
    """Linear map from a band's values to the model's working range: ``(x - lo) / (hi - lo)``."""

    lo: float
    hi: float
    fill: float  # value given to nodata pixels before the model sees them (scene-wide, so tiles agree)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return (x - self.lo) / (self.hi - self.lo)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return y * (self.hi - self.lo) + self.lo


@dataclass
class Scene:
    """A raster opened for enhancement. Georeferencing travels with it."""

    path: Path | None  # None for in-memory arrays
    data: "xarray.DataArray"  # (band, y, x), lazy, only the selected bands  # noqa: F821
    bands: tuple[int, ...]  # 1-based band indexes selected in the file
    dtype: str
    crs: "rasterio.crs.CRS | None"
    transform: Affine
    nodata: float | None
    descriptions: tuple[str | None, ...]
    colorinterp: tuple[ColorInterp, ...]
    georeferenced: bool
    scaling: tuple[BandScaling, ...] = field(default=())
    alpha: tuple[bool, ...] = field(default=())  # per selected band: a mask-like alpha band

    @property
    def height(self) -> int:
        return int(self.data.shape[1])

    @property
    def width(self) -> int:
        return int(self.data.shape[2])

    @property
    def count(self) -> int:
        return int(self.data.shape[0])

    @property
    def gsd(self) -> tuple[float, float]:
        """Pixel size along the raster's x and y axes, in CRS units (also for rotated transforms)."""
        t = self.transform
        return float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e))

    def read(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Read the pixels at ``rows x cols`` (scene indices, any order/repeats) as ``(band, len(rows), len(cols))``."""
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        c0, c1 = int(cols.min()), int(cols.max()) + 1
        try:
            block = self.data[:, r0:r1, c0:c1].to_numpy()
        except Exception as err:  # rasterio/GDAL errors on truncated or corrupt files surface here
            raise InputError(f"{self.path}: cannot read pixels ({_one_line(err)}); the file may be truncated or corrupt") from err
        return block[:, rows - r0][:, :, cols - c0]

    def read_decimated(self, step: int) -> np.ndarray:
        """Every ``step``-th row and column of the whole scene, ``(band, ceil(h / step), ceil(w / step))``.

        A strided read of the lazy array: chunks are read one by one and decimated, never the whole scene at once.
        """
        try:
            return np.asarray(self.data[:, ::step, ::step].to_numpy())
        except Exception as err:
            raise InputError(f"{self.path}: cannot read pixels ({_one_line(err)}); the file may be truncated or corrupt") from err

    def detached(self) -> "Scene":
        """A copy without the pixels (``data`` keeps only their shape): what a tile task needs (scaling, nodata,
        dtype, georeferencing), small and picklable. ``read`` does not work on it."""
        from dataclasses import replace

        return replace(self, data=_Shape(tuple(int(n) for n in self.data.shape)))

    def valid_mask(self, block: np.ndarray) -> np.ndarray:
        """False where the pixel is outside the footprint: every band equal to nodata (or not finite)."""
        invalid = np.zeros(block.shape[1:], dtype=bool)
        if self.nodata is not None:
            invalid |= np.isnan(block).all(axis=0) if np.isnan(self.nodata) else (block == self.nodata).all(axis=0)
        if block.dtype.kind == "f":
            invalid |= ~np.isfinite(block).all(axis=0)
        return ~invalid


@dataclass(frozen=True)
class _Shape:
    """Stands in for a detached scene's pixels: only the shape is kept."""

    shape: tuple[int, ...]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def open_scene(path, *, bands=None, nodata=None, chunks: int = 512) -> Scene:
    """Open ``path`` lazily and validate it. Raises :class:`InputError` with a fix for anything unsupported."""
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a raster file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                profile = src.profile
                count, dtypes = src.count, src.dtypes
                crs, transform = src.crs, src.transform
                file_nodata = src.nodata
                descriptions, colorinterp = src.descriptions, src.colorinterp
                has_gcps = bool(src.gcps[0])
    except rasterio.errors.RasterioIOError as err:
        raise InputError(f"{path}: not a readable raster ({_one_line(err)})") from err

    if len(set(dtypes)) > 1:
        raise InputError(f"{path}: bands have different data types {sorted(set(dtypes))}; convert to one type first")
    dtype = dtypes[0]
    if dtype.startswith("complex"):
        raise InputError(f"{path}: complex data type {dtype} is not imagery geosr can enhance; take the amplitude first")
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{path}: unsupported data type {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}")

    selected = tuple(range(1, count + 1)) if bands is None else tuple(int(b) for b in bands)
    bad = [b for b in selected if not 1 <= b <= count]
    if bad or not selected:
        raise InputError(f"{path}: --bands {list(selected)} out of range; the file has bands 1..{count}")

    georeferenced = crs is not None
    if not georeferenced:
        if has_gcps:
            raise InputError(f"{path}: georeferenced by ground control points only; warp it to a grid first (gdalwarp)")
        warnings.warn(f"{path}: no CRS; the output will not be georeferenced either", stacklevel=2)
        log.warning("%s has no CRS: output will carry no georeferencing", path)

    nodata = file_nodata if nodata is None else float(nodata)
    if nodata is not None and not np.isnan(nodata) and np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        if not (info.min <= nodata <= info.max and float(nodata).is_integer()):
            raise InputError(f"{path}: nodata {nodata} cannot occur in {dtype} data; pass a value in range with --nodata")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            # pyproj's CF export of some CRSs (e.g. EPSG:2056) warns about a parameter geosr never uses
            warnings.filterwarnings("ignore", message="angle from rectified to skew grid", category=UserWarning)
            da = rioxarray.open_rasterio(path, chunks={"band": 1, "y": chunks, "x": chunks}, masked=False,
                                         lock=True, parse_coordinates=transform.is_rectilinear)
    except Exception as err:
        raise InputError(f"{path}: not a readable raster ({_one_line(err)})") from err
    if isinstance(da, (list, xr.Dataset)):
        raise InputError(f"{path}: holds several subdatasets; open one of them explicitly")
    da = da.isel(band=[b - 1 for b in selected])

    scene = Scene(
        path=path, data=da, bands=selected, dtype=dtype, crs=crs, transform=transform, nodata=nodata,
        descriptions=tuple(descriptions[b - 1] for b in selected),
        colorinterp=tuple(colorinterp[b - 1] for b in selected),
        georeferenced=georeferenced,
    )
    scene.scaling, scene.alpha = _scene_statistics(scene, _read_sample(scene))
    log.debug("opened %s: %s", path, profile)
    return scene


def _decimation(scene: Scene) -> int:
    return max(1, int(np.ceil(max(scene.height, scene.width) / STATS_SAMPLE)))


def _read_sample(scene: Scene) -> np.ndarray:
    """A decimated read of the whole scene (GDAL takes it from overviews when the file has them)."""
    f = _decimation(scene)
    out_shape = (scene.count, -(-scene.height // f), -(-scene.width // f))
    try:
        with rasterio.open(scene.path) as src:
            return src.read(list(scene.bands), out_shape=out_shape, resampling=Resampling.nearest)
    except rasterio.errors.RasterioError as err:
        raise InputError(f"{scene.path}: cannot read pixels ({_one_line(err)}); the file may be truncated or corrupt") from err


def scene_from_array(array: np.ndarray, *, transform: Affine | None = None, crs=None, nodata: float | None = None,
                     descriptions=None, colorinterp=None) -> Scene:
    """Wrap an in-memory ``(band, y, x)`` array as a :class:`Scene` (same scaling rules as files)."""
    import xarray as xr

    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(f"array must be (band, y, x), got shape {array.shape}")
    return _array_scene(xr.DataArray(array, dims=("band", "y", "x")), transform=transform, crs=crs, nodata=nodata,
                        descriptions=descriptions, colorinterp=colorinterp)


def _array_scene(da, *, transform, crs, nodata, descriptions=None, colorinterp=None, bands=None) -> Scene:
    """A Scene around a ``(band, y, x)`` DataArray (numpy or dask); scaling from its decimated pixels."""
    dtype = str(da.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"unsupported data type {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}")
    n = da.shape[0]
    scene = Scene(
        path=None, data=da, bands=tuple(bands or range(1, n + 1)), dtype=dtype,
        crs=crs, transform=transform or Affine.identity(), nodata=nodata,
        descriptions=tuple(descriptions or (None,) * n),
        colorinterp=tuple(colorinterp or (ColorInterp.undefined,) * n), georeferenced=crs is not None,
    )
    f = _decimation(scene)
    scene.scaling, scene.alpha = _scene_statistics(scene, scene.read_decimated(f))
    return scene


def _file_view(da) -> tuple[Path, tuple[int, ...]] | None:
    """``(path, bands)`` when ``da`` holds a file's pixels as stored (opened by ``rioxarray.open_rasterio``
    without masking or scaling, possibly a band subset); None for anything else (cropped, computed, in memory)."""
    source = da.encoding.get("source")
    if not source or not Path(source).is_file() or "band" not in da.coords:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(source) as src:
                shape, dtypes, transform, crs = (src.height, src.width), src.dtypes, src.transform, src.crs
                count = src.count
        bands = tuple(int(b) for b in np.atleast_1d(da.coords["band"].values))
        same = (tuple(da.shape[1:]) == shape and str(da.dtype) == dtypes[0] and all(1 <= b <= count for b in bands)
                and (crs is None or da.rio.crs == crs) and np.allclose(tuple(da.rio.transform())[:6],
                                                                        tuple(transform)[:6], rtol=0, atol=1e-9))
    except Exception:  # anything unexpected: treat it as an array, which is always correct
        return None
    return (Path(source), bands) if same else None


def scene_from_dataarray(da, *, nodata: float | None = None) -> Scene:
    """Wrap an xarray DataArray ``(band, y, x)`` or ``(y, x)``, numpy- or dask-backed, as a :class:`Scene`.

    A DataArray that holds a file's pixels as stored (``rioxarray.open_rasterio(path, chunks=...)``, a band
    subset allowed) gets the file's scene statistics, read as ``enhance_scene`` reads them, so both give the
    same output; its pixels are still read from the DataArray (its chunks). Anything else is scaled from its
    own decimated pixels, as :func:`scene_from_array` does. Georeferencing comes from ``da.rio`` (CRS,
    transform from the coordinates or the GeoTransform), nodata from ``nodata`` or ``da.rio.nodata``.
    """
    import rioxarray  # noqa: F401  (registers .rio)

    if da.ndim == 2:
        da = da.expand_dims("band")
    if da.ndim != 3 or tuple(da.dims[1:]) != ("y", "x"):
        raise InputError(f"DataArray dims {da.dims}: need (band, y, x) or (y, x); rename or transpose it first")
    view = _file_view(da)
    if view is not None:
        path, bands = view
        scene = open_scene(path, bands=bands, nodata=nodata)
        scene.data = da
        return scene
    crs = da.rio.crs
    try:
        transform = da.rio.transform()
    except Exception:  # no coordinates and no GeoTransform: pixel space
        transform = None
    file_nodata = da.rio.nodata
    nodata = nodata if nodata is not None else (None if file_nodata is None else float(file_nodata))
    long_name = da.attrs.get("long_name")
    descriptions = tuple(long_name) if isinstance(long_name, (tuple, list)) and len(long_name) == da.shape[0] else None
    return _array_scene(da, transform=transform if crs is not None else None, crs=crs, nodata=nodata,
                        descriptions=descriptions)


def _scene_statistics(scene: Scene, sample: np.ndarray) -> tuple[tuple[BandScaling, ...], tuple[bool, ...]]:
    """Radiometric scaling once per scene, from a decimated sample of the whole scene.

    8-bit data maps 0..255 to 0..1 exactly. Other types use the 0.1-99.9 percentiles of the valid pixels, shared
    by the first three (colour) bands so colours keep their balance. Values outside that range are not clipped:
    the map is linear and inverted exactly on write.
    """
    valid = scene.valid_mask(sample)

    alpha = []
    for b in range(scene.count):
        values = sample[b][valid] if valid.any() else sample[b].ravel()
        alpha.append(scene.colorinterp[b] == ColorInterp.alpha and np.unique(values).size <= 2)

    def robust(values: np.ndarray) -> tuple[float, float]:
        if values.size == 0:
            return 0.0, 1.0
        lo, hi = np.percentile(values.astype(np.float64), [0.1, 99.9])
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1.0
        return float(lo), float(hi)

    scalings = []
    colour = [b for b in range(min(3, scene.count)) if not alpha[b]]
    colour_range = None
    if scene.dtype != "uint8" and len(colour) == 3:
        colour_range = robust(np.concatenate([sample[b][valid] for b in colour]))
    for b in range(scene.count):
        values = sample[b][valid]
        if scene.dtype == "uint8":
            lo, hi = 0.0, 255.0
        elif alpha[b]:  # replicated, never modelled: identity keeps it exact
            lo, hi = 0.0, 1.0
        elif b in colour and colour_range is not None:
            lo, hi = colour_range
        else:
            lo, hi = robust(values)
        fill = float(values.mean()) if values.size else lo
        scalings.append(BandScaling(lo, hi, fill))
    return tuple(scalings), tuple(alpha)
