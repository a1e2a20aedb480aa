"""Hyperparameter search on the pseudo-validation set (section 4.5): tau first, then K, then DDIM steps.

tau is chosen without editing ("LafitE w/o F.E.") by the mean per-category detection AUROC on the
pseudo-validation set; K is then chosen with editing at that tau. Ties go to the earlier grid entry.
Last, when ``search.ddim_steps`` lists step counts, LafitE is scored at that tau and K with each, and
the fewest steps whose detection AUROC is within ``search.steps_tolerance`` of the best step count's
are kept (the scoring cost is about proportional to the steps). With ``search.steps_patience`` n >= 1
the counts are walked fewest first and the stage stops after n consecutive counts that do not beat the
best so far by more than the tolerance: more steps cost more, so the ones not reached are the dearest
(the same rule then picks among the counts scored). With such a list, the tau and K
stages themselves run at its fewest steps (the cheapest point; the steps stage then reuses it), so
the nine or so points of the first two stages cost a fraction of a pass each instead of a pass at the
profile's steps. Every evaluated point is recorded, with the seconds it took.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Literal

from lafite_core.config import SearchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchPoint:
    stage: Literal["tau", "k", "steps"]
    tau: int
    k: int | None
    ddim_steps: int
    image_auroc: float
    pixel_auroc: float | None
    seconds: float = 0.0


@dataclass(frozen=True)
class SearchResult:
    tau: int
    k: int
    points: tuple[SearchPoint, ...]
    ddim_steps: int | None = None
    """The chosen step count; None when the search did not run (the config's scoring.ddim_steps)."""
    images: int | None = None
    """The pseudo-validation images every point was scored on (None: not recorded)."""

    def chosen(self, p: SearchPoint) -> bool:
        """Whether ``p`` is the point its stage chose."""
        if p.stage == "tau":
            return p.tau == self.tau
        if p.stage == "k":
            return p.k == self.k
        return p.ddim_steps == self.ddim_steps


def first_stages_steps(cfg: SearchConfig, ddim_steps: int) -> int:
    """The DDIM steps the tau and K stages run at: the fewest of ``cfg.ddim_steps``, or ``ddim_steps``
    (the configured scoring steps) when that list is empty."""
    return min(cfg.ddim_steps) if cfg.ddim_steps else ddim_steps


Evaluate = Callable[[int, int | None, int], tuple[float, float | None]]
"""(tau, k or None for no editing, DDIM steps) -> (mean image AUROC, mean pixel AUROC or None)."""


def search_hyperparameters(evaluate: Evaluate, cfg: SearchConfig, ddim_steps: int) -> SearchResult:
    """Grid search over ``cfg.taus`` (no editing), then ``cfg.ks`` (editing) at the best tau, both at
    the fewest of ``cfg.ddim_steps`` (at ``ddim_steps``, the configured scoring steps, when that list
    is empty), then ``cfg.ddim_steps`` at the best tau and K (the step count already scored there is
    not scored again)."""
    if not cfg.taus or not cfg.ks:
        raise ValueError("the search needs at least one tau and one K")
    points: list[SearchPoint] = []
    ddim_steps = first_stages_steps(cfg, ddim_steps)

    def run(stage: Literal["tau", "k", "steps"], tau: int, k: int | None, steps: int) -> SearchPoint:
        start = time.perf_counter()
        img, pix = evaluate(tau, k, steps)
        points.append(SearchPoint(stage, tau, k, steps, img, pix, time.perf_counter() - start))
        return points[-1]

    tau_points = [run("tau", tau, None, ddim_steps) for tau in cfg.taus]
    best_tau = max(tau_points, key=lambda p: p.image_auroc).tau
    k_points = [run("k", best_tau, k, ddim_steps) for k in cfg.ks]
    best = max(k_points, key=lambda p: p.image_auroc)
    assert best.k is not None
    chosen_steps = ddim_steps
    if cfg.ddim_steps:
        step_points: list[SearchPoint] = []
        order = sorted(cfg.ddim_steps) if cfg.steps_patience else cfg.ddim_steps
        stale = 0  # consecutive counts that did not beat the best so far by more than the tolerance
        for steps in order:
            if steps == ddim_steps:  # already scored at (best tau, best K): record it, do not rescore
                points.append(SearchPoint("steps", best_tau, best.k, steps, best.image_auroc, best.pixel_auroc, 0.0))
            else:
                run("steps", best_tau, best.k, steps)
            if step_points and points[-1].image_auroc <= max(p.image_auroc for p in step_points) + cfg.steps_tolerance:
                stale += 1
            else:
                stale = 0
            step_points.append(points[-1])
            if cfg.steps_patience and stale >= cfg.steps_patience and steps != order[-1]:
                log.info("search: DDIM steps stage stopped after %d step(s): %d count(s) in a row did not beat the "
                         "best by more than %.3f; %s not scored", steps, stale, cfg.steps_tolerance,
                         [s for s in order if s > steps])
                break
        top = max(p.image_auroc for p in step_points)
        chosen_steps = min(p.ddim_steps for p in step_points if p.image_auroc >= top - cfg.steps_tolerance)
    for stage in ("tau", "k", "steps"):
        mine = [p for p in points if p.stage == stage]
        if mine:
            log.info("search: %s stage, %d points in %.1f s", stage, len(mine), sum(p.seconds for p in mine))
    return SearchResult(best_tau, best.k, tuple(points), chosen_steps)
