"""The method end to end in plain Python: fit one model on normal images, evaluate it, publish it.

This is the in-process composition of the stages in :mod:`lafite_core.stages`; the Prefect flows
compose the same stage functions with the store between them. A notebook user calls:

    cats = discover("data/mpdd")
    fitted = fit(cats, cpu_profile())
    rows = evaluate(fitted.model, cats)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from lafite_core.method.backbone import FeatureExtractor
from lafite_core.config import PipelineConfig
from lafite_core.datapath.data import Category
from lafite_core.store.feature_store import (
    FeatureSink,
    MemoryFeatures,
    extract_into,
    feature_key,
    read_training_features,
)
from lafite_core.method.model import LafiteModel, Scorer
from lafite_core.method.scoring import METHODS, Method
from lafite_core.stages import (
    MetricsRow,
    Progress,
    Selection,
    Trained,
    backbone_card,
    measure,
    plan_training,
    quiet,
    require_readable,
    score_category,
    select,
    selection_files,
    train_model,
    training_summary,
    version_files,
)
from lafite_core.store.layout import LOSSES_FILE
from lafite_core.store.losses import losses_bytes
from lafite_core.store.storage import ModelVersion, Store
from lafite_core.warm_start import WarmStart

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """A tuned, calibrated model and how it came to be."""

    model: LafiteModel
    selection: Selection
    trained: Trained
    timings: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (url, error) of unreadable training images
    skipped: list[str] = field(default_factory=list)  # categories without train/good images

    @property
    def losses(self) -> list[float]:
        return self.trained.losses


def fit(
    categories: Sequence[Category],
    cfg: PipelineConfig,
    extractor: FeatureExtractor | None = None,
    storage_options: dict | None = None,
    progress: Progress = quiet,
    device: str | None = None,
    warm_start: WarmStart | None = None,
    sink: FeatureSink | None = None,
) -> FitResult:
    """Train one model on the train/good images of all ``categories`` (the paper's unified setting).

    ``warm_start`` (``warm_start.warm_start_from(store, "latest", cfg)``) fine-tunes a parent
    version's U-Net instead of training one from scratch. ``sink``: where features are extracted to
    (default: memory); a ``FeatureStore`` keeps them between runs, so only new images are extracted.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    plan = plan_training(categories, cfg)
    extractor = extractor or FeatureExtractor(cfg.backbone)
    sink = MemoryFeatures(cfg) if sink is None else sink
    if sink.key != feature_key(cfg):
        raise ValueError(f"the feature sink holds features of key {sink.key}, this config extracts {feature_key(cfg)}: "
                         f"open it with this config")
    # held-out images too, as the train flow does: the same backbone batches give the same features
    report = extract_into(sink, plan.fit + plan.holdout, extractor, storage_options, progress=progress)
    for url, error in report.failures:
        log.warning("skipping unreadable training image: %s (%s)", url, error)
    require_readable(report)
    features = read_training_features(sink, plan.fit)
    timings["extract_train"] = time.perf_counter() - t0
    t = time.perf_counter()
    if cfg.train.workers > 1:
        log.warning("train.workers=%d is for the Ray flows (`lafite train`); the in-process pipeline trains the "
                    "U-Net in this one process", cfg.train.workers)
    trained = train_model(features, cfg, plan.category_keys, backbone_card(extractor), device, progress=progress,
                          warm_start=warm_start)
    timings["train_and_coreset"] = time.perf_counter() - t
    timings["train_unet"] = trained.unet_seconds
    t = time.perf_counter()
    selection = select(trained.model, extractor, plan.holdout, plan.fit, storage_options, device, progress)
    timings["search"] = time.perf_counter() - t
    timings["fit_total"] = time.perf_counter() - t0
    selection.model.extra["timings"] = timings
    return FitResult(selection.model, selection, trained, timings, list(report.failures), plan.skipped)


def publish(store: Store, fitted: FitResult, run_id: str = "in-process") -> ModelVersion:
    """Publish a fitted model as a version of ``store`` (the same files the train flow publishes)."""
    summary = training_summary(fitted.trained, fitted.failures, fitted.skipped)
    files = version_files({**selection_files(fitted.selection), LOSSES_FILE: losses_bytes(fitted.losses)},
                          run_id, summary)
    return store.publish_model(files, fitted.model.extra["config_hash"])


def evaluate(
    model: LafiteModel, categories: Sequence[Category], extractor: FeatureExtractor | None = None,
    methods: Sequence[Method] = METHODS, storage_options: dict | None = None,
    progress: Progress = quiet, device: str | None = None,
) -> list[MetricsRow]:
    """Score every test image of every category with every method; one row per (category, method)."""
    extractor = extractor or FeatureExtractor(model.config.backbone)
    scorer = Scorer(model, device)
    rows: list[MetricsRow] = []
    for c in categories:
        if not c.test:
            log.warning("%s has no test images; skipped", c.key)
            continue
        cs, failures = score_category(scorer, extractor, c, methods, storage_options, progress)
        for f in failures:
            log.warning("unreadable test image left out of the metrics: %s", f.error)
        rows += measure(cs, methods, model.config, len(failures))
    return rows

