"""The ``lafite`` command: demo, train, evaluate, score, report, versions. Each runs the Prefect flows."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import tasks.runtime  # noqa: F401  (environment first)
from lafite_core.config import PROFILES
from lafite_core.datapath.layouts import FORMATS, DataLayout
from lafite_core.method.scoring import METHODS

log = logging.getLogger("lafite")


def set_override(overrides: dict[str, Any], assignment: str) -> None:
    """'diffusion.epochs=50' -> overrides['diffusion']['epochs'] = 50 (value parsed as JSON if it can be)."""
    key, sep, raw = assignment.partition("=")
    if not sep or "." not in key:
        raise SystemExit(f"--set expects section.field=value (e.g. diffusion.epochs=50), got {assignment!r}")
    section, field = key.split(".", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    overrides.setdefault(section, {})[field] = value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in args.set or []:
        set_override(out, a)
    if getattr(args, "epochs", None):  # exactly this many epochs: the profile's step budget no longer applies
        out.setdefault("diffusion", {}).update(epochs=args.epochs, max_steps=None)
    if getattr(args, "max_steps", None):
        out.setdefault("diffusion", {})["max_steps"] = args.max_steps
    return out


def _add_common(p: argparse.ArgumentParser, store_default: str | None = None) -> None:
    p.add_argument("--store", default=store_default,
                   help="artefact store: a folder or s3://bucket/prefix (default: $LAFITE_STORE or ./lafite-store)")
    p.add_argument("--ray-address", default=None,
                   help="address of an existing Ray cluster (default: start a local Ray on 127.0.0.1)")


def _add_data(p: argparse.ArgumentParser, root_help: str) -> None:
    p.add_argument("--data-root", required=True, help=root_help)
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="layout of the data root: mvtec (MVTec AD, MPDD), visa (split_csv/1cls.csv), folder "
                        "(the options below); auto (default): folder when --normal-dir is given, else VisA "
                        "where split_csv/1cls.csv exists, else MVTec AD")
    folder = p.add_argument_group("folder layout (one category; folders relative to the data root)")
    folder.add_argument("--normal-dir", default=None, help="folder of normal images")
    folder.add_argument("--abnormal-dir", default=None, help="folder of anomalous test images")
    folder.add_argument("--mask-dir", default=None,
                        help="folder of masks named like the anomalous images (<stem>.png or <stem>_mask.png)")
    folder.add_argument("--normal-test-dir", default=None,
                        help="folder of normal test images (default: --normal-split-ratio of --normal-dir)")
    folder.add_argument("--normal-split-ratio", type=float, default=0.2,
                        help="share of the normal images held out for testing without --normal-test-dir (0.2)")
    folder.add_argument("--category-name", default=None, help="category name (default: the root's folder name)")


def _layout(args: argparse.Namespace) -> DataLayout:
    """The layout the data options describe; a contradiction exits with the reason."""
    from pydantic import ValidationError

    try:
        return DataLayout(format=args.format, normal_dir=args.normal_dir, abnormal_dir=args.abnormal_dir,
                          mask_dir=args.mask_dir, normal_test_dir=args.normal_test_dir,
                          normal_split_ratio=args.normal_split_ratio, category_name=args.category_name)
    except ValidationError as exc:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise SystemExit(f"lafite: {reasons}") from None


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                   help="cpu: EfficientNet-Lite0 + small U-Net, minutes on a CPU; paper: the paper's settings, for a GPU")
    p.add_argument("--categories", nargs="+", default=None,
                   help="only these categories (name or dataset/category); default: all under the root")
    p.add_argument("--epochs", type=int, default=None,
                   help="train exactly this many epochs (instead of the profile's budget)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="training budget in optimiser steps (the cpu profile's default: diffusion.max_steps)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set scoring.ddim_steps=10 (repeatable)")
    p.add_argument("--device", default=None, help="training device (default: CUDA when present, else CPU)")


def _store(args: argparse.Namespace) -> str:
    from flows.params import default_store

    return args.store or default_store()


def cmd_train(args: argparse.Namespace) -> int:
    from flows.params import TrainParams
    from flows.train import train_flow

    out = train_flow(TrainParams(data_root=args.data_root, layout=_layout(args), categories=args.categories,
                                 profile=args.profile, overrides=_overrides(args), seed=args.seed,
                                 evaluate=not args.no_evaluate, warm_start=args.warm_start,
                                 store=_store(args), ray_address=args.ray_address, device=args.device))
    print(f"\nmodel version {out.model_version} (tau={out.tau}, K={out.k}, threshold {out.threshold:.4f})")
    print(f"store: {out.store}")
    if out.evaluation:
        _print_rows(out.evaluation.rows)
        print(f"metrics: {out.evaluation.metrics_url}")
        print(f"report:  {out.evaluation.report_url}")
    return 0


def _print_rows(rows: Sequence[dict]) -> None:
    from lafite_core.store.tables import format_table

    methods = list(dict.fromkeys(r["method"] for r in rows))
    print("\nAUROC image / pixel and AUPRO, in %:")
    print(format_table(rows, methods))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate import evaluate_flow
    from flows.params import EvaluateParams, TrainParams
    from flows.train import train_flow
    from lafite_core.store.storage import Store
    from lafite_core.store.tables import metrics_table, seed_summary

    layout = _layout(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = args.store or str(out_dir / "store")
    started = time.perf_counter()
    rows: list[dict] = []
    versions = []
    reports: list[str] = []
    if args.model_version:
        ev = evaluate_flow(EvaluateParams(data_root=args.data_root, layout=layout, categories=args.categories,
                                          store=store, model_version=args.model_version,
                                          ray_address=args.ray_address))
        rows += ev.rows
        versions.append(ev.model_version)
        reports.append(ev.report_url)
    else:
        # unified (the paper, default): one model for all categories; --per-category: one model per
        # category, each in its own store under STORE/per-category/<dataset>/<category>
        groups: list[tuple[list[str] | None, str]] = [(args.categories, store)]
        if args.per_category:
            from lafite_core.datapath.data import discover
            from lafite_core.store.storage import storage_options_from_env

            cats = discover(args.data_root, args.categories, storage_options_from_env(args.data_root), layout)
            groups = [([c.key], f"{store}/per-category/{c.dataset}/{c.name}") for c in cats]
        for seed in args.seeds:
            for categories, group_store in groups:
                tr = train_flow(TrainParams(data_root=args.data_root, layout=layout, categories=categories,
                                            profile=args.profile, overrides=_overrides(args), seed=seed,
                                            evaluate=True, store=group_store,
                                            ray_address=args.ray_address, device=args.device))
                assert tr.evaluation is not None
                rows += tr.evaluation.rows
                versions.append(tr.model_version)
                reports.append(tr.evaluation.report_url)
    elapsed = time.perf_counter() - started
    for seed in sorted({r["seed"] for r in rows}):
        print(f"\nseed {seed}:")
        _print_rows([r for r in rows if r["seed"] == seed])
    if len({r["seed"] for r in rows}) > 1:
        print("\nmean +- std over seeds (image AUROC, pixel AUROC), in %:")
        img = seed_summary(rows, "image_auroc")
        pix = seed_summary(rows, "pixel_auroc")
        for key, (m, s, n) in sorted(img.items()):
            p = pix.get(key)
            print(f"  {key[0]}/{key[1]:20s} {key[2]:15s} {100 * m:5.1f} +- {100 * s:4.1f}"
                  + (f"   {100 * p[0]:5.1f} +- {100 * p[1]:4.1f}" if p else "") + f"   (n={n})")
    table = metrics_table(rows)
    Store(str(out_dir)).write_table(["metrics.parquet"], table, {"model_versions": json.dumps(versions)})
    print(f"\nwrote {out_dir / 'metrics.parquet'} ({len(rows)} rows); store {store}; "
          f"total time {elapsed / 60:.1f} min")
    for url in reports:
        print(f"report: {url}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from flows.batch_score import batch_score_flow
    from flows.params import ScoreParams

    out = batch_score_flow(ScoreParams(source=args.source, store=_store(args), model_version=args.model_version,
                                       shard_size=args.shard_size, heatmaps=args.heatmaps, method=args.method,
                                       ray_address=args.ray_address, stale_after_s=args.stale_after))
    print(f"\nmodel {out.model_version}: {out.listed} images, {out.scored} scored, {out.skipped} skipped "
          f"(already scored), {out.errors} errors")
    print(f"table: {out.table_url or '(nothing new to write)'}")
    print(f"report: {out.report_url}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from lafite_core.store import layout
    from lafite_core.stages import CARD_FILE
    from lafite_core.store.storage import Store

    store = Store(_store(args))
    versions = store.list_versions()
    if not versions:
        print(f"no complete model version in {store.root_url}")
        return 1
    for v in versions:
        card = json.loads(store.read_bytes(*layout.model_file(v.version, CARD_FILE)))
        parent = f"  fine-tuned from {card['parent_version']}" if card.get("parent_version") else ""
        print(f"{v.version}  created {v.created}  config {v.config_hash}  tau={card['tau']} K={card['k']}  "
              f"categories: {', '.join(card['categories'])}{parent}")
    print(f"latest: {versions[-1].version}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lafite_core.report.target import write_report
    from lafite_core.store.storage import Store

    try:
        target, url = write_report(Store(_store(args)), args.name)
    except ValueError as exc:
        raise SystemExit(f"lafite report: {exc}")
    print(f"{target.kind} report of run {target.run_id} (model {target.model_version}): {url}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.batch_score import batch_score_flow
    from flows.params import ScoreParams, TrainParams
    from flows.train import train_flow
    from flows.demo_data import generate_demo_dataset
    from lafite_core.store import layout
    from lafite_core.store.storage import Store

    root = Path(args.dir).resolve()
    started = time.perf_counter()
    summary = generate_demo_dataset(root / "data")
    print(f"demo data: {summary.num_train} train and {summary.num_test} test images in "
          f"{len(summary.categories)} categories ({', '.join(summary.categories)}) at {root / 'data'}")
    store = args.store or str(root / "store")
    overrides = _overrides(args)
    if not args.epochs:  # the demo set is small and regular: 60 epochs keep the whole demo to minutes
        overrides.setdefault("diffusion", {}).setdefault("epochs", DEMO_EPOCHS)
    tr = train_flow(TrainParams(data_root=str(root / "data"), profile="cpu", overrides=overrides, store=store,
                                ray_address=args.ray_address))
    dump = _demo_dump(root / "data" / summary.dataset, root / "dump")
    print(f"incoming dump to batch-score (the demo's test images, unlabelled): {dump}")
    sc = batch_score_flow(ScoreParams(source=str(dump), store=store, heatmaps=True, ray_address=args.ray_address))
    assert tr.evaluation is not None
    _print_rows(tr.evaluation.rows)
    where = Store(store)
    print(f"\nmodel version: {tr.model_version} in {where.url(*layout.models())} (tau={tr.tau}, K={tr.k})")
    print(f"metrics:       {tr.evaluation.metrics_url}")
    print(f"summary:       {tr.evaluation.summary_url}")
    print(f"batch scores:  {sc.table_url} ({sc.scored} images scored, {sc.errors} errors)")
    print(f"heat maps:     {where.url(*layout.heatmaps(tr.model_version, sc.run_id))}/")
    print(f"features:      {where.url(*layout.features_root())}/")
    print(f"batch report:  {sc.report_url}")
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    print(f"\nevaluation report (open in a browser): {tr.evaluation.report_url}")
    return 0


DEMO_EPOCHS = 60


def _demo_dump(dataset: Path, dump: Path) -> Path:
    """Copy the demo's test images into a flat, unlabelled dump (as a line camera would deliver them)."""
    import shutil

    for img in sorted(dataset.glob("*/test/*/*.png")):
        category, kind = img.parts[-4], img.parts[-2]
        target = dump / category / f"{kind}_{img.name}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(img, target)
    return dump


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lafite", description="LafitE multi-class visual anomaly detection pipeline.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="generate a small multi-class dataset, train, evaluate and batch-score it")
    d.add_argument("--dir", default="lafite-demo", help="working folder for the demo data and store")
    d.add_argument("--store", default=None, help="artefact store (default: DIR/store)")
    d.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEMO_EPOCHS} for the demo)")
    d.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config field")
    d.add_argument("--ray-address", default=None, help="existing Ray cluster (default: local)")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train and publish a model version (the nightly job)")
    _add_data(t, "dataset root: folder or s3:// prefix (MVTec AD, VisA or folder layout; see --format)")
    _add_training(t)
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation, sampling and noise")
    t.add_argument("--no-evaluate", action="store_true", help="skip the evaluation on labelled test sets")
    t.add_argument("--warm-start", default="none", metavar="latest|VERSION|none",
                   help="fine-tune an earlier version's U-Net for diffusion.warm_start_fraction (cpu profile 0.1, "
                        "paper 0.25) of the training budget instead of training from scratch: latest (when its "
                        "features and U-Net shape match this config; otherwise from scratch, with a warning), a "
                        "named version (an error if it does not match) or none (default; the nightly deployment "
                        "uses latest)")
    _add_common(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="train per seed on ROOT, evaluate, write OUT/metrics.parquet")
    _add_data(e, "dataset root (folder or s3:// prefix) holding one dataset or several; see --format")
    e.add_argument("--out", required=True, help="output folder (metrics.parquet; the store defaults to OUT/store)")
    _add_training(e)
    e.add_argument("--seeds", type=int, nargs="+", default=[0], help="one model per seed; mean +- std reported")
    e.add_argument("--model-version", default=None, help="evaluate this stored version instead of training")
    e.add_argument("--per-category", action="store_true",
                   help="train one model per category instead of one unified model (the paper's setting)")
    _add_common(e)
    e.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("score", help="batch-score every image under SOURCE (folder or s3:// prefix)")
    s.add_argument("source", help="folder or s3:// prefix; png, jpg, bmp, tiff, searched recursively")
    s.add_argument("--model-version", default=None, help="default: the latest complete version")
    s.add_argument("--heatmaps", action="store_true", help="also write heat-map overlays as PNG")
    s.add_argument("--shard-size", type=int, default=64, help="images per Ray task")
    s.add_argument("--method", choices=list(METHODS), default="lafite",
                   help="scoring method (decisions are calibrated for lafite)")
    s.add_argument("--stale-after", type=float, default=900.0, metavar="SECONDS",
                   help="rows of a run silent this long come from a crashed run and are merged into this one")
    _add_common(s)
    s.set_defaults(fn=cmd_score)

    r = sub.add_parser("report", help="(re)write the HTML report of a run: reports/<run_id>/index.html")
    r.add_argument("name", metavar="RUN_ID|MODEL_VERSION",
                   help="an evaluation or batch-scoring run id, or a model version (its latest evaluation)")
    r.add_argument("--store", default=None,
                   help="artefact store: a folder or s3://bucket/prefix (default: $LAFITE_STORE or ./lafite-store)")
    r.set_defaults(fn=cmd_report)

    v = sub.add_parser("versions", help="list the complete model versions in the store")
    _add_common(v)
    v.set_defaults(fn=cmd_versions)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from flows import console

    args = build_parser().parse_args(argv)
    before = console.children()
    console.sweep_at_exit(before)
    debug_log, handlers = console.configure(args.fn.__name__.removeprefix("cmd_"), args.verbose)
    replaced = console.install_signal_handlers()
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt as stop:
        signum = console.signal_of(stop)
        log.warning("interrupted (%s): stopping; finished work (features, checkpoints, scored shards, published "
                    "versions) is kept, run the same command again to resume", signal_name(signum))
        return 128 + signum
    finally:
        console.stop_ray()  # Prefect's temporary server stops with the interpreter; the exit sweep ends the rest
        if debug_log:
            log.debug("debug log: %s", debug_log)
        for s, h in replaced.items():
            signal.signal(s, h)
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


if __name__ == "__main__":
    sys.exit(main())
