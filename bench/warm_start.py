"""Incremental retraining: a warm start on all images against training from scratch on all of them.

A parent model is trained from scratch on a seeded 90% of each category's train/good images (its
features cached in a Zarr store, as the nightly flow keeps them). The store is copied twice; then,
with all train/good images, (a) warm-starts from the parent (``lafite_core.warm_start``: only the
new images are extracted, the U-Net is fine-tuned for ``diffusion.warm_start_fraction`` of the
budget, the coresets keep the parent's rows and select over the new images (``coreset.merge``),
search and calibration as usual) and (b) trains from scratch (only the new images
are extracted there too). The three models score every category's test set (extracted once) with
LafitE and the PatchCore baseline. Target: (a) takes <= 30% of (b)'s time, within 0.5 AUROC points.

    .venv/bin/python bench/warm_start.py            # ../shared/data magnetic_tile + metal_plate, cpu profile
    .venv/bin/python bench/warm_start.py --quick    # smoke run: tiny U-Net, a few images, minutes
    .venv/bin/python bench/warm_start.py --set diffusion.warm_start_fraction=0.15

Writes ``<out>.md`` (also printed) and ``<out>.json``; ``<out>`` defaults to
``bench/results/warm_start`` (``warm_start_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accuracy import TestSet, load_test_sets, subset, test_rows
from common import SHARED_DATA, Ticker, machine, merge, out_stem, parse_set, write_json, write_text
from lafite_core.config import PipelineConfig, config_hash, load_profile
from lafite_core.datapath.data import Category, discover
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.method.model import Scorer
from lafite_core.pipeline import FitResult, fit, publish
from lafite_core.stages import backbone_card
from lafite_core.store.feature_store import FeatureStore
from lafite_core.store.storage import Store
from lafite_core.warm_start import warm_start_from

log = logging.getLogger("bench.warm_start")

METHODS = ("lafite", "patchcore")
NAMES = {"lafite": "LafitE", "patchcore": "PatchCore"}
QUICK = {
    "diffusion": {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_resolutions": (),
                  "epochs": 4, "max_steps": None, "batch_size": 8, "lr": 1e-3},
    "search": {"taus": (50, 200), "ks": (1, 3), "ddim_steps": (1, 2)},
    "scoring": {"ddim_steps": 2},
}
QUICK_MAX_TRAIN, QUICK_MAX_TEST = 20, 16
TARGET_TIME, TARGET_AUROC = 0.30, 0.005


def older_share(categories: list[Category], share: float, seed: int) -> list[Category]:
    """Each category with a seeded ``share`` of its train/good images (at least 4: 2 fit, 2 held out)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in categories:
        n = len(c.train)
        keep = sorted(rng.choice(n, size=min(n, max(4, round(share * n))), replace=False))
        out.append(dataclasses.replace(c, train=tuple(c.train[i] for i in keep)))
    return out


@dataclass
class Run:
    """One training run: what it trained on, how long each part took, and its test metrics rows."""

    name: str
    train_images: int
    new_images: int  # images extracted in this run (the rest came from the store)
    seconds: dict[str, float]
    epochs: int
    parent: str | None
    rows: list[dict]
    bank_merge: dict | None = None  # how the coresets merged the parent's (model.extra["bank_merge"]); None: built anew

    def metric(self, category: str | None, method: str, field: str) -> float:
        vals = [r[field] for r in self.rows if r["method"] == method and category in (None, r["category"])]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else float("nan")


def train(name: str, categories: list[Category], cfg: PipelineConfig, extractor: FeatureExtractor, store: Store,
          tests: list[TestSet], warm_start: str) -> tuple[Run, str]:
    """Fit (extracting into the store's features), publish, score the test sets; the run and its version."""
    print(f"{name}: fit on {sum(len(c.train) for c in categories)} train/good images (warm start: {warm_start})",
          file=sys.stderr, flush=True)
    sink = FeatureStore(store, cfg, backbone_card(extractor))
    before = sum(len(sink.entries(c.dataset, c.name)) for c in categories)
    t0 = time.perf_counter()
    warm = warm_start_from(store, warm_start, cfg)
    fitted: FitResult = fit(categories, cfg, extractor, progress=Ticker(), sink=sink, warm_start=warm)
    version = publish(store, fitted, run_id=name).version
    total = time.perf_counter() - t0
    after = sum(len(sink.entries(c.dataset, c.name)) for c in categories)
    t = fitted.timings
    seconds = {"extract": t["extract_train"], "unet": t["train_unet"],
               "unet_and_coresets": t["train_and_coreset"], "search_and_calibration": t["search"], "total": total}
    print(f"{name}: {total:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}); scoring the test sets",
          file=sys.stderr, flush=True)
    rows = test_rows(Scorer(fitted.model), tests, METHODS)
    return Run(name, fitted.trained.model.extra["train_images"], after - before, seconds, fitted.trained.epochs,
               fitted.trained.parent_version, rows, fitted.model.extra.get("bank_merge")), version


def markdown(args, cfg: PipelineConfig, runs: dict[str, Run], tests: list[TestSet], mach, started: float) -> str:
    parent, warm, scratch = runs["parent"], runs["warm"], runs["scratch"]
    cats = [t.category.name for t in tests]
    out = ["# Warm start vs. training from scratch", ""]
    if args.quick:
        out += ["**QUICK SMOKE RUN** (tiny U-Net, 4 epochs, a few images per category): the figures check that the "
                "benchmark runs; they are not results.", ""]
    d = cfg.diffusion
    budget = f"{d.max_steps} steps (at most {d.epochs} epochs)" if d.max_steps else f"{d.epochs} epochs"
    out += [
        f"- data: `{args.data_root}`, categories {', '.join(cats)}; parent on a seeded {100 * args.share:.0f}% of each "
        f"category's train/good images (seed {args.seed}), then all of them"
        + (f" (at most {args.max_train} train / {args.max_test} test images per category)"
           if args.max_train or args.max_test else ""),
        f"- profile `{cfg.profile}`, U-Net {d.base_channels} {tuple(d.channel_mult)}, budget {budget}, warm start "
        f"{100 * d.warm_start_fraction:.0f}% of it; config {config_hash(cfg)}; overrides "
        f"{args.overrides if args.overrides else 'none'}",
        f"- machine: {mach.line()}",
        f"- total time {(time.perf_counter() - started) / 60:.1f} min; (a) ran before (b), both after the parent, "
        "each in its own copy of the parent's store (both extract only the new images)",
        "",
        "Seconds; extract includes reading the cached features; U-Net + coresets adds statistics and LafitE's and "
        "PatchCore's coresets to the U-Net's training; total includes publication.",
        "",
        "| run | train images | extracted | epochs | extract | U-Net | U-Net + coresets | search + calibration | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    label = {"parent": f"parent: from scratch, {100 * args.share:.0f}%", "warm": "(a) warm start, all",
             "scratch": "(b) from scratch, all"}
    for key, r in runs.items():
        s = r.seconds
        out.append(f"| {label[key]} | {r.train_images} | {r.new_images} | {r.epochs} | {s['extract']:.0f} | "
                   f"{s['unet']:.0f} | {s['unet_and_coresets']:.0f} | {s['search_and_calibration']:.0f} | "
                   f"{s['total']:.0f} |")
    def coresets(name: str, m: dict) -> str:
        if "not_merged" in m:
            return f"{NAMES[name]} built over all images (not merged: {m['not_merged']})"
        return (f"{NAMES[name]} kept {m['kept_rows']} of the parent's rows and selected over "
                f"{m['selected_over_images']} images (categories merged: {', '.join(m['merged']) or 'none'}; rebuilt: "
                f"{', '.join(f'{k} ({v})' for k, v in m['rebuilt'].items()) or 'none'})")

    out += ["", "Coresets of (a): " + "; ".join(coresets(n, m) for n, m in (warm.bank_merge or {}).items())]
    out += ["", "Detection / localisation AUROC (%):", "",
            "| run | " + " | ".join(f"{NAMES[m]} {c}" for m in METHODS for c in [*cats, "mean"]) + " |",
            "|---|" + "---|" * (len(METHODS) * (len(cats) + 1))]
    for key, r in runs.items():
        cells = [f"{100 * r.metric(c, m, 'image_auroc'):.1f} / {100 * r.metric(c, m, 'pixel_auroc'):.1f}"
                 for m in METHODS for c in [*cats, None]]
        out.append(f"| {label[key]} | " + " | ".join(cells) + " |")
    ratio = warm.seconds["total"] / scratch.seconds["total"]
    unet_ratio = warm.seconds["unet"] / scratch.seconds["unet"]
    det = warm.metric(None, "lafite", "image_auroc") - scratch.metric(None, "lafite", "image_auroc")
    pix = warm.metric(None, "lafite", "pixel_auroc") - scratch.metric(None, "lafite", "pixel_auroc")
    ok_time, ok_acc = ratio <= TARGET_TIME, abs(det) <= TARGET_AUROC and abs(pix) <= TARGET_AUROC
    out += ["", "## Target", "",
            f"- time: (a) took {100 * ratio:.0f}% of (b)'s end-to-end training time (U-Net alone "
            f"{100 * unet_ratio:.0f}%): {'met' if ok_time else 'NOT met'} (target <= {100 * TARGET_TIME:.0f}%)",
            f"- accuracy: LafitE mean detection AUROC {100 * det:+.1f} and localisation {100 * pix:+.1f} points, (a) "
            f"against (b): {'met' if ok_acc else 'NOT met'} (target within {100 * TARGET_AUROC:.1f})",
            f"- the parent alone (no new images): LafitE mean detection / localisation "
            f"{100 * parent.metric(None, 'lafite', 'image_auroc'):.1f} / "
            f"{100 * parent.metric(None, 'lafite', 'pixel_auroc'):.1f}"]
    return "\n".join(out) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(SHARED_DATA), help="MVTec-layout root (default: ../shared/data)")
    p.add_argument("--categories", nargs="+", default=["magnetic_tile", "metal_plate"],
                   help="categories (name or dataset/category); default magnetic_tile metal_plate")
    p.add_argument("--profile", default="cpu", choices=["cpu", "paper"])
    p.add_argument("--share", type=float, default=0.9, help="share of each category's train images the parent sees")
    p.add_argument("--seed", type=int, default=0, help="model seed and the seed of the parent's image choice")
    p.add_argument("--max-steps", type=int, default=None, help="training budget in optimiser steps")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="config override (repeatable)")
    p.add_argument("--max-train", type=int, default=None, help="at most this many train/good images per category")
    p.add_argument("--max-test", type=int, default=None, help="at most this many test images per category")
    p.add_argument("--out", default=None, help="output stem (default bench/results/warm_start[_quick])")
    p.add_argument("--work", default=None, help="folder for the three stores (default: a temporary one, removed)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny U-Net, 4 epochs, few images")
    args = p.parse_args(argv)
    if not 0 < args.share < 1:
        p.error("--share must lie strictly between 0 and 1")
    if args.quick:
        args.max_train = args.max_train or QUICK_MAX_TRAIN
        args.max_test = args.max_test or QUICK_MAX_TEST
    base: dict = QUICK if args.quick else {}
    if args.max_steps:
        base = merge(base, {"diffusion": {"max_steps": args.max_steps}})
    args.overrides = merge(base, parse_set(args.set))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lafite_core.warm_start").setLevel(logging.INFO)
    started = time.perf_counter()
    mach = machine()
    stem = out_stem(args.out, "warm_start", args.quick)
    print(f"machine: {mach.line()}", file=sys.stderr)
    cfg = load_profile(args.profile).with_updates(**args.overrides, seed=args.seed)
    everything = [subset(c, args.max_train, args.max_test) for c in discover(args.data_root, args.categories)]
    older = older_share(everything, args.share, args.seed)
    extractor = FeatureExtractor(cfg.backbone)
    tests = load_test_sets(everything, cfg, extractor)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lafite-warm-start-"))
    try:
        runs: dict[str, Run] = {}
        runs["parent"], _ = train("parent", older, cfg, extractor, Store(str(work / "parent")), tests, "none")
        for name in ("warm", "scratch"):
            shutil.copytree(work / "parent", work / name)
        runs["warm"], _ = train("warm", everything, cfg, extractor, Store(str(work / "warm")), tests, "latest")
        runs["scratch"], _ = train("scratch", everything, cfg, extractor, Store(str(work / "scratch")), tests, "none")
        assert runs["warm"].parent is not None, "the warm start found no compatible parent"
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(args, cfg, runs, tests, mach, started)
    print(text)
    write_text(stem.with_suffix(".md"), text)
    write_json(stem.with_suffix(".json"), {
        "config": cfg.model_dump(mode="json"), "config_hash": config_hash(cfg), "machine": dataclasses.asdict(mach),
        "share": args.share, "seed": args.seed, "categories": [t.category.key for t in tests],
        "runs": {k: {**dataclasses.asdict(r), "rows": [{**row, "created": str(row["created"])} for row in r.rows]}
                 for k, r in runs.items()},
    })
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
