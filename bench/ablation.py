"""Ablation benchmark: what makes LafitE strong on real data, one setting changed per row.

Every variant is the ``cpu`` profile (plus the common overrides: ``--max-steps``, ``--set``) plus its
own overrides from :data:`VARIANTS`. For each variant, one unified model is fitted on the train/good
images of all categories (default ``magnetic_tile`` and ``metal_plate``; pseudo-validation search
included) with ``accuracy.run_seed``, and every category's test set is scored with LafitE, LafitE
without feature editing and the PatchCore-style baseline. The test images are read and their
features extracted once for all variants with the same backbone settings and image size (the
feature key), and once more for each other key (``view: strides 8-32`` stores the stride-32 level).

    .venv/bin/python bench/ablation.py                                    # every variant, seed 0
    .venv/bin/python bench/ablation.py --variants "baseline (cpu profile)" "coreset 1%" --max-steps 400
    .venv/bin/python bench/ablation.py --data-root /data/mvtec --categories bottle screw --set scoring.ddim_steps=10

Writes ``<out>.md`` (the table, also printed) and ``<out>.json`` (every metric of every variant),
rewritten after each variant so that an interrupted run keeps the variants done; each finished row
is also printed to stderr at once. ``<out>`` defaults to ``bench/results/ablation``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accuracy import METHOD_NAMES, SeedResult, TestSet, load_test_sets, run_seed, subset
from common import SHARED_DATA, Machine, machine, merge, out_stem, parse_set, write_json, write_text
from lafite_core.config import CPU_TRAIN_STEPS, PipelineConfig, config_hash, load_profile
from lafite_core.datapath.data import discover
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.store.feature_store import feature_key
from lafite_core.store.tables import METRIC_COLUMNS

Overrides = dict[str, dict[str, Any]]

VARIANTS: dict[str, Overrides] = {
    "baseline (cpu profile)": {},
    "view: 3x3 stored cells": {"features": {"aggregate_at": "stored"}},
    "view: no averaging": {"features": {"local_aggregation": 1}},
    "view: strides 8-32": {"backbone": {"out_indices": (2, 3, 4)}, "features": {"levels": None}},
    "U-Net base 128": {"diffusion": {"base_channels": 128}},
    "coreset 3%": {"coreset": {"keep_rate": 0.03}},
}
"""Row name -> config overrides on top of the ``cpu`` profile and the common overrides (the variant's win)."""

DEFAULT_CATEGORIES = ["magnetic_tile", "metal_plate"]
TIMING_COLUMNS = (("train_and_coreset", "train+coreset s"), ("search", "search s"), ("seed_total", "total s"))

log = logging.getLogger("bench.ablation")


@dataclass(frozen=True)
class VariantResult:
    """One finished variant: its name, its own overrides and the fitted-and-scored result."""

    name: str
    overrides: Overrides
    result: SeedResult

    def metric(self, ts: TestSet, method: str, column: str) -> float | None:
        c = ts.category
        return next(r[column] for r in self.result.rows
                    if (r["dataset"], r["category"], r["method"]) == (c.dataset, c.name, method))


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(done: list[VariantResult], tests: list[TestSet]) -> list[str]:
    """Markdown table: one row per variant; per category LafitE det / loc and AUPRO, w/o F.E. det,
    PatchCore det / loc; then tau, K and the variant's times."""
    lafite, no_edit, patchcore = (METHOD_NAMES[m] for m in ("lafite", "lafite_no_edit", "patchcore"))
    head = ["variant"]
    for ts in tests:
        name = ts.category.name + (" (!)" if ts.overlap else "")
        head += [f"{name} {lafite} det / loc", f"{name} {lafite} AUPRO", f"{name} {no_edit} det",
                 f"{name} {patchcore} det / loc"]
    head += ["tau", "K", *(label for _, label in TIMING_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in done:
        cells = [v.name]
        for ts in tests:
            cells += [f"{pct(v.metric(ts, 'lafite', 'image_auroc'))} / {pct(v.metric(ts, 'lafite', 'pixel_auroc'))}",
                      pct(v.metric(ts, "lafite", "aupro")),
                      pct(v.metric(ts, "lafite_no_edit", "image_auroc")),
                      f"{pct(v.metric(ts, 'patchcore', 'image_auroc'))} / "
                      f"{pct(v.metric(ts, 'patchcore', 'pixel_auroc'))}"]
        cells += [str(v.result.tau), str(v.result.k),
                  *(f"{v.result.timings[key]:.0f}" for key, _ in TIMING_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def budget(cfg: PipelineConfig) -> str:
    d = cfg.diffusion
    if d.max_steps is None:
        return f"{d.epochs} epochs per variant"
    return f"{d.max_steps} optimiser steps per variant (at most {d.epochs} epochs)"


def markdown(args: argparse.Namespace, names: list[str], done: list[VariantResult], tests: list[TestSet],
             mach: Machine, started: float) -> str:
    cfg = done[0].result.config
    out = ["# Ablation benchmark", ""]
    if len(done) < len(names):
        out += [f"**PARTIAL**: {len(done)} of {len(names)} variants done "
                f"(not yet run: {', '.join(names[len(done):])}).", ""]
    out += [
        f"- machine: {mach.line()}",
        f"- command: `{args.command}`",
        f"- data: `{args.data_root}`, {len(tests)} categories, {sum(len(t.category.train) for t in tests)} "
        f"train/good and {sum(len(t.loaded) for t in tests)} test images"
        + (f" (at most {args.max_train} / {args.max_test} per category)" if args.max_train or args.max_test else ""),
        f"- budget: {budget(cfg)}; seed {args.seed}; one unified model per variant",
        f"- profile `cpu`, backbone `{cfg.backbone.name}`; common overrides "
        f"{json.dumps(args.common) if args.common else 'none'}",
        f"- time so far {(time.perf_counter() - started) / 60:.1f} min",
        "",
        "Every row is the `cpu` profile with the common overrides plus its own overrides, shown under the "
        "table; rows differ from the first only by those overrides. Metrics in % (one seed: no std); "
        "det = detection (image) AUROC, loc = localisation (pixel) AUROC, AUPRO at FPR <= 0.3; tau and K "
        "as picked on the pseudo-validation set; times in seconds.",
        "",
    ]
    if any(t.overlap for t in tests):
        out += ["(!) train/good and test share byte-identical images in this category: its figures are not a "
                "valid accuracy measurement.", ""]
    out += table(done, tests)
    out += ["", "Overrides per variant:", ""]
    out += [f"- {v.name}: {json.dumps(v.overrides) if v.overrides else 'none'} (config {config_hash(v.result.config)})"
            for v in done]
    return "\n".join(out) + "\n"


def record(v: VariantResult, tests: list[TestSet]) -> dict[str, Any]:
    """The JSON row of one variant: every metric per category and method, the picks and the timings."""
    metrics = {ts.category.key: {m: {c: v.metric(ts, m, c) for c in METRIC_COLUMNS} for m in METHOD_NAMES}
               for ts in tests}
    return {"variant": v.name, "overrides": v.overrides, "config_hash": config_hash(v.result.config),
            "config": json.loads(v.result.config.to_json()), "metrics": metrics, "tau": v.result.tau,
            "k": v.result.k, "searched": v.result.searched, "timings": v.result.timings}


def write(stem: Path, args: argparse.Namespace, names: list[str], done: list[VariantResult],
          tests: list[TestSet], mach: Machine, started: float) -> str:
    """Rewrite ``<stem>.md`` and ``<stem>.json`` with the variants done so far; returns the Markdown."""
    text = markdown(args, names, done, tests, mach, started)
    write_text(stem.parent / (stem.name + ".md"), text)
    write_json(stem.parent / (stem.name + ".json"), {
        "machine": mach.line(), "command": args.command, "data_root": args.data_root, "seed": args.seed,
        "budget": budget(done[0].result.config), "common_overrides": args.common,
        "complete": len(done) == len(names), "variants": [record(v, tests) for v in done]})
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(SHARED_DATA), help="MVTec-layout root (default: ../shared/data)")
    p.add_argument("--categories", nargs="+", default=DEFAULT_CATEGORIES,
                   help="categories (name or dataset/category) of the unified model (default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                   help="variants to run, in this order (default: all: " + "; ".join(VARIANTS).replace("%", "%%") + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of every variant (default 0)")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"training budget in optimiser steps per variant (default: the profile's, {CPU_TRAIN_STEPS})")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="config override applied to every variant (repeatable); a variant's own overrides win")
    p.add_argument("--max-train", type=int, default=None, help="at most this many train/good images per category")
    p.add_argument("--max-test", type=int, default=None, help="at most this many test images per category "
                   "(evenly spaced over the sorted list, so every defect type stays)")
    p.add_argument("--out", default=None, help="output stem (default bench/results/ablation)")
    args = p.parse_args(argv)
    unknown = [n for n in args.variants if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; valid names: " + "; ".join(repr(n) for n in VARIANTS))
    args.variants = list(dict.fromkeys(args.variants))
    base: Overrides = {"diffusion": {"max_steps": args.max_steps}} if args.max_steps else {}
    args.common = merge(base, parse_set(args.set))
    args.command = shlex.join(["bench/ablation.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    mach = machine()
    stem = out_stem(args.out, "ablation", quick=False)
    print(f"machine: {mach.line()}", file=sys.stderr)
    profile = load_profile("cpu")
    configs = {n: profile.with_updates(**merge(args.common, VARIANTS[n]), seed=args.seed) for n in args.variants}
    keys = {n: feature_key(c) for n, c in configs.items()}
    first = args.variants[0]
    categories = [subset(c, args.max_train, args.max_test) for c in discover(args.data_root, args.categories)]
    extractors: dict[str, FeatureExtractor] = {}
    test_sets: dict[str, list[TestSet]] = {}  # by feature key: read and extracted once for the variants sharing it

    def features_for(name: str) -> tuple[FeatureExtractor, list[TestSet]]:
        key = keys[name]
        if key not in extractors:
            extractors[key] = FeatureExtractor(configs[name].backbone)
            print(f"{len(categories)} categories under {args.data_root}; backbone {configs[name].backbone.name} "
                  f"out_indices {configs[name].backbone.out_indices}, weights {extractors[key].info.weights_source}",
                  file=sys.stderr)
            test_sets[key] = load_test_sets(categories, configs[name], extractors[key])
            if not test_sets[key]:
                raise SystemExit(f"no test images in {args.categories} under {args.data_root}")
        return extractors[key], test_sets[key]

    tests = features_for(first)[1]  # the same images and masks under every key: the table's rows
    done: list[VariantResult] = []
    for name in args.variants:
        print(f"variant {name!r}: fit on {sum(len(c.train) for c in categories)} train/good images", file=sys.stderr)
        extractor, variant_tests = features_for(name)
        done.append(VariantResult(name, VARIANTS[name],
                                  run_seed(categories, variant_tests, configs[name], extractor, test_curves=False)))
        print("\n".join(table(done[-1:], tests)), file=sys.stderr, flush=True)
        text = write(stem, args, args.variants, done, tests, mach, started)
    print(text)
    print(f"wrote {stem}.md, {stem}.json ({len(done)} variants)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
