"""Build the installable plugin zip: ``DIST/geosr_qgis-<version>.zip`` with the ``geosr_qgis/`` folder at the top.

Usage: python qgis_plugin/build_zip.py [DIST]   (default: dist/ beside qgis_plugin/)
"""

from __future__ import annotations

import configparser
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "geosr_qgis"
SKIP_DIRS = {"__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def version() -> str:
    meta = configparser.ConfigParser()
    meta.read(PACKAGE / "metadata.txt", encoding="utf-8")
    return meta["general"]["version"]


def files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(HERE).parts)
                  and p.suffix not in SKIP_SUFFIXES)


def build(dist: Path) -> Path:
    dist.mkdir(parents=True, exist_ok=True)
    out = dist / f"geosr_qgis-{version()}.zip"
    tmp = out.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in files():
            zf.write(path, path.relative_to(HERE).as_posix())
    tmp.replace(out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "dist"))
