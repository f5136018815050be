"""What geosr knows about a scene or tile beyond its pixels: GSD, place, date, land cover, the user's features.

:func:`describe_context` turns it into the offline caption: a structured description that states only measured
facts, e.g. "aerial image, 0.5 m per pixel, near Zuerich, Zurich, Switzerland, 2021-06-01; land cover: 46%
built-up or bare ground, 31% vegetation; user vectors: 12 buildings, 3 roads".
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np

from .base import ClassTable, SceneGrid

log = logging.getLogger(__name__)

# ISO 3166-1 alpha-2 -> short name, for the countries reverse-geocoder answers most; others print as their code
COUNTRIES = dict(item.split("=") for item in (
    "AR=Argentina AT=Austria AU=Australia BE=Belgium BG=Bulgaria BR=Brazil CA=Canada CH=Switzerland CL=Chile "
    "CN=China CO=Colombia CZ=Czechia DE=Germany DK=Denmark EE=Estonia EG=Egypt ES=Spain FI=Finland FR=France "
    "GB=United_Kingdom GR=Greece HR=Croatia HU=Hungary ID=Indonesia IE=Ireland IL=Israel IN=India IS=Iceland "
    "IT=Italy JP=Japan KE=Kenya KR=South_Korea LT=Lithuania LU=Luxembourg LV=Latvia MA=Morocco MX=Mexico "
    "MY=Malaysia NG=Nigeria NL=Netherlands NO=Norway NZ=New_Zealand PE=Peru PH=Philippines PK=Pakistan "
    "PL=Poland PT=Portugal RO=Romania RS=Serbia RU=Russia SA=Saudi_Arabia SE=Sweden SG=Singapore SI=Slovenia "
    "SK=Slovakia TH=Thailand TN=Tunisia TR=Turkey TW=Taiwan TZ=Tanzania UA=Ukraine AE=United_Arab_Emirates "
    "US=United_States VN=Vietnam ZA=South_Africa").split())
COUNTRIES = {k: v.replace("_", " ") for k, v in COUNTRIES.items()}
DATE_TAGS = ("ACQUISITIONDATETIME", "ACQUISITION_DATE", "DATE_ACQUIRED", "ACQUISITION_TIME", "DATETIME",
             "TIFFTAG_DATETIME", "DATE")  # GeoTIFF tags that may hold the acquisition date, most specific first
MIN_SHARE = 0.05  # land-cover classes under this share of the area are left out of the caption


@dataclass(kw_only=True)
class GeoContext:
    """Facts about a scene or a tile that the caption and the reasoning step may state."""

    gsd: float | None = None  # metres per pixel (mean of x and y); None without a CRS
    place: str | None = None  # "near <city>, <region>, <country>"; None when unknown
    date: str | None = None  # acquisition date, ISO "YYYY-MM-DD"; None when the file does not say
    landcover: dict[str, float] = field(default_factory=dict)  # class name -> share of the valid area, sorted
    features: dict[str, int] = field(default_factory=dict)  # user vector features inside: kind -> count
    height_range: tuple[float, float] | None = None  # DSM heights inside (1st, 99th percentile), DSM units
    lonlat: tuple[float, float] | None = None  # centre in WGS 84

    def to_dict(self) -> dict:
        return {"gsd_m": self.gsd, "place": self.place, "date": self.date, "landcover": self.landcover,
                "features": self.features, "height_range": self.height_range, "lonlat": self.lonlat}


def centre_lonlat(grid: SceneGrid) -> tuple[float, float] | None:
    if grid.crs is None:
        return None
    from rasterio.warp import transform

    cx, cy = grid.transform @ (grid.width / 2, grid.height / 2)
    xs, ys = transform(grid.crs, "EPSG:4326", [cx], [cy])
    return float(xs[0]), float(ys[0])


def ground_sample_distance(grid: SceneGrid) -> float | None:
    """Mean pixel size in metres: CRS units for projected CRSs, degrees converted at the centre for geographic."""
    if grid.crs is None:
        return None
    t = grid.transform
    gx, gy = math.hypot(t.a, t.d), math.hypot(t.b, t.e)
    if grid.crs.is_geographic:
        lonlat = centre_lonlat(grid)
        lat = math.radians(lonlat[1]) if lonlat else 0.0
        gx, gy = gx * 111_320.0 * math.cos(lat), gy * 110_574.0
    else:
        factor = grid.crs.linear_units_factor[1] if grid.crs.linear_units_factor else 1.0
        gx, gy = gx * factor, gy * factor
    return (gx + gy) / 2


def place_name(lonlat: tuple[float, float] | None) -> str | None:
    """``"near Zuerich, Zurich, Switzerland"`` from the offline ``reverse-geocoder`` table (cities > 1000 people)."""
    if lonlat is None:
        return None
    try:
        import reverse_geocoder
    except ImportError:
        log.warning("reverse-geocoder is not installed (pip install reverse-geocoder): captions name no place")
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loading formatted geocoded file..."
        hit = reverse_geocoder.search([(lonlat[1], lonlat[0])], mode=1)[0]
    city = re.sub(r"\s*\(.*?\)|\s*/.*$", "", hit.get("name", "")).strip()  # "Zuerich (Kreis 9) / Altstetten"
    parts = [p for p in (city, hit.get("admin1"), COUNTRIES.get(hit.get("cc", ""), hit.get("cc"))) if p]
    unique = [p for i, p in enumerate(parts) if p not in parts[:i]]
    return "near " + ", ".join(unique) if unique else None


def acquisition_date(tags: dict) -> str | None:
    """The acquisition date from a raster's tags, as ``YYYY-MM-DD``; None when none is recorded."""
    upper = {k.upper(): v for k, v in tags.items()}
    for key in DATE_TAGS:
        m = re.search(r"(\d{4})[-:/](\d{2})[-:/](\d{2})", str(upper.get(key, "")))
        if m:
            return "-".join(m.groups())
    return None


def landcover_shares(labels: np.ndarray, classes: ClassTable, valid: np.ndarray | None = None,
                     skip: tuple[str, ...] = ("unlabelled",)) -> dict[str, float]:
    """``(H, W)`` class map -> ``{name: share}`` over the valid pixels, largest first, rounded to 0.01."""
    values = labels[valid] if valid is not None else labels.ravel()
    if values.size == 0:
        return {}
    ids, counts = np.unique(values, return_counts=True)
    shares = {}
    for i, c in zip(ids, counts):
        name = classes.names.get(int(i), f"class {int(i)}")
        if name in skip:
            continue
        shares[name] = shares.get(name, 0.0) + c / values.size
    return {k: round(float(v), 2) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


READABLE = {"other": "built-up or bare ground", "bright": "bright roofs or pavement"}


def describe_context(ctx: GeoContext, *, kind: str = "aerial image") -> str:
    """The offline caption: every fact in ``ctx``, nothing else."""
    head = [kind]
    if ctx.gsd is not None:
        head.append(f"{ctx.gsd:.2g} m per pixel")
    if ctx.place:
        head.append(ctx.place)
    if ctx.date:
        head.append(f"acquired {ctx.date}")
    parts = [", ".join(head)]
    cover = [f"{round(100 * s)}% {READABLE.get(n, n)}" for n, s in ctx.landcover.items() if s >= MIN_SHARE]
    if cover:
        parts.append("land cover: " + ", ".join(cover))
    if ctx.features:
        present = [f"{n} {k}" for k, n in ctx.features.items() if n]
        parts.append("user vectors: " + (", ".join(present) if present else "no roads, buildings or water"))
    if ctx.height_range is not None:
        parts.append(f"surface heights {ctx.height_range[0]:.0f} to {ctx.height_range[1]:.0f} m")
    return "; ".join(parts)
