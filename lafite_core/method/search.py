"""Hyperparameter search on the pseudo-validation set (section 4.5): tau first, then K.

tau is chosen without editing ("LafitE w/o F.E.") by the mean per-category detection AUROC on the
pseudo-validation set; K is then chosen with editing at that tau. Ties go to the earlier grid entry.
Every evaluated point is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from lafite_core.config import SearchConfig


@dataclass(frozen=True)
class SearchPoint:
    stage: Literal["tau", "k"]
    tau: int
    k: int | None
    image_auroc: float
    pixel_auroc: float | None


@dataclass(frozen=True)
class SearchResult:
    tau: int
    k: int
    points: tuple[SearchPoint, ...]


Evaluate = Callable[[int, int | None], tuple[float, float | None]]
"""(tau, k or None for no editing) -> (mean image AUROC, mean pixel AUROC or None)."""


def search_hyperparameters(evaluate: Evaluate, cfg: SearchConfig) -> SearchResult:
    """Grid search over ``cfg.taus`` (no editing), then ``cfg.ks`` (editing) at the best tau."""
    if not cfg.taus or not cfg.ks:
        raise ValueError("the search needs at least one tau and one K")
    points: list[SearchPoint] = []
    for tau in cfg.taus:
        img, pix = evaluate(tau, None)
        points.append(SearchPoint("tau", tau, None, img, pix))
    best_tau = max((p for p in points), key=lambda p: p.image_auroc).tau
    k_points: list[SearchPoint] = []
    for k in cfg.ks:
        img, pix = evaluate(best_tau, k)
        k_points.append(SearchPoint("k", best_tau, k, img, pix))
    best_k = max(k_points, key=lambda p: p.image_auroc).k
    assert best_k is not None
    return SearchResult(best_tau, best_k, tuple(points + k_points))
