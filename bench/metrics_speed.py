"""Metrics speed: scikit-learn's AUROC / AP against the rank-based path kept for large inputs.

Pixel metrics run over ~10 million pixels a category (400 test images x 224 x 224 is 20M), and the
hyperparameter search computes pixel AUROC at every grid point. Both paths run side by side in this
run on the same synthetic pixels, about 3% positives, float32 scores of two kinds: quantised to
1e-4 (many ties, some across classes) and continuous (few ties, like upsampled anomaly maps).
Rank-based: ``metrics._rank_auroc`` / ``_rank_average_precision`` (each class's scores sorted,
the positives placed among the negatives by binary search, int64 counts); sklearn: ``roc_auc_score`` /
``average_precision_score``; both after the library's input checks. The public ``auroc`` /
``average_precision`` (which pick a path by size) are timed beside them. The curve helpers are
timed at the largest size, full and thinned to 1,000 points.

    .venv/bin/python bench/metrics_speed.py                  # 1M and 10M pixels, best of 3
    .venv/bin/python bench/metrics_speed.py --quick          # 100k and 1M pixels, best of 1

Writes ``bench/results/metrics_speed[_quick].md`` (also printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from common import machine, out_stem, write_text
from lafite_core.method import metrics
from lafite_core.method.metrics import auroc, average_precision, pr_curve, roc_curve

POSITIVE_RATE = 0.03
QUANTUM = 1e-4
KINDS = ("ties", "continuous")


@dataclass(frozen=True)
class Row:
    pixels: int
    kind: str
    distinct: int  # distinct scores
    metric: str
    rank_s: float  # checks + rank-based path
    sklearn_s: float  # checks + sklearn
    public_s: float  # metrics.auroc / average_precision as callers see them
    abs_diff: float  # |rank-based - sklearn|

    @property
    def ratio(self) -> float:
        return self.sklearn_s / self.rank_s


def pixels(n: int, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels [n] bool (~3% positive) and float32 scores [n], positives higher on average.

    ``kind``: "ties" quantises the scores to 1e-4 (about 10k distinct values), "continuous" does not.
    """
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < POSITIVE_RATE
    raw = (rng.standard_normal(n) + 1.5 * labels) / 8.0
    if kind == "ties":
        raw = np.round(raw / QUANTUM) * QUANTUM
    return labels, raw.astype(np.float32)


def best_of(repeats: int, fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` calls ``fn(*args, **kwargs)``, and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, out


def with_checks(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[np.ndarray, np.ndarray], float]:
    """``fn`` on flat checked labels and scores, the input checks timed with it as the library runs them."""
    return lambda labels, scores: fn(*metrics._binary_labels(labels, scores))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="pixel counts (default 1M and 10M; --quick 100k and 1M)")
    parser.add_argument("--repeats", type=int, help="calls per timing, the fastest counts (default 3; --quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one call each")
    parser.add_argument("--out", help="output stem (default bench/results/metrics_speed[_quick])")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000])
    repeats = args.repeats or (1 if args.quick else 3)

    mach = machine()
    print(f"machine: {mach.line()}", flush=True)
    t_start = time.perf_counter()

    rows: list[Row] = []
    pairs = (("AUROC", metrics._rank_auroc, roc_auc_score, auroc),
             ("AP", metrics._rank_average_precision, average_precision_score, average_precision))
    for n in sizes:
        for kind in KINDS:
            labels, scores = pixels(n, kind, args.seed)
            distinct = int(np.unique(scores).size)
            log(f"{n:,} pixels, {kind}: {distinct:,} distinct scores, {labels.mean():.2%} positive")
            for name, rank_fn, sklearn_fn, public_fn in pairs:
                rank_s, rank_v = best_of(repeats, with_checks(rank_fn), labels, scores)
                sk_s, sk_v = best_of(repeats, with_checks(sklearn_fn), labels, scores)
                public_s, _ = best_of(repeats, public_fn, labels, scores)
                row = Row(n, kind, distinct, name, rank_s, sk_s, public_s, abs(float(rank_v) - float(sk_v)))
                log(f"  {name}: rank-based {rank_s:.3f} s, sklearn {sk_s:.3f} s (x{row.ratio:.1f}), "
                    f"public {public_s:.3f} s, |diff| {row.abs_diff:.1e}")
                rows.append(row)

    n = sizes[-1]
    labels, scores = pixels(n, "ties", args.seed)
    curve_rows: list[tuple[str, float, int]] = []
    for name, fn, max_points in (("roc_curve", roc_curve, None), ("roc_curve", roc_curve, 1000),
                                 ("pr_curve", pr_curve, None), ("pr_curve", pr_curve, 1000)):
        seconds, curve = best_of(repeats, fn, labels, scores, max_points=max_points)
        label = f"{name}(max_points={max_points})"
        curve_rows.append((label, seconds, int(curve[0].size)))
        log(f"  {label}: {seconds:.3f} s, {curve[0].size:,} points")

    total = time.perf_counter() - t_start
    quick_note = ["**Quick (smoke) run: small sizes, one call each; not a result.**", ""] if args.quick else []
    lines = [
        "# Metrics speed: scikit-learn vs. the rank-based AUROC / AP",
        "",
        *quick_note,
        f"- machine: {mach.line()}",
        (f"- load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; other work on the "
         "machine skews the absolute figures, the ratios less"),
        (f"- synthetic pixels: {POSITIVE_RATE:.0%} positives, float32 scores quantised to {QUANTUM:g} (ties) "
         f"or continuous; seed {args.seed}; fastest of {repeats} call(s) per cell; total time {total:.0f} s"),
        ("- rank-based: `metrics._rank_auroc` / `_rank_average_precision`; sklearn: `roc_auc_score` / "
         "`average_precision_score`; both after `metrics._binary_labels` (the input checks). public: "
         f"`metrics.auroc` / `average_precision`, rank-based from {metrics._FAST_PATH_MIN_SAMPLES:,} "
         "samples on"),
        "",
        ("| pixels | scores | distinct | metric | rank-based (s) | sklearn (s) | sklearn / rank-based | "
         "public (s) | abs(rank-based - sklearn) |"),
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {r.pixels:,} | {r.kind} | {r.distinct:,} | {r.metric} | {r.rank_s:.3f} | {r.sklearn_s:.3f} | "
          f"{r.ratio:.1f} | {r.public_s:.3f} | {r.abs_diff:.1e} |" for r in rows),
        "",
        f"Curve helpers at {n:,} pixels, scores with ties:",
        "",
        "| call | s | points |",
        "|---|---|---|",
        *(f"| `{label}` | {seconds:.3f} | {points:,} |" for label, seconds, points in curve_rows),
        "",
    ]
    text = "\n".join(lines)
    stem = out_stem(args.out, "metrics_speed", args.quick)
    write_text(stem.parent / (stem.name + ".md"), text)
    print(text)
    print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
