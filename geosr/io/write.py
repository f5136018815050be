"""Write the enhanced scene: streamed, block-aligned, to a temporary file that is renamed only when complete,
by one run at a time (:class:`OutputLock`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import ColorInterp

from ..errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: a stale lock's takeover is not serialised there
    fcntl = None

log = logging.getLogger(__name__)

BLOCK = 256  # output GeoTIFF block size; every write is one whole block
LOCK_SUFFIX = ".geosr-lock"  # OUT.tif.geosr-lock, beside OUT.tif.geosr-partial
LOCK_TRIES = 20  # attempts to take a lock that is being written or taken over by another process ...
LOCK_WAIT_S = 0.05  # ... this far apart (a lock file is complete within microseconds of its creation)


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


def lock_path(dst: Path) -> Path:
    """Where the lock of output ``dst`` lives while a run writes it (see :class:`OutputLock`)."""
    dst = Path(dst)
    return dst.with_name(dst.name + LOCK_SUFFIX)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (one of another user counts)."""
    if os.name == "nt":  # os.kill(pid, 0) would send it a Ctrl-C there
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists
        code = ctypes.c_ulong()
        try:
            return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """While held, no other geosr run writes output ``dst``, its temporary GeoTIFF or its partial store.

    The lock is a file ``OUT.geosr-lock`` beside the output (:func:`lock_path`), created atomically
    (``O_CREAT | O_EXCL``) holding JSON ``{host, pid, started, argv}``, and removed when the ``with`` block ends
    however it ends (success, error, Ctrl-C, SIGTERM). A lock that is there already:

    - its owner is alive (its pid exists on this host, or it is another host's, which cannot be checked): refused
      with an :class:`OutputError` naming that run;
    - its owner's pid is gone on this host (a run killed with SIGKILL, the OOM killer, a power loss): stale, taken
      over with a warning. Of several processes taking over at once one wins (the stale file is removed under an
      ``flock`` after checking it is still the same file; the new one is created with ``O_EXCL``), the others
      then find the winner's lock and refuse;
    - unreadable (not the JSON above once its writer has had a moment): refused, saying to delete it; geosr never
      guesses whether a lock it cannot read is stale.

    A stale lock whose pid now belongs to an unrelated process looks alive: refused, and the message says to
    delete the lock file if that run is gone.
    """

    def __init__(self, dst: Path):
        self.dst = Path(dst)
        self.path = lock_path(self.dst)
        self._owned: tuple[int, int] | None = None  # (st_dev, st_ino) of the lock file this object created

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv}
        unreadable = None
        for _ in range(LOCK_TRIES):
            if self._create(me):
                return
            fd, owner, unreadable = self._open_existing()
            if fd is None:  # released meanwhile
                continue
            try:
                if owner is None:  # being written, or garbled: look again in a moment
                    time.sleep(LOCK_WAIT_S)
                    continue
                if owner["host"] != me["host"] or _alive(owner["pid"]):
                    raise OutputError(f"{self.dst}: another geosr run (pid {owner['pid']} on {owner['host']}, "
                                      f"started {owner.get('started', '?')}) is writing this output; wait for it "
                                      f"to finish, or delete {self.path} if that run is gone")
                if self._remove_stale(fd):
                    log.warning("%s: taking over the lock of geosr run pid %d (started %s), which is gone (killed?)",
                                self.path, owner["pid"], owner.get("started", "?"))
                else:  # another process is taking it over
                    time.sleep(LOCK_WAIT_S)
            finally:
                if fd >= 0:
                    os.close(fd)
        if unreadable is not None:
            raise OutputError(f"{self.path}: unreadable lock file ({unreadable}); if no geosr run is writing "
                              f"{self.dst}, delete it and rerun")
        raise OutputError(f"{self.path}: cannot take the lock of {self.dst} (other geosr runs keep taking it); "
                          "wait for them to finish")

    def _create(self, me: dict) -> bool:
        """Create the lock file holding ``me``; False if one is there."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise OutputError(f"{self.path}: cannot create the lock file ({err.strerror or err}); "
                              "check that the output folder is writable") from err
        try:
            st = os.fstat(fd)
            os.write(fd, json.dumps(me).encode())
        except OSError as err:
            os.close(fd)
            os.unlink(self.path)
            raise OutputError(f"{self.path}: cannot write the lock file ({err.strerror or err})") from err
        os.close(fd)
        self._owned = (st.st_dev, st.st_ino)
        return True

    def _open_existing(self) -> tuple[int | None, dict | None, str | None]:
        """The lock file there, open (fd; -1 on Windows, where an open file cannot be removed: closed already), with
        its owner ``{host, pid, ...}``, or None and why it is unreadable; fd None if there is none any more."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None, None, None
        except OSError as err:
            raise OutputError(f"{self.path}: cannot read the lock file ({err.strerror or err}); if no geosr run is "
                              f"writing {self.dst}, delete it and rerun") from err
        try:
            raw = os.read(fd, 1 << 16)
        except OSError as err:
            raw = err
        if fcntl is None:
            os.close(fd)
            fd = -1
        if isinstance(raw, OSError):
            return fd, None, str(raw.strerror or raw)
        try:
            owner = json.loads(raw)
        except ValueError:  # also an empty file, or bytes that are not UTF-8
            return fd, None, "empty" if not raw else "not JSON"
        if not (isinstance(owner, dict) and isinstance(owner.get("host"), str) and isinstance(owner.get("pid"), int)
                and owner["pid"] > 0):
            return fd, None, "no host and pid in it"
        return fd, owner, None

    def _remove_stale(self, fd: int) -> bool:
        """Remove the stale lock file open at ``fd``; False if another process is removing it or already did."""
        try:
            if fcntl is not None:  # one process at a time, and only if the path still is this file
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st, now = os.fstat(fd), os.stat(self.path)
                if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                    return False
            os.unlink(self.path)
        except (BlockingIOError, FileNotFoundError):
            return False
        except OSError as err:
            raise OutputError(f"{self.path}: cannot remove the stale lock file ({err.strerror or err}); delete it "
                              "and rerun") from err
        return True

    def release(self) -> None:
        """Remove the lock file if this object created it and it is still that file."""
        owned, self._owned = self._owned, None
        if owned is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == owned:
                os.unlink(self.path)
            else:
                log.warning("%s: replaced by another run's lock while this run held it; left to that run", self.path)
        except FileNotFoundError:
            log.warning("%s: deleted while this run held it", self.path)


def remove_stale_partials(dst: Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_output` left for ``dst`` in a process that was killed (they are
    named ``.NAME.*.geosr-part.tif`` and sidecars); returns what was removed. Call it only while holding ``dst``'s
    :class:`OutputLock` (no other process is writing ``dst`` then)."""
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
