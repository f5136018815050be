"""What the user asked for, as plain data, and how it becomes a ``geosr`` command line or library call.

No QGIS imports here: the dialog and the Processing algorithms fill these dataclasses, the backends read them,
and the tests exercise them without QGIS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

MODELS = ("rrdn-gan", "realesrgan-x4plus", "bicubic", "lanczos", "nearest", "mmsr")  # `geosr models`
MODALITIES = ("text", "depth", "segmentation", "edges")  # the conditions of --model mmsr (geosr's --drop names)
GUIDANCE_MODES = ("m-cfg", "m0-cfg", "cfg")
GEODATA_MODELS = ("mmsr",)  # models that read the user's DSM, land cover and vectors


def layer_file(source: str | None) -> str | None:
    """The file behind a QGIS layer source: ``roads.gpkg|layername=roads`` -> ``roads.gpkg``; '' / None -> None.

    geosr reads whole files (every layer of a GeoPackage), so the provider's options after ``|`` are dropped.
    Sources that are not files (WMS, PostGIS, memory layers) are refused with a message that says what to do.
    """
    if not source:
        return None
    path = source.split("|", 1)[0].strip()
    if not Path(path).is_file():
        raise ValueError(f"{source!r} is not a file on disk; geosr reads files: save the layer as a GeoTIFF or "
                         "GeoPackage first (Export > Save As)")
    return path


@dataclass
class EnhanceOptions:
    """One ``geosr enhance`` run. ``None`` means geosr's default. Names follow ``geosr.config.EnhanceConfig``."""

    input: str
    output: str
    model: str | None = None
    scale: int | None = None
    tile: int | None = None
    overlap: int | None = None
    bands: tuple[int, ...] | None = None
    device: str | None = None
    threads: int | None = None
    # --model mmsr only
    checkpoint: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_mode: str | None = None
    temperatures: str | None = None  # e.g. "depth=0.5,edges=2"
    seed: int | None = None
    modalities: tuple[str, ...] | None = None  # conditions the model uses; the others are dropped. None: all
    dsm: str | None = None
    landcover: str | None = None
    vectors: str | None = None
    cog: bool = False
    overwrite: bool = False
    # a partial store that a killed or crashed run with other settings left beside the output is discarded (a GUI
    # user cannot manage it); one with the same settings is still resumed
    restart: bool = True

    @property
    def drop(self) -> str | None:
        if self.modalities is None:
            return None
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; choose from {', '.join(MODALITIES)}")
        dropped = [m for m in MODALITIES if m not in self.modalities]
        return ",".join(dropped) or None

    def config_kwargs(self) -> dict:
        """Keyword arguments of ``geosr.config.EnhanceConfig`` (what was set, nothing else)."""
        skip = {"input", "output", "modalities"}
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        kw["drop"] = self.drop
        return {k: v for k, v in kw.items() if v is not None and v is not False}

    def cli_args(self) -> list[str]:
        """``geosr enhance`` arguments (after the command name), an argument list for a shell-free subprocess."""
        args = ["enhance", str(self.input), "-o", str(self.output)]
        flags = {"temperatures": "--temperature"}
        for name, value in self.config_kwargs().items():
            flag = flags.get(name, "--" + name.replace("_", "-"))
            if value is True:
                args.append(flag)
            elif name == "bands":
                args += [flag, ",".join(str(b) for b in value)]
            else:
                args += [flag, str(value)]
        return args


@dataclass
class ModalitiesOptions:
    """One ``geosr modalities`` run: the conditions of the scene written as GeoTIFFs into ``output`` (a folder)."""

    input: str
    output: str
    dsm: str | None = None
    landcover: str | None = None
    vectors: str | None = None
    tile: int | None = None
    overwrite: bool = False

    def config_kwargs(self) -> dict:
        """Keyword arguments of ``geosr.config.ModalitiesConfig``."""
        kw = {k: getattr(self, k) for k in ("dsm", "landcover", "vectors", "tile", "overwrite")}
        return {k: v for k, v in kw.items() if v is not None and v is not False}

    def cli_args(self) -> list[str]:
        args = ["modalities", str(self.input), "-o", str(self.output)]
        for name, value in self.config_kwargs().items():
            args += ["--" + name] if value is True else ["--" + name, str(value)]
        return args


@dataclass
class ScoreOptions:
    """One ``geosr score`` run. ``json`` is always written: the caller reads the numbers from it."""

    sr: str
    lr: str
    json: str
    reference: str | None = None
    roads: str | None = None
    buildings: str | None = None
    html: str | None = None
    map: str | None = None
    lpips: bool = True
    overwrite: bool = False

    def cli_args(self) -> list[str]:
        args = ["score", str(self.sr), "--lr", str(self.lr), "--json", str(self.json)]
        for name in ("reference", "roads", "buildings", "html", "map"):
            if getattr(self, name):
                args += ["--" + name, str(getattr(self, name))]
        if not self.lpips:
            args.append("--no-lpips")
        if self.overwrite:
            args.append("--overwrite")
        return args

    def library_kwargs(self) -> dict:
        """Keyword arguments of ``geosr.scoring.score_scene`` besides ``sr``, ``lr`` and ``config``."""
        return dict(reference=self.reference, roads_path=self.roads, buildings_path=self.buildings,
                    json_path=self.json, html_path=self.html, map_path=self.map, overwrite=self.overwrite)


def partial_store(output: str | Path) -> Path:
    """The folder of finished cells geosr keeps beside ``output`` until it is complete (``NAME.geosr-partial``)."""
    out = Path(output)
    return out.with_name(out.name + ".geosr-partial")


def output_lock(output: str | Path) -> Path:
    """The lock file a geosr run holds beside ``output`` while it writes it (``NAME.geosr-lock``)."""
    out = Path(output)
    return out.with_name(out.name + ".geosr-lock")


def lock_owner(output: str | Path) -> int | None:
    """The pid of the geosr run whose lock is beside ``output``; None if there is none or it is unreadable."""
    try:
        return int(json.loads(output_lock(output).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def partial_outputs(output: str | Path) -> list[Path]:
    """Temporary files geosr writes beside ``output`` while it works (``.NAME.*.geosr-part.tif`` and sidecars)."""
    out = Path(output)
    if not out.parent.is_dir():
        return []
    return sorted(out.parent.glob(f".{out.name}.*.geosr-part*"))


__all__ = ["MODELS", "MODALITIES", "GUIDANCE_MODES", "GEODATA_MODELS", "layer_file", "EnhanceOptions",
           "ModalitiesOptions", "ScoreOptions", "lock_owner", "output_lock", "partial_outputs", "partial_store"]
