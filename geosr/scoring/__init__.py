"""Scoring: how good and how honest an SR output is, per scene and per pixel (``geosr score``).

One module per role: ``inputs`` (read, check grids), ``faithfulness`` (LR-consistency, hallucination map),
``semantic`` (land-cover IoU), ``roads`` (road graphs, APLS), ``buildings`` (orientations), ``vectors`` (layers
placed on the SR grid), ``report`` (JSON, HTML), ``lpips`` (LPIPS v0.1), and ``score.score_scene``, the entry
point. ``import geosr.scoring`` loads no torch, matplotlib or networkx.
"""

from .score import ScoreResult, score_scene

__all__ = ["ScoreResult", "score_scene"]
