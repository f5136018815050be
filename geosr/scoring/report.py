"""The reports of ``geosr score``: strict JSON with every number and setting, and one self-contained HTML file.

The HTML holds a metric table and matplotlib figures embedded as base64 PNG: before/after crops (the scene
centre and the crop where the hallucination map is highest), the hallucination map, the road graphs over the
output, and orientation rose diagrams. matplotlib is imported only here, with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import OutputError


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def write_text_atomic(path, text: str, *, overwrite: bool) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it (never replacing without overwrite)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".geosr-part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: appeared while scoring; pass --overwrite to replace it")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"{path}: write failed ({err.strerror or err}); nothing was left behind") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _worst_crop(m: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left (row, col) of the ``size``² window (stride size/2) with the highest mean of ``m``."""
    h, w = m.shape
    best, at = -1.0, (0, 0)
    step = max(1, size // 2)
    for r in range(0, max(1, h - size + 1), step):
        for c in range(0, max(1, w - size + 1), step):
            v = float(m[r:r + size, c:c + size].mean())
            if v > best:
                best, at = v, (r, c)
    return at


def _crops_figure(inp, maps, size: int) -> str:
    plt = _pyplot()

    h, w = inp.sr.shape
    size = min(size, h, w)
    centre = ((h - size) // 2, (w - size) // 2)
    worst = _worst_crop(maps["map"], size)
    lr_up = np.repeat(np.repeat(inp.lr_rgb, inp.scale, axis=0), inp.scale, axis=1)
    panels = [("LR (pixels repeated)", lr_up), ("SR output", inp.sr_rgb)]
    if inp.ref_rgb is not None:
        panels.append(("reference", inp.ref_rgb))
    panels.append(("hallucination map", maps["map"]))
    vmax = float(np.percentile(maps["map"], 99)) or 1.0
    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 6.6), squeeze=False)
    for row, ((r, c), label) in enumerate(((centre, "centre"), (worst, "highest map"))):
        for col, (title, img) in enumerate(panels):
            ax = axes[row, col]
            crop = img[r:r + size, c:c + size]
            if crop.ndim == 2:
                ax.imshow(crop, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            else:
                ax.imshow(crop, interpolation="nearest")
            ax.set_title(f"{title}\n{label} (row {r}, col {c})", fontsize=8)
            ax.axis("off")
    return _png(fig)


def _display(img: np.ndarray, limit: int = 900) -> tuple[np.ndarray, int]:
    f = max(1, int(np.ceil(max(img.shape[:2]) / limit)))
    return img[::f, ::f], f


def _map_figure(maps) -> str:
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    vmax = float(np.percentile(maps["map"], 99)) or 1.0
    for ax, name in zip(axes, ("map", "residual", "detail")):
        img, _ = _display(maps[name])
        im = ax.imshow(img, cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, label="luma levels")
    return _png(fig)


def _roads_figure(inp, graphs) -> str:
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    from .roads import segments

    img, f = _display(inp.sr_rgb)
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(img)
    for name, colour in (("reference", "#00e5ff"), ("output", "#ff2d55")):
        g = graphs.get(name)
        if g is None or g.number_of_edges() == 0:
            continue
        seg = segments(g).copy()  # (E, 2, 2) frame -> display px
        seg[..., 0] = seg[..., 0] / inp.pixel_m[0] / f
        seg[..., 1] = -seg[..., 1] / inp.pixel_m[1] / f
        ax.add_collection(LineCollection(seg, colors=colour, linewidths=1.6 if name == "reference" else 1.0,
                                         label=name, alpha=0.9))
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(0, img.shape[1])
    ax.set_ylim(img.shape[0], 0)
    ax.axis("off")
    ax.set_title("road graphs: reference (cyan), output (red)", fontsize=9)
    return _png(fig)


def _rose_figure(b: dict) -> str:
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, subplot_kw={"projection": "polar"}, figsize=(8, 4))
    for ax, key, title in zip(axes, ("histogram_reference", "histogram_output"), ("reference", "output")):
        h = np.asarray(b[key], dtype=np.float64)
        n = len(h)
        width = np.radians(90.0 / n)
        theta = np.radians((np.arange(n) + 0.5) * 90.0 / n)
        for quarter in range(4):  # the 90°-periodic histogram drawn all round
            ax.bar(theta + quarter * np.pi / 2, h, width=width, color="#4477aa", edgecolor="white", linewidth=0.3)
        ax.set_title(f"{title} orientations", fontsize=9)
        ax.set_yticklabels([])
    return _png(fig)


# -------------------------------------------------------------------------------------------------- HTML


def _rows(report: dict) -> list[tuple[str, str, str]]:
    def num(v, fmt="{:.4f}"):
        return "–" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))

    fr, fa, se, ro, bu = (report.get(k, {}) for k in ("full_reference", "faithfulness", "semantic", "roads",
                                                        "buildings"))
    rows = [
        ("full reference", "PSNR-Y (dB)", num(fr.get("psnr_y"), "{:.2f}")),
        ("full reference", "SSIM-Y", num(fr.get("ssim_y"))),
        ("full reference", f"LPIPS ({fr.get('lpips_net', 'alex')}) ↓", num(fr.get("lpips"))),
        ("full reference", "DISTS ↓", num(fr.get("dists"))),
        ("full reference", "pyiqa PSNR-Y (dB) / SSIM-Y",
         f"{num(fr.get('pyiqa_psnr_y'), '{:.2f}')} / {num(fr.get('pyiqa_ssim_y'))}"),
        *(("no reference", name.upper() + (" ↓" if name == "niqe" else ""), num(v))
          for name, v in report.get("no_reference", {}).get("values", {}).items()),
        ("faithfulness", "LR-consistency (dB)", num(fa.get("lr_consistency_db"), "{:.2f}")),
        ("faithfulness", "hallucination map mean / p95 ↓",
         f"{num(fa['map'].get('map_mean'), '{:.2f}')} / {num(fa['map'].get('map_p95'), '{:.2f}')}"),
        ("faithfulness", "residual mean / detail mean",
         f"{num(fa['map'].get('residual_mean'), '{:.2f}')} / {num(fa['map'].get('detail_mean'), '{:.2f}')}"),
        ("semantic", f"mean IoU vs {se.get('against')}", num(se.get("mean_iou"))),
        ("roads", f"APLS vs {ro.get('against')}", num(ro.get("apls"))),
        ("roads", "components reference / output",
         f"{ro['reference_graph']['components']} / {ro['output_graph']['components']}"),
        ("buildings", f"median |angle error| (deg) vs {bu.get('against')}",
         num(bu.get("angle_error_median_abs_deg"), "{:.2f}")),
        ("buildings", "matched one to one / oriented / reference / output",
         f"{bu.get('matched')} / {bu.get('oriented')} / {bu.get('reference_buildings')} / "
         f"{bu.get('output_buildings')}"),
        ("buildings", "orientation histogram intersection", num(bu.get("histogram_intersection"))),
        ("buildings", "dominant orientation shift (deg)", num(bu.get("dominant_shift_deg"), "{:.2f}")),
    ]
    for name in ("full_reference", "no_reference", "roads", "buildings"):
        if report.get(name, {}).get("note"):
            rows.append((name.replace("_", " "), "note", report[name]["note"]))
    return rows


def to_html(result, inp, config) -> str:
    report = result.report
    table = "\n".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                      for a, b, c in _rows(report))
    figures = [("Before / after", _crops_figure(inp, result.maps, config.crop_px)),
               ("Hallucination map (map = residual + detail)", _map_figure(result.maps)),
               ("Road graphs", _roads_figure(inp, result.road_graphs)),
               ("Building orientations", _rose_figure(report["buildings"]))]
    body = "\n".join(f"<h2>{html.escape(t)}</h2><img alt=\"{html.escape(t)}\" src=\"data:image/png;base64,{png}\">"
                     for t, png in figures)
    settings = html.escape(json.dumps(report["settings"], indent=1))
    inputs = html.escape(json.dumps(report["inputs"], indent=1))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>geosr score: {html.escape(str(report['inputs']['sr']))}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}}td{{padding:2px 10px;border-bottom:1px solid #ddd}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:6px}}</style></head><body>
<h1>geosr score</h1>
<table><tr><th>group</th><th>metric</th><th>value</th></tr>
{table}
</table>
{body}
<h2>Inputs</h2><pre>{inputs}</pre>
<h2>Settings</h2><pre>{settings}</pre>
</body></html>
"""
