"""The resumable intermediate store of a run: finished output cells on disk beside the output, until the final
GeoTIFF is written.

Layout (a folder next to the output, removed when the GeoTIFF is complete)::

    OUT.tif.geosr-partial/
        geosr-store.json      the run's fingerprint and the settings it hashes (written before any chunk)
        cells/P_Q.npy.gz      output cell (P, Q): rows segment P, columns segment Q of the tile grid (the lazy
                              graph's chunks, geosr.lazy); a .npy file gzip-compressed (level 1), so
                              ``zcat P_Q.npy.gz > P_Q.npy`` gives a plain one; stores written before cells were
                              compressed (plain ``P_Q.npy``) are still read

Why cells and not a regular chunk grid (Zarr): the lazy graph's output chunks *are* the cells (a tile body, an
overlap strip or corner; irregular sizes), and each is produced by exactly one task. One file per cell keeps
resume logic trivial: a cell is done iff its file exists. A cell is written to a unique temporary name in the
same folder and renamed into place (``os.replace``, atomic on POSIX filesystems), so a process killed mid-write
leaves at most a ``*.tmp-*`` file that is never mistaken for a finished cell (and is cleaned up on the next run).

Two engines write it: the dask one (:mod:`geosr.cluster`, ``scheduler``/``workers``), and the default in-process
stream (:func:`geosr.scene.enhance_scene`), which writes each finished cell here as well as into the GeoTIFF. Both
number cells the same way and share the fingerprint, so either resumes the other's store.

The fingerprint guards against mixing runs: it hashes the input (resolved path, size, mtime), every setting
that changes pixels, the model name and its weights' sha256, the output grid and the geosr version. A rerun whose
fingerprint differs is refused (or starts over with ``restart``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ConfigError, OutputError

log = logging.getLogger(__name__)

SUFFIX = ".geosr-partial"
META = "geosr-store.json"
# settings that do not change a single output pixel: they stay out of the fingerprint
NOT_PIXELS = ("overwrite", "cog", "threads", "scheduler", "workers", "restart", "resume")
CELL_EXT = ".npy.gz"  # a cell: its .npy bytes, gzip-compressed
LEGACY_EXT = ".npy"  # cells of stores written before compression: read, never written
COMPRESSLEVEL = 1  # gzip level of cells: on a noisy 50 MB uint8 output 0.82 of raw in 0.30 s; level 6: 0.85, 0.40 s


def store_path(dst: Path) -> Path:
    """Where the partial store of output ``dst`` lives."""
    dst = Path(dst)
    return dst.with_name(dst.name + SUFFIX)


def run_settings(src: Path, config, model, *, out_shape, count: int, dtype: str, cells: tuple[int, int]) -> dict:
    """What a run's pixels depend on, as a JSON-able dict (the fingerprint is its hash)."""
    src = Path(src).resolve()
    st = src.stat()
    prov = model.provenance() or {}
    pixels = {k: v for k, v in config.to_dict().items() if k not in NOT_PIXELS}
    return {
        "geosr_version": __version__,
        "input": {"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
        "settings": pixels,
        "model": {"name": model.name, "weights_sha256": prov.get("sha256")},
        "output": {"shape": [int(count), int(out_shape[0]), int(out_shape[1])], "dtype": str(dtype),
                   "cells": [int(cells[0]), int(cells[1])]},
    }


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two settings dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{k}."))
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


@dataclass
class PartialStore:
    """One run's finished output cells (see the module docstring). Workers get this object (a path)."""

    path: Path
    fingerprint: str

    @property
    def cells_dir(self) -> Path:
        return self.path / "cells"

    def cell_path(self, p: int, q: int) -> Path:
        return self.cells_dir / f"{p}_{q}{CELL_EXT}"

    @classmethod
    def open(cls, dst: Path, settings: dict, *, restart: bool = False) -> "PartialStore":
        """The store for output ``dst``: resumed if one with the same fingerprint is there, created if none is.

        A store of a run with other settings is refused (ConfigError naming what differs), or removed first
        when ``restart`` is True.
        """
        path = store_path(dst)
        fp = fingerprint(settings)
        if path.exists():
            meta = path / META
            try:
                old = json.loads(meta.read_text())
            except (OSError, ValueError):
                old = None
            if old is not None and old.get("fingerprint") == fp:
                store = cls(path, fp)
                store.clean_temporary()
                return store
            if not restart:
                if old is None:
                    why = "its fingerprint is unreadable"
                else:
                    changed = _differences(old.get("settings", {}), settings) or ["fingerprint"]
                    why = "it was made with other settings (" + ", ".join(changed) + ")"
                raise ConfigError(f"{path}: a partial run is there but {why}; rerun with the same settings to "
                                  f"resume it, or pass --restart to discard it")
            log.info("--restart: removing the partial store %s", path)
            shutil.rmtree(path)
        # created complete (fingerprint inside) under a temporary name, then renamed: never half a store
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            (tmp / "cells").mkdir()
            (tmp / META).write_text(json.dumps({"fingerprint": fp, "settings": settings}, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as err:
            raise OutputError(f"{path}: cannot create the partial store ({err.strerror or err}); "
                              "check that the output folder is writable") from err
        return cls(path, fp)

    def done(self) -> set[tuple[int, int]]:
        """The cells whose files are in place (renamed there only when completely written)."""
        out = set()
        for entry in os.scandir(self.cells_dir):
            name = entry.name
            ext = CELL_EXT if name.endswith(CELL_EXT) else LEGACY_EXT if name.endswith(LEGACY_EXT) else None
            if ext is None or ".tmp-" in name:
                continue
            p, _, q = name[:-len(ext)].partition("_")
            if p.isdigit() and q.isdigit():
                out.add((int(p), int(q)))
        return out

    def clean_temporary(self) -> None:
        """Remove temporary files left by a process killed while writing a cell."""
        for entry in os.scandir(self.cells_dir):
            if ".tmp-" in entry.name:
                os.unlink(entry.path)

    def write_cell(self, p: int, q: int, block: np.ndarray) -> int:
        """Write cell ``(p, q)`` atomically (compressed to a unique temporary file, fsync, rename); returns the
        bytes written to disk."""
        final = self.cell_path(p, q)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        raw = io.BytesIO()
        np.save(raw, np.ascontiguousarray(block), allow_pickle=False)
        data = gzip.compress(raw.getbuffer(), compresslevel=COMPRESSLEVEL, mtime=0)
        del raw
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        return len(data)

    def read_cell(self, p: int, q: int, shape: tuple[int, int, int], dtype) -> np.ndarray:
        path = self.cell_path(p, q)
        try:
            if path.exists():
                block = np.load(io.BytesIO(gzip.decompress(path.read_bytes())), allow_pickle=False)
            else:  # a store written before cells were compressed
                path = path.with_name(path.name[:-len(CELL_EXT)] + LEGACY_EXT)
                block = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError) as err:  # gzip.BadGzipFile is an OSError
            raise OutputError(f"{path}: unreadable cell of the partial store ({' '.join(str(err).split())}); "
                              "pass --restart to discard the partial store") from err
        if block.shape != tuple(shape) or block.dtype != np.dtype(dtype):  # never silently use a foreign chunk
            raise OutputError(f"{path}: holds {block.dtype} {block.shape}, expected {np.dtype(dtype)} "
                              f"{tuple(shape)}; pass --restart to discard the partial store")
        return block

    def count(self) -> int:
        """How many finished cells the store holds (0 once removed)."""
        try:
            return len(self.done())
        except OSError:
            return 0

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class CellWriter:
    """Writes cells into a store on a background thread, so that compressing and syncing them overlaps the model
    (zlib and file I/O release the GIL). At most ``depth`` cells wait (memory stays bounded); blocks handed over
    must not change afterwards. A write error is raised in the caller: at its next :meth:`put`, or at
    :meth:`close`, which returns once every queued cell is in place. :meth:`abort` drops what waits, never raises.
    """

    def __init__(self, store: PartialStore, depth: int = 2):
        import queue
        import threading

        self.store = store
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._drop = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="geosr-store", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._drop:  # after an error or an abort: drain, write nothing
                continue
            try:
                self.store.write_cell(*item)
            except BaseException as err:  # noqa: BLE001  (handed to the caller's thread)
                self._error = err

    def _raise(self) -> None:
        err, self._error = self._error, None
        if err is not None:
            self._drop = True
            raise err

    def put(self, p: int, q: int, block: np.ndarray) -> None:
        self._raise()
        self._queue.put((p, q, block))

    def _stop(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        self._stop()
        self._raise()

    def abort(self) -> None:
        self._drop = True
        self._stop()


def kept_cells(dst: Path) -> tuple[int, int | None] | None:
    """What the partial store of output ``dst`` holds: ``(finished cells, the output's cells)`` (the latter None if
    its settings are unreadable); None when there is no store."""
    path = store_path(dst)
    if not path.is_dir():
        return None
    try:
        p, q = json.loads((path / META).read_text())["settings"]["output"]["cells"]
        total = int(p) * int(q)
    except (OSError, ValueError, KeyError, TypeError):
        total = None
    return PartialStore(path, "").count(), total


def needed_tiles(grid, done: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The tiles ``(row, col)`` that the cells ``(p, q)`` not in ``done`` need (every tile when none is done)."""
    rows, cols = grid.rows.segments, grid.cols.segments
    return {(r, c) for p, (_, _, ycover) in enumerate(rows) for q, (_, _, xcover) in enumerate(cols)
            if (p, q) not in done for r in ycover for c in xcover}


def log_start(store: PartialStore, *, done: int, cells: int, tiles: int, needed: int) -> None:
    """The log line of a run's start on its partial store (both engines say the same)."""
    if done:
        log.info("resuming %s: %d of %d output cells already done, skipped; %d of %d tiles skipped, %d to compute",
                 store.path, done, cells, tiles - needed, tiles, needed)
    else:
        log.info("partial store %s: %d output cells from %d tiles", store.path, cells, tiles)
