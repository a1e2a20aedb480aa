"""The evaluation report: metrics, chosen settings, curves, score histograms, a gallery, search and loss.

:func:`build` is pure (inputs in, {relative path: bytes} out); :func:`load` reads its inputs from the
store (the metrics table, the model version's card, calibration, search table and loss curve, the
evidence the evaluation kept, and the gallery's original images from their URLs); :func:`write`
puts the report under ``reports/<run_id>/``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import numpy as np

from lafite_core.method.calibration import Calibration
from lafite_core.method.metrics import auroc, average_precision, pr_curve, roc_curve
from lafite_core.report.evidence import CategoryEvidence, Curve, GalleryItem, GalleryRole
from lafite_core.report.figures import (
    crop_to_window, curves_figure, display_size, gallery_panels, histogram_figure, loss_figure, model_window,
    read_display_image, search_figure,
)
from lafite_core.report.page import Page, esc, pct, write_files
from lafite_core.stages import CALIBRATION_FILE, CARD_FILE, SEARCH_FILE
from lafite_core.store import layout
from lafite_core.store.losses import read_losses
from lafite_core.store.storage import Store
from lafite_core.store.tables import METRIC_COLUMNS, summarize_metrics

PANEL_HEIGHT = 180  # px of each gallery panel; wide images are narrowed to PANEL_MAX_WIDTH instead
PANEL_MAX_WIDTH = 400

ROLE_TITLES: dict[GalleryRole, str] = {
    "top_anomaly": "highest-scoring anomalies",
    "false_alarm": "highest-scoring normal images (false alarms where above the threshold)",
    "miss": "lowest-scoring anomalies (misses where below the threshold)",
}


@dataclass(frozen=True)
class EvaluationInputs:
    """Everything the report shows; ``originals`` maps a gallery image's URL to its RGB pixels [H, W, 3]."""

    run_id: str
    model_version: str
    metrics: list[dict]  # METRICS_SCHEMA rows
    card: dict  # the version's model_card.json
    calibration: Calibration | None
    search: list[dict]  # SEARCH_SCHEMA rows
    losses: np.ndarray | None  # [E]
    evidence: list[CategoryEvidence]
    originals: dict[str, np.ndarray] = field(default_factory=dict)


def _settings(page: Page, inp: EvaluationInputs) -> None:
    card = inp.card
    page.section("model and chosen settings")
    facts = [("run", inp.run_id), ("model version", inp.model_version),
             ("tau (noise step)", card.get("tau", "-")), ("K (neighbours)", card.get("k", "-")),
             ("DDIM steps", card.get("ddim_steps", "-")),
             ("threshold (raw image score, all categories)", _num(card.get("threshold")))]
    facts += [(k.replace("_", " "), card[k]) for k in ("config_hash", "trained_epochs", "device", "precision",
                                                       "train_images") if k in card]
    if "backbone" in card:
        facts.append(("backbone", card["backbone"].get("name", "-")))
    page.facts(facts)
    if inp.calibration and inp.calibration.per_category:
        page.add("<p>per-category thresholds (calibrated on held-out normals and synthesised anomalies):</p>")
        page.table(["category", "threshold", "normal median", "balanced accuracy", "normals", "anomalies"],
                   [(k, _num(c.threshold), _num(c.normal_median), f"{c.balanced_accuracy:.3f}", c.num_normal,
                     c.num_anomalous) for k, c in sorted(inp.calibration.per_category.items())])


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _metrics(page: Page, rows: list[dict]) -> None:
    page.section("metrics (%)")
    head = ["category", "method", "image AUROC", "image AP", "pixel AUROC", "pixel AP", "AUPRO", "images", "failed"]
    body = [(f"{r['dataset']}/{r['category']}", r["method"], *(pct(r[c]) for c in METRIC_COLUMNS), r["num_images"],
             r["num_failed"]) for r in rows]
    classes = [""] * len(body)
    summary: dict[tuple[str, str], dict[str, float | None]] = {}
    for s in summarize_metrics(rows):
        summary.setdefault((s.dataset, s.method), {})[s.metric] = s.mean
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for ds in [*(datasets if len(datasets) > 1 else []), "all"]:
        for method in dict.fromkeys(r["method"] for r in rows):
            means = summary.get((ds, method))
            if means:
                body.append((f"mean ({ds})", method, *(pct(means[c]) for c in METRIC_COLUMNS), "", ""))
                classes.append("mean")
    page.table(head, body, left=2, classes=classes)


def _pr(labels: np.ndarray, scores: np.ndarray) -> Curve:
    c = pr_curve(labels, scores)
    return Curve(c.recall, c.precision)


def _curves(page: Page, ev: CategoryEvidence, rows: dict[str, dict], slug: str) -> None:
    panels: list[tuple[str, str, str, list[tuple[str, Curve]]]] = []
    if len(np.unique(ev.labels)) == 2:
        roc = [(f"{m} ({pct(auroc(ev.labels, s))})", Curve(*roc_curve(ev.labels, s)[:2])) for m, s in ev.scores.items()]
        pr = [(f"{m} ({pct(average_precision(ev.labels, s))})", _pr(ev.labels, s)) for m, s in ev.scores.items()]
        panels += [("image ROC", "false positive rate", "true positive rate", roc),
                   ("image PR", "recall", "precision", pr)]
    if ev.pixel_roc:
        panels += [
            ("pixel ROC", "false positive rate", "true positive rate",
             [(f"{m} ({pct(rows.get(m, {}).get('pixel_auroc'))})", c) for m, c in ev.pixel_roc.items()]),
            ("pixel PR", "recall", "precision",
             [(f"{m} ({pct(rows.get(m, {}).get('pixel_ap'))})", c) for m, c in ev.pixel_pr.items()])]
    if not panels:
        page.missing("no curves: the test set has only one class and no masks")
        return
    page.add(page.image(f"{slug}_curves", curves_figure(f"{ev.key}: AUROC / AP in %", panels),
                        f"ROC and PR curves of {ev.key}"))
    if not ev.pixel_roc:
        page.missing("no pixel-level curves: this category has no masks (or no defect pixels)")


def _histogram(page: Page, ev: CategoryEvidence, calibration: Calibration | None, slug: str) -> None:
    s = ev.scores[ev.gallery_method]
    calibrated = calibration is not None and calibration.method == ev.gallery_method
    threshold = calibration.cut_for(ev.key).threshold if calibrated else None
    png = histogram_figure(f"{ev.key}: {ev.gallery_method} image scores",
                           [("normal", s[ev.labels == 0]), ("anomalous", s[ev.labels == 1])], threshold,
                           "raw image score")
    page.add(page.image(f"{slug}_hist", png, f"image score histogram of {ev.key}"))


def _scale(ev: CategoryEvidence, calibration: Calibration | None) -> tuple[float, float]:
    """Heat-map colour range: the batch overlays' (normal median -> 0, threshold at the middle) when the
    gallery method is the calibrated one, else the 1st to 99th percentile of the gallery's maps."""
    if calibration is not None and calibration.method == ev.gallery_method:
        cut = calibration.cut_for(ev.key)
        return cut.normal_median, 2 * cut.threshold - cut.normal_median
    values = np.concatenate([g.amap.ravel() for g in ev.gallery])
    return float(np.percentile(values, 1)), float(np.percentile(values, 99))


def _gallery_item(page: Page, ev: CategoryEvidence, g: GalleryItem, calibration: Calibration | None,
                  originals: dict[str, np.ndarray], low: float, high: float, name: str) -> str:
    url = str(ev.urls[g.index])
    width, height = (int(v) for v in ev.original_sizes[g.index])
    original = originals.get(url)
    base = original if original is not None else g.image  # the model's square input, stretched back
    size = display_size(width, height, PANEL_HEIGHT, PANEL_MAX_WIDTH)
    panels = gallery_panels(base, g.amap, g.mask, size, low, high)
    imgs = "".join(page.image(f"{name}_{kind}", png, f"{kind} of {posixpath.basename(url)}", css="", width=size[0])
                   for kind, png in zip(("image", "heatmap", "mask"), panels))
    score = float(ev.scores[ev.gallery_method][g.index])
    verdict = ""
    if calibration is not None and calibration.method == ev.gallery_method:
        cut = calibration.cut_for(ev.key)
        verdict = (f", normalised {cut.normalize(score):.2f} "
                   f"({'above' if score >= cut.threshold else 'below'} the threshold)")
    note = "" if original is not None else " (original unreadable: the model's input is shown)"
    return (f'<div class="strip">{imgs}<div class="caption">{esc(posixpath.basename(url))}: '
            f"{esc(ev.defect_types[g.index])}, score {score:.4g}{esc(verdict)}{esc(note)}"
            f"{'' if g.mask is not None else ', no mask'}</div></div>")


def _gallery(page: Page, ev: CategoryEvidence, calibration: Calibration | None, originals: dict[str, np.ndarray],
             slug: str) -> None:
    if not ev.gallery:
        page.missing("no gallery images were kept for this category")
        return
    low, high = _scale(ev, calibration)
    page.add(f"<p>each: image | heat map ({esc(ev.gallery_method)}) | mask, at the image's own aspect ratio</p>")
    for role, title in ROLE_TITLES.items():
        items = [(i, g) for i, g in enumerate(ev.gallery) if g.role == role]
        page.add(f"<h4>{esc(title)}</h4>")
        if not items:
            page.missing("none in this test set")
            continue
        page.add("".join(_gallery_item(page, ev, g, calibration, originals, low, high, f"{slug}_g{i}")
                         for i, g in items))


def _search(page: Page, points: list[dict]) -> None:
    page.section("pseudo-validation search")
    if not points:
        page.missing("no search points: the search was disabled (tau and K came from the config)")
        return
    page.add(page.image("search", search_figure(points), "pseudo-validation search curves"))
    page.table(["stage", "tau", "K", "DDIM steps", "image AUROC", "pixel AUROC", "images", "seconds", "chosen"],
               [(p["stage"], p["tau"], "-" if p["k"] is None else p["k"], p["ddim_steps"], pct(p["image_auroc"]),
                 pct(p["pixel_auroc"]), "-" if p.get("images") is None else p["images"], f"{p['seconds']:.1f}",
                 "yes" if p["chosen"] else "")
                for p in points])


def _loss(page: Page, losses: np.ndarray | None) -> None:
    page.section("training loss")
    if losses is None or not len(losses):
        page.missing("no loss curve stored with this model version")
        return
    page.add(page.image("loss", loss_figure(losses), "training loss per epoch"))
    page.facts([("epochs", len(losses)), ("final loss", f"{losses[-1]:.5g}")])


def build(inp: EvaluationInputs) -> dict[str, bytes]:
    """The report's files: ``index.html`` (images embedded) and ``images/<name>.png``."""
    page = Page(f"evaluation {inp.run_id}")
    _settings(page, inp)
    _metrics(page, inp.metrics)
    evidence = {e.key: e for e in inp.evidence}
    categories = list(dict.fromkeys(f"{r['dataset']}/{r['category']}" for r in inp.metrics))
    for i, key in enumerate(categories):
        page.section(f"category {key}")
        ev = evidence.get(key)
        if ev is None:
            page.missing("no per-image scores were kept for this category (evaluated before reports existed?)")
            continue
        rows = {r["method"]: r for r in inp.metrics if f"{r['dataset']}/{r['category']}" == key}
        slug = f"c{i}"
        page.add(f"<p>{len(ev.labels)} test images: {int((ev.labels == 0).sum())} normal, "
                 f"{int((ev.labels == 1).sum())} anomalous</p>")
        _curves(page, ev, rows, slug)
        _histogram(page, ev, inp.calibration, slug)
        page.add("<h3>gallery</h3>")
        _gallery(page, ev, inp.calibration, inp.originals, slug)
    _search(page, inp.search)
    _loss(page, inp.losses)
    return page.files()


def load(store: Store, run_id: str) -> EvaluationInputs:
    """The inputs of an evaluation run's report, from the store (and the gallery's originals)."""
    metrics = store.read_table(*layout.metrics_table(run_id)).to_pylist()
    if not metrics:
        raise ValueError(f"evaluation run {run_id} has an empty metrics table: nothing to report")
    version = metrics[0]["model_version"]
    card = store.read_json(*layout.model_file(version, CARD_FILE))
    calibration = Calibration.from_json(store.read_json(*layout.model_file(version, CALIBRATION_FILE)))
    search = (store.read_table(*layout.model_file(version, SEARCH_FILE)).to_pylist()
              if store.exists(*layout.model_file(version, SEARCH_FILE)) else [])
    losses = None
    for parts in (layout.model_file(version, layout.LOSSES_FILE), layout.staged(card["run_id"], layout.LOSSES_FILE)):
        if store.exists(*parts):  # versions published before losses.pt was: their training run's staged copy
            losses = read_losses(store.read_bytes(*parts))
            break
    evidence = []
    for ds, cat in dict.fromkeys((r["dataset"], r["category"]) for r in metrics):
        if store.exists(*layout.evidence(run_id, ds, cat)):
            evidence.append(CategoryEvidence.from_bytes(store.read_bytes(*layout.evidence(run_id, ds, cat))))
    window = model_window(store, version)
    originals = {}
    for ev in evidence:
        for g in ev.gallery:
            url = str(ev.urls[g.index])
            if url not in originals and (img := read_display_image(url)) is not None:
                originals[url] = crop_to_window(img, window)  # all of it unless data.center_crop < 1
    return EvaluationInputs(run_id, version, metrics, card, calibration, search, losses, evidence, originals)


def write(store: Store, run_id: str) -> str:
    """Build and write the report of evaluation run ``run_id``; returns the URL of its index.html."""
    return write_files(store, run_id, build(load(store, run_id)))
