"""The batch-scoring report: counts, decisions and score histograms per category against the threshold,
the most anomalous images with their heat maps, and the errors.

:func:`build` is pure; :func:`load` reads the run's score table (and ``run.json``, the counts the flow
recorded, since images skipped as already scored leave no row), and the top images and their overlays
from their URLs; :func:`write` puts the report under ``reports/<run_id>/``.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field

import numpy as np

from lafite_core.report.counts import NO_CATEGORY, BatchCounts, count_by_category
from lafite_core.report.figures import (crop_to_window, display_size, histogram_figure, model_window,
                                        read_display_image, resized_png)
from lafite_core.report.page import Page, esc, write_files
from lafite_core.store import layout
from lafite_core.store.storage import Store

RUN_FILE = "run.json"  # the run's counts and model version, beside index.html
TOP_N = 8  # most anomalous images shown per category
MAX_ERRORS = 500  # error rows listed; the rest are counted
PANEL_HEIGHT = 180
PANEL_MAX_WIDTH = 400


@dataclass(frozen=True)
class Preview:
    """A top image for the report: the file's pixels [H, W, 3] and its overlay [S, S, 3] (RGB uint8), if readable."""

    image: np.ndarray | None
    heatmap: np.ndarray | None


@dataclass(frozen=True)
class BatchInputs:
    run_id: str
    model_version: str
    rows: list[dict]  # SCORES_SCHEMA rows of the run's table (empty when it scored nothing new)
    counts: BatchCounts | None  # None for runs that recorded none
    previews: dict[str, Preview] = field(default_factory=dict)  # image URL -> preview


def score_of(row: dict) -> float:
    """The score a row is ranked by: normalised (1 at the threshold) where calibrated, else raw."""
    return row["raw_score"] if row["normalized_score"] is None else row["normalized_score"]


def most_anomalous(rows: list[dict], n: int) -> dict[str, list[dict]]:
    """category (or NO_CATEGORY) -> its ``n`` highest-scoring rows without an error, highest first."""
    out: dict[str, list[dict]] = {}
    for r in sorted((r for r in rows if r["error"] is None), key=score_of, reverse=True):
        top = out.setdefault(r["category"] or NO_CATEGORY, [])
        if len(top) < n:
            top.append(r)
    return dict(sorted(out.items()))


def _counts(page: Page, inp: BatchInputs) -> None:
    page.section("counts")
    ok = [r for r in inp.rows if r["error"] is None]
    errors = len(inp.rows) - len(ok)
    c = inp.counts
    facts: list[tuple[str, object]] = [("run", inp.run_id), ("model version", inp.model_version)]
    if c is not None:
        facts += [("images listed", c.listed), ("scored", c.scored), ("skipped (already scored)", c.skipped),
                  ("errors", c.errors)]
    else:
        facts += [("scored", len(ok)), ("errors", errors), ("skipped", "not recorded for this run")]
    methods = sorted({r["method"] for r in inp.rows})
    if methods:
        facts.append(("method", ", ".join(methods)))
    if c is not None and len(inp.rows) != c.scored + c.errors:
        facts.append(("rows in the table", f"{len(inp.rows)} (with those of crashed runs this run merged)"))
    page.facts(facts)
    if not inp.rows:
        page.missing("this run scored nothing new: no score table was written")
        return
    highest = {cat: score_of(rs[0]) for cat, rs in most_anomalous(inp.rows, 1).items()}
    page.table(["category", "scored", "anomalous", "normal", "errors", "highest score"],
               [(c.category, c.scored, c.anomalous, c.normal, c.errors,
                 f"{highest[c.category]:.3g}" if c.category in highest else "-") for c in count_by_category(inp.rows)])


def _histograms(page: Page, rows: list[dict]) -> None:
    page.section("scores per category")
    ok = [r for r in rows if r["error"] is None]
    if not ok:
        page.missing("no image was scored")
        return
    by: dict[str, list[dict]] = {}
    for r in ok:
        by.setdefault(r["category"] or NO_CATEGORY, []).append(r)
    for i, (cat, rs) in enumerate(sorted(by.items())):
        calibrated = all(r["normalized_score"] is not None for r in rs)
        scores = np.array([score_of(r) for r in rs])
        decided = ([(d, scores[[r["decision"] == d for r in rs]]) for d in ("normal", "anomalous")] if calibrated
                   else [("scored", scores)])
        png = histogram_figure(f"{cat}: {len(rs)} images", decided, 1.0 if calibrated else None,
                               "normalised score (threshold 1)" if calibrated else "raw score (not calibrated)")
        page.add(page.image(f"hist{i}", png, f"score histogram of {cat}"))


def _top(page: Page, rows: list[dict], previews: dict[str, Preview], n: int) -> None:
    page.section(f"most anomalous images (top {n} per category)")
    top = most_anomalous(rows, n)
    if not top:
        page.missing("no image was scored")
        return
    if not any(r["heatmap_url"] for rs in top.values() for r in rs):
        page.missing("no heat maps: run `lafite score ... --heatmaps` to have them")
    for i, (cat, rs) in enumerate(top.items()):
        page.add(f"<h3>{esc(cat)}</h3><p>each: image | heat map</p>")
        strips = []
        for j, r in enumerate(rs):
            p = previews.get(r["image_url"], Preview(None, None))
            shape = p.image.shape if p.image is not None else p.heatmap.shape if p.heatmap is not None else None
            imgs = ""
            if shape is not None:
                size = display_size(shape[1], shape[0], PANEL_HEIGHT, PANEL_MAX_WIDTH)
                for kind, pixels in (("image", p.image), ("heatmap", p.heatmap)):
                    if pixels is not None:
                        imgs += page.image(f"top{i}_{j}_{kind}", resized_png(pixels, size),
                                           f"{kind} of {posixpath.basename(r['image_url'])}", css="", width=size[0])
            decision = f", {r['decision']}" if r["decision"] else ""
            strips.append(f'<div class="strip">{imgs}<div class="caption">{esc(r["image_url"])}: score '
                          f"{score_of(r):.3g}{esc(decision)}{'' if imgs else ' (image unreadable)'}</div></div>")
        page.add("".join(strips))


def _errors(page: Page, rows: list[dict]) -> None:
    page.section("errors")
    bad = [r for r in rows if r["error"] is not None]
    if not bad:
        page.add("<p>none</p>")
        return
    page.table(["image", "error"], [(r["image_url"], r["error"]) for r in bad[:MAX_ERRORS]], left=2)
    if len(bad) > MAX_ERRORS:
        page.missing(f"and {len(bad) - MAX_ERRORS} more (see the score table's error column)")


def build(inp: BatchInputs, top_n: int = TOP_N) -> dict[str, bytes]:
    """The report's files: ``index.html`` (images embedded), ``images/<name>.png`` and ``run.json``."""
    page = Page(f"batch scoring {inp.run_id}")
    _counts(page, inp)
    _histograms(page, inp.rows)
    _top(page, inp.rows, inp.previews, top_n)
    _errors(page, inp.rows)
    files = page.files()
    if inp.counts is not None:
        files[RUN_FILE] = json.dumps(asdict(inp.counts), indent=2).encode()
    return files


def load(store: Store, version: str, run_id: str, counts: BatchCounts | None = None,
         top_n: int = TOP_N) -> BatchInputs:
    """The inputs of a batch run's report; ``counts`` default to the run's ``run.json`` when it has one."""
    table = layout.scores(version, f"{run_id}.parquet")
    rows = store.read_table(*table).to_pylist() if store.exists(*table) else []
    if counts is None and store.exists(*layout.report(run_id, RUN_FILE)):
        counts = BatchCounts(**store.read_json(*layout.report(run_id, RUN_FILE)))
    previews = {}
    window = model_window(store, version)
    for rs in most_anomalous(rows, top_n).values():
        for r in rs:
            image = read_display_image(r["image_url"])
            previews[r["image_url"]] = Preview(None if image is None else crop_to_window(image, window),
                                               read_display_image(r["heatmap_url"]) if r["heatmap_url"] else None)
    return BatchInputs(run_id, version, rows, counts, previews)


def write(store: Store, version: str, run_id: str, counts: BatchCounts | None = None) -> str:
    """Build and write the report of batch run ``run_id``; returns the URL of its index.html."""
    return write_files(store, run_id, build(load(store, version, run_id, counts)))
