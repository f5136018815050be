"""Write the enhanced scene: streamed, block-aligned, to a temporary file that is renamed only when complete."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import ColorInterp

from ..errors import OutputError

log = logging.getLogger(__name__)

BLOCK = 256  # output GeoTIFF block size; every write is one whole block


def check_output_path(src: Path, dst: Path, *, overwrite: bool) -> None:
    """Refuse what would lose data or cannot work, before any compute starts."""
    src, dst = Path(src), Path(dst)
    same = dst.resolve() == src.resolve() or (dst.exists() and src.exists() and os.path.samefile(src, dst))
    if same:
        raise OutputError(f"{dst}: output is the input file; choose another output path")
    if dst.is_dir():
        raise OutputError(f"{dst}: is a folder; give a file name such as {dst / (src.stem + '_x4.tif')}")
    if dst.exists() and not overwrite:
        raise OutputError(f"{dst}: already exists; pass --overwrite to replace it")
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable")


def tagged_profile(*, height, width, count, dtype, crs, transform, nodata) -> dict:
    """Creation profile of the (intermediate) GeoTIFF: tiled, deflate, BigTIFF when needed."""
    profile = dict(
        driver="GTiff", height=height, width=width, count=count, dtype=dtype,
        tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
        predictor=3 if np.dtype(dtype).kind == "f" else 2, bigtiff="if_safer", interleave="pixel",
        # no NUM_THREADS: with multithreaded compression GDAL 3.x loses write errors (disk full) on close,
        # leaving a truncated file that looks complete (seen here with a file-size limit)
    )
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    return profile


class BlockWriter:
    """Collects finished output rectangles and writes each ``BLOCK`` x ``BLOCK`` block of the GeoTIFF as soon as
    it is complete, as one aligned window (so GDAL compresses it once and never rewrites it).

    Memory holds only the blocks that are partly finished (about one row of blocks), never the scene.
    """

    def __init__(self, dataset, *, dtype):
        self.ds = dataset
        self.dtype = np.dtype(dtype)
        self.height, self.width, self.count = dataset.height, dataset.width, dataset.count
        self._blocks: dict[tuple[int, int], np.ndarray] = {}
        self._filled: dict[tuple[int, int], int] = {}

    def _window(self, by: int, bx: int) -> rasterio.windows.Window:
        y, x = by * BLOCK, bx * BLOCK
        return rasterio.windows.Window(x, y, min(BLOCK, self.width - x), min(BLOCK, self.height - y))

    def put(self, y0: int, x0: int, data: np.ndarray) -> None:
        """Place ``data`` (band, h, w), already in the output dtype, at output px ``(y0, x0)``."""
        h, w = data.shape[1:]
        for by in range(y0 // BLOCK, (y0 + h - 1) // BLOCK + 1):
            for bx in range(x0 // BLOCK, (x0 + w - 1) // BLOCK + 1):
                win = self._window(by, bx)
                ya, yb = max(y0, win.row_off), min(y0 + h, win.row_off + win.height)
                xa, xb = max(x0, win.col_off), min(x0 + w, win.col_off + win.width)
                part = data[:, ya - y0:yb - y0, xa - x0:xb - x0]
                if part.shape[1:] == (win.height, win.width):  # the whole block at once
                    self.ds.write(part, window=win)
                    continue
                key = (by, bx)
                buf = self._blocks.get(key)
                if buf is None:
                    buf = self._blocks[key] = np.empty((self.count, win.height, win.width), dtype=self.dtype)
                    self._filled[key] = 0
                buf[:, ya - win.row_off:yb - win.row_off, xa - win.col_off:xb - win.col_off] = part
                self._filled[key] += (yb - ya) * (xb - xa)
                if self._filled[key] == win.height * win.width:
                    self.ds.write(buf, window=win)
                    del self._blocks[key], self._filled[key]

    @property
    def pending(self) -> int:
        return len(self._blocks)


@contextmanager
def atomic_output(dst: Path, *, overwrite: bool, cog: bool):
    """Yield a temporary path in ``dst``'s folder; on success rename it to ``dst``, on any failure delete it."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".geosr-part.tif", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp)
    extra = [tmp.with_name(tmp.name + ".aux.xml"), tmp.with_suffix(".cog.tif")]
    try:
        yield tmp
        if cog:
            _to_cog(tmp, extra[1])
            os.replace(extra[1], tmp)
        if dst.exists() and not overwrite:  # appeared while we worked: still never clobber
            raise OutputError(f"{dst}: appeared while enhancing; pass --overwrite to replace it")
        os.replace(tmp, dst)
    except rasterio.errors.RasterioError as err:
        cause = err.__cause__ or err
        raise OutputError(f"{dst}: write failed ({' '.join(str(cause).split())}); is the disk full? "
                          "nothing was left behind") from err
    except OSError as err:
        raise OutputError(f"{dst}: write failed ({err.strerror or err}); nothing was left behind") from err
    finally:
        for p in (tmp, *extra):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def remove_stale_partials(dst: Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_output` left for ``dst`` in a process that was killed (they are
    named ``.NAME.*.geosr-part.tif`` and sidecars); returns what was removed. Call it only when no other process
    is writing ``dst`` (e.g. when resuming its partial store)."""
    import glob

    dst = Path(dst)
    removed = []
    for name in glob.glob(glob.escape(str(dst.with_name(f".{dst.name}."))) + "*.geosr-part*"):
        try:
            os.unlink(name)
            removed.append(Path(name))
        except OSError:
            pass
    if removed:
        log.info("removed %d temporary file(s) of an interrupted run: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _to_cog(src: Path, dst: Path) -> None:
    """Rewrite ``src`` as a Cloud-Optimized GeoTIFF with overviews (GDAL's COG driver)."""
    with rasterio.open(src) as ds:
        kind = np.dtype(ds.dtypes[0]).kind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        rasterio.shutil.copy(src, dst, driver="COG", COMPRESS="DEFLATE",
                             PREDICTOR="FLOATING_POINT" if kind == "f" else "YES", OVERVIEWS="AUTO",
                             OVERVIEW_RESAMPLING="AVERAGE", BIGTIFF="IF_SAFER", BLOCKSIZE=BLOCK)


def set_band_metadata(ds, *, descriptions, colorinterp, tags: dict) -> None:
    for i, desc in enumerate(descriptions, start=1):
        if desc:
            ds.set_band_description(i, desc)
    if colorinterp and all(isinstance(c, ColorInterp) for c in colorinterp):
        try:
            ds.colorinterp = list(colorinterp)
        except (ValueError, rasterio.errors.RasterioError) as err:
            log.warning("colour interpretation not kept: %s", err)
    ds.update_tags(**{k: str(v) for k, v in tags.items()})
