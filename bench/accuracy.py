"""Accuracy benchmark: the paper's table (Table 1 format) and its Figure 6 question, on any MVTec-layout root.

For every seed, one multi-class model is fitted on the train/good images of all categories
(``lafite_core.pipeline.fit``, pseudo-validation search included) and every category's test set is
scored with LafitE, LafitE without feature editing and the PatchCore-style baseline. Reported per
category and method: detection (image) and localisation (pixel) AUROC and AP, and AUPRO; the mean
and the inter-category (population) std; each as mean +- sample std over seeds.

Figure 6 question: is the tau/K picked on the pseudo-validation set the one the real test set would
pick? The test features are extracted once; the test set is scored at every tau of the search grid
without editing, and at every K with editing at the chosen tau, exactly as the search does on the
pseudo-validation set. Both curves (mean per-category detection AUROC) are reported side by side.

    .venv/bin/python bench/accuracy.py                       # ../shared/data, the cpu profile as it is, seeds 0 1 2
    .venv/bin/python bench/accuracy.py --max-steps 400 --seeds 0 --curves none   # a quick ablation point
    .venv/bin/python bench/accuracy.py --quick               # smoke run: tiny U-Net, 2 epochs, 1 seed
    .venv/bin/python bench/accuracy.py --data-root /data/mvtec --set diffusion.epochs=300

Writes ``<out>.md`` (the tables, also printed), ``<out>_metrics.parquet`` (one row per seed,
category and method, the store's metrics schema) and ``<out>_hyperparameters.parquet`` (both
curves per seed). ``<out>`` defaults to ``bench/results/accuracy`` (``accuracy_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from common import SHARED_DATA, Ticker, machine, merge, out_stem, parse_set, write_text
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.config import PipelineConfig, config_hash, load_profile
from lafite_core.datapath.data import Category, LoadedSample, discover, read_bytes
from lafite_core.datapath.features import extract
from lafite_core.method.metrics import auroc, mean_std_over_seeds, summarize
from lafite_core.method.model import Scorer
from lafite_core.pipeline import fit
from lafite_core.stages import CategoryScores, image_seed, load_all, measure, warn_cropped_defects
from lafite_core.method.scoring import METHODS, AnomalyMaps, Method, window_max
from lafite_core.method.search import first_stages_steps
from lafite_core.store.storage import Store, content_hash
from lafite_core.store.tables import metrics_table

log = logging.getLogger("bench.accuracy")

QUICK = {
    "diffusion": {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_resolutions": (),
                  "epochs": 2, "batch_size": 8, "lr": 1e-3},
    "search": {"taus": (50, 200), "ks": (1, 3)},
    "scoring": {"ddim_steps": 2},
}
QUICK_MAX_TRAIN, QUICK_MAX_TEST = 20, 24
METHOD_NAMES = {"lafite": "LafitE", "lafite_no_edit": "LafitE w/o F.E.", "patchcore": "PatchCore"}

CURVES_SCHEMA = pa.schema([
    ("seed", pa.int64()),
    ("curve", pa.string()),  # "tau" (no editing), "k" (editing at the chosen tau) or "steps" (DDIM steps)
    ("split", pa.string()),  # "pseudo_validation" or "test"
    ("tau", pa.int64()),
    ("k", pa.int64()),
    ("ddim_steps", pa.int64()),
    ("image_auroc", pa.float64()),  # mean over categories
    ("pixel_auroc", pa.float64()),  # pseudo-validation only
    ("chosen", pa.bool_()),  # the pseudo-validation choice
    ("test_best", pa.bool_()),  # the best point on the test curve
])


# --------------------------------------------------------------------------- test features, once


@dataclass
class TestSet:
    """One category's readable test images and their raw features [N, D, h, w]."""

    category: Category
    loaded: list[LoadedSample]
    features: torch.Tensor
    labels: np.ndarray  # [N] 0/1
    overlap: int  # test files byte-identical to a train/good file of the category


def evenly(items: tuple, limit: int | None) -> tuple:
    """At most ``limit`` items, evenly spaced over the sequence (all of them when limit is None)."""
    if limit is None or len(items) <= limit:
        return items
    return tuple(items[i] for i in np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int)))


def subset(c: Category, max_train: int | None, max_test: int | None) -> Category:
    return dataclasses.replace(c, train=evenly(c.train, max_train), test=evenly(c.test, max_test))


def load_test_sets(categories: list[Category], cfg: PipelineConfig, extractor: FeatureExtractor) -> list[TestSet]:
    out = []
    for c in categories:
        if not c.test:
            log.warning("%s has no test images; left out", c.key)
            continue
        loaded, failures = load_all(c.test, cfg)
        for f in failures:
            log.warning("unreadable test image left out: %s", f.error)
        warn_cropped_defects(c.key, loaded, cfg.data.center_crop)
        train_hashes = {content_hash(read_bytes(s.url)) for s in c.train}
        overlap = sum(s.content_hash in train_hashes for s in loaded)
        if overlap:
            log.warning("%s: %d test images are byte-identical to train/good images; its figures are not "
                        "a valid accuracy measurement", c.key, overlap)
        feats = torch.from_numpy(extract(extractor, [s.image for s in loaded]))
        out.append(TestSet(c, loaded, feats, np.array([s.sample.label for s in loaded]), overlap))
    return out


# --------------------------------------------------------------------------- one seed


@dataclass
class CurvePoint:
    curve: str
    split: str
    tau: int
    k: int | None
    image_auroc: float
    pixel_auroc: float | None
    ddim_steps: int | None = None

    def value(self) -> int | None:
        """The grid value this point's curve varies."""
        return {"tau": self.tau, "k": self.k, "steps": self.ddim_steps}[self.curve]


@dataclass
class SeedResult:
    seed: int
    config: PipelineConfig
    rows: list[dict]
    curves: list[CurvePoint]
    tau: int
    k: int
    searched: bool
    timings: dict[str, float]
    ddim_steps: int = 0
    # detection AUROC per (method, image score) and "dataset/category", from the same maps
    image_scores: dict[tuple[str, str], dict[str, float]] = dataclasses.field(default_factory=dict)
    # scoring.position_norm: LafitE's metrics rows from the same model and point without its position statistics
    unstandardized: list[dict] = dataclasses.field(default_factory=list)

    def chosen(self, curve: str) -> int:
        return {"tau": self.tau, "k": self.k, "steps": self.ddim_steps}[curve]


def mean_image_auroc(tests: list[TestSet], outs: list[AnomalyMaps]) -> float:
    """Mean over categories with both labels of the detection AUROC."""
    vals = [auroc(t.labels, o.scores.numpy()) for t, o in zip(tests, outs) if len(np.unique(t.labels)) == 2]
    return float(np.mean(vals)) if vals else float("nan")


def test_rows(scorer: Scorer, tests: list[TestSet], methods: Sequence[Method] = METHODS,
              cached: dict[str, list[AnomalyMaps]] | None = None) -> list[dict]:
    """Every test set scored with ``methods`` (outputs in ``cached`` are reused) -> one metrics row (the
    store's schema) per category and method."""
    cfg = scorer.model.config
    cached = dict(cached or {})
    for method in methods:
        if method not in cached:
            cached[method] = [scorer.score(ts.features, method, [image_seed(cfg.seed, s.content_hash) for s in ts.loaded])
                              for ts in tests]
    rows = []
    for i, ts in enumerate(tests):
        cs = CategoryScores(ts.category, ts.loaded, {m: cached[m][i].scores.numpy() for m in methods},
                            {m: cached[m][i].maps.numpy() for m in methods})
        for r in measure(cs, methods, cfg, len(ts.category.test) - len(ts.loaded)):
            rows.append({"run_id": None, "model_version": None, **r.record(), "created": datetime.now(timezone.utc)})
    return rows


def run_seed(categories: list[Category], tests: list[TestSet], cfg: PipelineConfig,
             extractor: FeatureExtractor, test_curves: bool = True) -> SeedResult:
    t0 = time.perf_counter()
    fitted = fit(categories, cfg, extractor, progress=Ticker())
    model, sel = fitted.model, fitted.selection
    timings = dict(fitted.timings)
    scorer = Scorer(model)
    # the search's view of the model: without position statistics, which are fitted at the chosen point only
    standardized = model.position_stats is not None
    raw_scorer = Scorer(model.with_hyperparameters(model.tau, model.k)) if standardized else scorer
    seeds = [[image_seed(cfg.seed, s.content_hash) for s in t.loaded] for t in tests]
    cached: dict[str, list[AnomalyMaps]] = {}
    curves: list[CurvePoint] = []
    t = time.perf_counter()
    if sel.searched:
        for p in sel.search.points:
            curves.append(CurvePoint(p.stage, "pseudo_validation", p.tau, p.k, p.image_auroc, p.pixel_auroc,
                                     p.ddim_steps))
    if sel.searched and test_curves:
        # tau and K curves at the steps the search used for them; identical to the final scores when
        # the model kept those steps
        steps0 = first_stages_steps(cfg.search, cfg.scoring.ddim_steps)
        same_steps = model.config.scoring.ddim_steps == steps0
        for tau in cfg.search.taus:
            outs = [raw_scorer.score(ts.features, "lafite_no_edit", sd, tau=tau, steps=steps0)
                    for ts, sd in zip(tests, seeds)]
            curves.append(CurvePoint("tau", "test", tau, None, mean_image_auroc(tests, outs), None, steps0))
            if tau == model.tau and same_steps:
                cached["lafite_no_edit"] = outs
        found = [scorer.neighbours(ts.features, max(cfg.search.ks)) for ts in tests]  # once for every K
        for k in cfg.search.ks:
            outs = [raw_scorer.score(ts.features, "lafite", sd, tau=model.tau, k=k, steps=steps0, found=f)
                    for ts, sd, f in zip(tests, seeds, found)]
            curves.append(CurvePoint("k", "test", model.tau, k, mean_image_auroc(tests, outs), None, steps0))
            if k == model.k and same_steps and not standardized:
                cached["lafite"] = outs
        for steps in cfg.search.ddim_steps:
            outs = [raw_scorer.score(ts.features, "lafite", sd, steps=steps, found=f)
                    for ts, sd, f in zip(tests, seeds, found)]
            curves.append(CurvePoint("steps", "test", model.tau, model.k, mean_image_auroc(tests, outs), None, steps))
            if steps == model.config.scoring.ddim_steps and not standardized:
                cached["lafite"] = outs
        print(f"  .. test curves: {len(cfg.search.taus) + len(cfg.search.ks) + len(cfg.search.ddim_steps)} passes in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    timings["test_curves"] = time.perf_counter() - t
    t = time.perf_counter()
    for method in METHODS:  # every method's maps once; the metrics and the image-score variants reuse them
        if method not in cached:
            cached[method] = [scorer.score(ts.features, method, sd) for ts, sd in zip(tests, seeds)]
    rows = test_rows(scorer, tests, METHODS, cached)
    image_scores = image_score_variants(tests, cached, cfg.scoring.image_pool)
    unstandardized = test_rows(raw_scorer, tests, ("lafite",)) if standardized else []
    timings["test_scoring_and_metrics"] = time.perf_counter() - t
    timings["seed_total"] = time.perf_counter() - t0
    return SeedResult(cfg.seed, cfg, rows, curves, model.tau, model.k, sel.searched, timings,
                      model.config.scoring.ddim_steps, image_scores, unstandardized)


IMAGE_POOLS = (1, 8, 16, 32, 64)
TOP_FRACTIONS = (0.01, 0.05)


def image_score_variants(tests: list[TestSet], cached: dict[str, list[AnomalyMaps]],
                         pool_in_use: int) -> dict[tuple[str, str], dict[str, float]]:
    """Detection AUROC of other image-level scores computed from the same pixel maps: the max of the map
    average-pooled at each size in IMAGE_POOLS (``scoring.image_pool``), and the mean of the top 1% / 5% of
    pixels. The row for ``pool_in_use`` equals the main table's detection AUROC."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for method, outs in cached.items():
        for ts, o in zip(tests, outs):
            if len(np.unique(ts.labels)) < 2:
                continue
            name = f"{ts.category.dataset}/{ts.category.name}"
            maps = o.maps.float()
            for pool in IMAGE_POOLS:
                k = min(pool, maps.shape[-1])
                scores = window_max(maps, k)
                out.setdefault((method, f"max of {k}x{k} mean" + (" (in use)" if pool == pool_in_use else "")),
                               {})[name] = auroc(ts.labels, scores.numpy())
            flat = maps.flatten(1)
            for frac in TOP_FRACTIONS:
                n = max(1, int(round(frac * flat.shape[1])))
                scores = flat.topk(n, dim=1).values.mean(1)
                out.setdefault((method, f"mean of top {100 * frac:g}% pixels"), {})[name] = auroc(ts.labels, scores.numpy())
    return out


def image_score_table(results: list[SeedResult]) -> str:
    """Rows: image score; columns: method x category; cells: detection AUROC, mean ± std over seeds."""
    if not any(r.image_scores for r in results):
        return ""
    cats = sorted({c for r in results for v in r.image_scores.values() for c in v})
    variants = list(dict.fromkeys(v for r in results for (_, v) in r.image_scores))
    cols = [(m, c) for m in METHODS for c in cats]
    lines = ["### Image score variants (detection AUROC from the same pixel maps)", "",
             "| image score | " + " | ".join(f"{METHOD_NAMES[m]} {c.split('/')[-1]}" for m, c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for v in variants:
        cells = []
        for m, c in cols:
            vals = [r.image_scores.get((m, v), {}).get(c) for r in results]
            cells.append(pct(over_seeds(vals)))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_lines(res: SeedResult) -> list[str]:
    """One line per category and method of a finished seed: detection / localisation AUROC and AUPRO in %."""
    rows = [(r, "") for r in res.rows] + [(r, " without position statistics") for r in res.unstandardized]
    return [f"  seed {res.seed} {r['dataset']}/{r['category']} {METHOD_NAMES[r['method']]}{note}: "
            f"{100 * r['image_auroc']:.1f} / {100 * (r['pixel_auroc'] or float('nan')):.1f}, AUPRO "
            f"{100 * (r['aupro'] or float('nan')):.1f}" for r, note in rows]


def unstandardized_table(results: list[SeedResult], tests: list[TestSet]) -> str:
    """scoring.position_norm's ablation: LafitE's table row from the same models and points, with and without
    their position statistics."""
    plain = [dataclasses.replace(r, rows=r.unstandardized) for r in results]
    return ("### LafitE without its position statistics (same models, same tau, K and DDIM steps)\n\n"
            + metric_table(plain, tests, ("image_auroc", "pixel_auroc"), "Detection / localisation AUROC", ("lafite",))
            + "\n\n" + metric_table(plain, tests, ("aupro", None), "AUPRO (localisation, FPR <= 0.3)", ("lafite",)))


# --------------------------------------------------------------------------- Markdown


def pct(s) -> str:
    """Summary over seeds -> '98.7 ± 0.3' in %, or '-'."""
    if s is None or s.mean is None:
        return "-"
    return f"{100 * s.mean:.1f} ± {100 * s.std:.1f}" if s.n > 1 else f"{100 * s.mean:.1f}"


def over_seeds(values: list[float | None]):
    present = [v for v in values if v is not None]
    return mean_std_over_seeds(present) if present else None


def metric_table(results: list[SeedResult], tests: list[TestSet], pair: tuple[str, str | None], title: str,
                 methods: Sequence[Method] = METHODS) -> str:
    """Rows: categories, mean, inter-category std; columns: methods; cells 'a / b' (mean ± std over seeds)."""
    a, b = pair
    head = "| category | " + " | ".join(METHOD_NAMES[m] for m in methods) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (len(methods) + 1)]

    def cell(values_a, values_b) -> str:
        sa = pct(over_seeds(values_a))
        return sa if b is None else f"{sa} / {pct(over_seeds(values_b))}"

    def per_seed(ds: str, cat: str, method: str, metric: str) -> list[float | None]:
        return [next(r[metric] for r in res.rows if (r["dataset"], r["category"], r["method"]) == (ds, cat, method))
                for res in results]

    for ts in tests:
        ds, cat = ts.category.dataset, ts.category.name
        flag = " (!)" if ts.overlap else ""
        cells = [cell(per_seed(ds, cat, m, a), per_seed(ds, cat, m, b) if b else None) for m in methods]
        lines.append(f"| {ds}/{cat}{flag} | " + " | ".join(cells) + " |")
    for label, field in (("**mean**", "mean"), ("inter-category std", "std")):
        cells = []
        for m in methods:
            def stat(metric: str) -> list[float | None]:
                return [getattr(summarize([r[metric] for r in res.rows if r["method"] == m]), field) for res in results]
            cells.append(cell(stat(a), stat(b) if b else None))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best(points: list[CurvePoint]) -> int | None:
    """Grid value with the highest AUROC; ties go to the earlier grid entry (the search's rule)."""
    pts = [p for p in points if not np.isnan(p.image_auroc)]
    if not pts:
        return None
    return max(pts, key=lambda p: p.image_auroc).value()


def curve_section(res: SeedResult) -> tuple[str, dict]:
    """Markdown for one seed's two curves, and the summary of the picks."""
    if not res.searched:
        return f"seed {res.seed}: no search (disabled or no held-out images); tau={res.tau}, K={res.k} from the config", {}
    has_test = any(p.split == "test" for p in res.curves)
    lines = []
    summary = {"seed": res.seed, "chosen_tau": res.tau, "chosen_k": res.k, "chosen_steps": res.ddim_steps}
    for curve, label in (("tau", "tau (no editing)"), ("k", f"K (editing, tau={res.tau})"),
                         ("steps", f"DDIM steps (tau={res.tau}, K={res.k}; fewest within the tolerance)")):
        key = curve
        pv = [p for p in res.curves if p.curve == curve and p.split == "pseudo_validation"]
        if not pv:
            continue
        chosen = res.chosen(curve)
        lines += [f"| {label} | " + " | ".join(str(p.value()) for p in pv) + " |",
                  "|---|" + "---|" * len(pv),
                  "| pseudo-val det. AUROC | " + " | ".join(
                      f"**{100 * p.image_auroc:.1f}**" if p.value() == chosen else f"{100 * p.image_auroc:.1f}"
                      for p in pv) + " |"]
        if has_test:
            te = [p for p in res.curves if p.curve == curve and p.split == "test"]
            test_best = best(te)
            te_at = {p.value(): p.image_auroc for p in te}
            summary[f"test_best_{key}"] = test_best
            # ties count as agreement: the pick is right when it reaches the test curve's maximum
            summary[f"{key}_agree"] = te_at.get(chosen, float("nan")) >= te_at.get(test_best, float("nan")) - 1e-12
            summary[f"test_auroc_at_chosen_{key}"] = te_at.get(chosen)
            summary[f"test_auroc_at_best_{key}"] = te_at.get(test_best)
            lines.append("| test det. AUROC | " + " | ".join(
                f"**{100 * te_at[p.value()]:.1f}**" if p.value() == test_best
                else f"{100 * te_at[p.value()]:.1f}" for p in pv) + " |")
        lines.append("")
    if not has_test:
        verdict = (f"seed {res.seed}: pseudo-validation picked tau={res.tau}, K={res.k}; test curves not computed "
                   "for this seed (`--curves all` computes them for every seed)")
        return "\n".join([verdict, "", *lines]), {}
    verdict = (f"seed {res.seed}: pseudo-validation picked tau={res.tau}, K={res.k}; the test set would pick "
               f"tau={summary['test_best_tau']}, K={summary['test_best_k']} (at the chosen tau; ties to the "
               f"earlier grid entry) -> "
               f"tau {'agrees' if summary['tau_agree'] else 'differs'}, K {'agrees' if summary['k_agree'] else 'differs'}; "
               f"test det. AUROC at the picks {100 * summary['test_auroc_at_chosen_k']:.1f} vs "
               f"{100 * summary['test_auroc_at_best_k']:.1f} at the test-best K")
    if "steps_agree" in summary:
        verdict += (f"; DDIM steps {res.ddim_steps} (test det. AUROC {100 * summary['test_auroc_at_chosen_steps']:.1f}, "
                    f"{100 * summary['test_auroc_at_best_steps']:.1f} at the test-best {summary['test_best_steps']})")
    return "\n".join([verdict, "", *lines]), summary


def markdown(args, results: list[SeedResult], tests: list[TestSet], started: float, mach) -> tuple[str, list[dict]]:
    cfg = results[0].config
    out = ["# Accuracy benchmark", ""]
    if args.quick:
        out += ["**QUICK SMOKE RUN** (tiny U-Net, 2 epochs, 1 seed, image subsets): the figures check that the benchmark "
                "runs; they are not accuracy results.", ""]
    seeds = [r.seed for r in results]
    out += [
        f"- data: `{args.data_root}`, {len(tests)} categories, {sum(len(t.category.train) for t in tests)} "
        f"train/good and {sum(len(t.loaded) for t in tests)} test images"
        + (f" (at most {args.max_train} / {args.max_test} per category)" if args.max_train or args.max_test else ""),
        f"- profile `{cfg.profile}`, backbone `{cfg.backbone.name}`, U-Net {cfg.diffusion.base_channels} "
        f"{tuple(cfg.diffusion.channel_mult)}, {cfg.diffusion.epochs} epochs, {cfg.scoring.ddim_steps} DDIM steps; "
        f"overrides {json.dumps(args.overrides) if args.overrides else 'none'}",
        f"- seeds {seeds} (one multi-class model per seed); config hashes "
        f"{', '.join(config_hash(r.config) for r in results)}",
        f"- machine: {mach.line()}",
        f"- total time {(time.perf_counter() - started) / 60:.1f} min "
        f"(per seed: {', '.join('%.0f s' % r.timings['seed_total'] for r in results)})",
        "- seconds per seed (train = extraction + U-Net + coresets; search = pseudo-validation set, search and "
        "calibration; test = test curves, then every method's scores and metrics): "
        + "; ".join(f"seed {r.seed}: train {r.timings.get('extract_train', 0) + r.timings.get('train_and_coreset', 0):.0f}"
                    f" (U-Net {r.timings.get('train_unet', 0):.0f}), search {r.timings.get('search', 0):.0f}, "
                    f"test {r.timings.get('test_curves', 0):.0f} + {r.timings.get('test_scoring_and_metrics', 0):.0f}"
                    for r in results),
        "",
        f"Metrics in %; cells are mean ± sample std over {len(seeds)} seeds"
        + (" (one seed: no std)" if len(seeds) == 1 else "")
        + "; 'inter-category std' is the population std over categories, per seed, then over seeds.",
        "",
    ]
    if any(t.overlap for t in tests):
        out += ["(!) train/good and test share byte-identical images in this category: its figures are not a "
                "valid accuracy measurement (e.g. `glass_ind/glass` is for smoke tests only).", ""]
    out += [metric_table(results, tests, ("image_auroc", "pixel_auroc"), "Detection / localisation AUROC"), "",
            metric_table(results, tests, ("image_ap", "pixel_ap"), "Detection / localisation AP"), "",
            metric_table(results, tests, ("aupro", None), "AUPRO (localisation, FPR <= 0.3)"), "",
            image_score_table(results), "",
            *([unstandardized_table(results, tests), ""] if any(r.unstandardized for r in results) else []),
            "## Figure 6: tau and K picked on the pseudo-validation set vs. the test set", "",
            "Mean per-category detection AUROC (%); bold: the pseudo-validation pick (pseudo-val row) and the "
            "test-set best (test row).", ""]
    picks = []
    for res in results:
        text, summary = curve_section(res)
        out += [text, ""]
        if summary:
            picks.append(summary)
    if picks:
        out.append(f"tau agrees in {sum(p['tau_agree'] for p in picks)}/{len(picks)} seeds, "
                   f"K in {sum(p['k_agree'] for p in picks)}/{len(picks)}"
                   + (f", DDIM steps in {sum(p['steps_agree'] for p in picks)}/{len(picks)}"
                      if all("steps_agree" in p for p in picks) else "") + ".")
    return "\n".join(out) + "\n", picks


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(SHARED_DATA), help="MVTec-layout root (default: ../shared/data)")
    p.add_argument("--categories", nargs="+", default=None, help="only these categories (name or dataset/category)")
    p.add_argument("--profile", default="cpu", choices=["cpu", "paper"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one model per seed (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=None,
                   help="train exactly this many epochs per seed instead of the profile's budget (the cpu profile "
                   "trains diffusion.max_steps optimiser steps, at most 150 epochs)")
    p.add_argument("--max-steps", type=int, default=None, help="training budget in optimiser steps per seed")
    p.add_argument("--curves", choices=["first", "all", "none"], default="first",
                   help="score the test set over the whole tau/K grid (Figure 6) for the first seed only "
                   "(default), for every seed, or not at all")
    p.add_argument("--out", default=None, help="output stem (default bench/results/accuracy[_quick])")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny U-Net, 2 epochs, small grid, 1 seed")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="config override (repeatable)")
    p.add_argument("--max-train", type=int, default=None, help="at most this many train/good images per category")
    p.add_argument("--max-test", type=int, default=None, help="at most this many test images per category "
                   "(evenly spaced over the sorted list, so every defect type stays)")
    args = p.parse_args(argv)
    if args.quick:
        args.max_train = args.max_train or QUICK_MAX_TRAIN
        args.max_test = args.max_test or QUICK_MAX_TEST
    base: dict = QUICK if args.quick else {}
    if args.epochs:
        base = merge(base, {"diffusion": {"epochs": args.epochs, "max_steps": None}})
    if args.max_steps:
        base = merge(base, {"diffusion": {"max_steps": args.max_steps}})
    args.overrides = merge(base, parse_set(args.set))
    if args.quick:
        args.seeds = args.seeds[:1]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    mach = machine()
    stem = out_stem(args.out, "accuracy", args.quick)
    print(f"machine: {mach.line()}", file=sys.stderr)
    configs = [load_profile(args.profile).with_updates(**args.overrides, seed=s) for s in args.seeds]
    categories = [subset(c, args.max_train, args.max_test) for c in discover(args.data_root, args.categories)]
    extractor = FeatureExtractor(configs[0].backbone)
    print(f"{len(categories)} categories under {args.data_root}; backbone weights {extractor.info.weights_source}",
          file=sys.stderr)
    tests = load_test_sets(categories, configs[0], extractor)
    results = []
    for cfg in configs:
        print(f"seed {cfg.seed}: fit on {sum(len(c.train) for c in categories)} train/good images", file=sys.stderr)
        curves = args.curves == "all" or (args.curves == "first" and not results)
        results.append(run_seed(categories, tests, cfg, extractor, test_curves=curves))
        for line in seed_lines(results[-1]):  # each seed's figures as it ends: a run cut short keeps them in its log
            print(line, file=sys.stderr, flush=True)

    text, picks = markdown(args, results, tests, started, mach)
    created = datetime.now(timezone.utc)
    run_id = f"bench-accuracy-{created.strftime('%Y%m%dT%H%M%S')}"
    rows = [{**r, "run_id": run_id} for res in results for r in res.rows]
    meta = {"configs": json.dumps({str(r.seed): json.loads(r.config.to_json()) for r in results}),
            "picks": json.dumps(picks), "data_root": args.data_root, "quick": json.dumps(args.quick)}
    store = Store(str(stem.parent))
    store.write_table([stem.name + "_metrics.parquet"], metrics_table(rows), meta)
    curve_rows = []
    for res in results:
        pick = next((p for p in picks if p["seed"] == res.seed), {})
        for c in res.curves:
            curve_rows.append({"seed": res.seed, "curve": c.curve, "split": c.split, "tau": c.tau, "k": c.k,
                               "ddim_steps": c.ddim_steps, "image_auroc": c.image_auroc, "pixel_auroc": c.pixel_auroc,
                               "chosen": c.value() == res.chosen(c.curve),
                               "test_best": c.value() == pick.get(f"test_best_{c.curve}")})
    store.write_table([stem.name + "_hyperparameters.parquet"], pa.Table.from_pylist(curve_rows, schema=CURVES_SCHEMA),
                      meta)
    write_text(stem.parent / (stem.name + ".md"), text)
    print(text)
    print(f"wrote {stem}.md, {stem}_metrics.parquet ({len(rows)} rows), {stem}_hyperparameters.parquet "
          f"({len(curve_rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
