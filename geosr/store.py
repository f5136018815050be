"""The resumable intermediate store of a run: finished output cells on disk beside the output, until the final
GeoTIFF is written.

Layout (a folder next to the output, removed when the GeoTIFF is complete)::

    OUT.tif.geosr-partial/
        geosr-store.json      the run's fingerprint and the settings it hashes (written before any chunk)
        cells/P_Q.npy         output cell (P, Q) of the lazy graph (geosr.lazy): rows segment P, columns segment Q

Why cells and not a regular chunk grid (Zarr): the lazy graph's output chunks *are* the cells (a tile body, an
overlap strip or corner; irregular sizes), and each is produced by exactly one task. One file per cell keeps
resume logic trivial: a cell is done iff its file exists. A cell is written to a unique temporary name in the
same folder and renamed into place (``os.replace``, atomic on POSIX filesystems), so a process killed mid-write
leaves at most a ``*.tmp-*`` file that is never mistaken for a finished cell (and is cleaned up on the next run).

The fingerprint guards against mixing runs: it hashes the input (resolved path, size, mtime), every setting
that changes pixels, the model name and its weights' sha256, the output grid and the geosr version. A rerun whose
fingerprint differs is refused (or starts over with ``restart``).
"""

from __future__ import annotations

import hashlib
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
NOT_PIXELS = ("overwrite", "cog", "threads", "scheduler", "workers", "restart")


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
        return self.cells_dir / f"{p}_{q}.npy"

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
            stem, ext = os.path.splitext(entry.name)
            if ext == ".npy" and "_" in stem:
                p, q = stem.split("_", 1)
                if p.isdigit() and q.isdigit():
                    out.add((int(p), int(q)))
        return out

    def clean_temporary(self) -> None:
        """Remove temporary files left by a process killed while writing a cell."""
        for entry in os.scandir(self.cells_dir):
            if ".tmp-" in entry.name:
                os.unlink(entry.path)

    def write_cell(self, p: int, q: int, block: np.ndarray) -> int:
        """Write cell ``(p, q)`` atomically (unique temporary file, fsync, rename); returns the bytes written."""
        final = self.cell_path(p, q)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(block), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        return int(block.nbytes)

    def read_cell(self, p: int, q: int, shape: tuple[int, int, int], dtype) -> np.ndarray:
        block = np.load(self.cell_path(p, q), allow_pickle=False)
        if block.shape != tuple(shape) or block.dtype != np.dtype(dtype):  # never silently use a foreign chunk
            raise OutputError(f"{self.cell_path(p, q)}: holds {block.dtype} {block.shape}, expected {np.dtype(dtype)} "
                              f"{tuple(shape)}; pass --restart to discard the partial store")
        return block

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
