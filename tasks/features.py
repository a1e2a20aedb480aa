"""Discovery and feature extraction into the Zarr store."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime  # noqa: F401  (environment before Ray/Prefect work)
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.config import PipelineConfig
from lafite_core.datapath.data import Category, Sample, discover
from lafite_core.datapath.layouts import DataLayout
from lafite_core.store.feature_store import ExtractionReport, FeatureStore, extract_into
from lafite_core.stages import backbone_card, require_readable
from lafite_core.store.storage import Store, storage_options_from_env
from tasks.progress import LogProgress, run_logger


@task(name="discover", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def discover_task(data_root: str, categories: list[str] | None = None,
                  layout: DataLayout | None = None) -> list[Category]:
    """Categories under ``data_root`` in ``layout`` (default: detected); metadata only."""
    found = discover(data_root, categories, storage_options_from_env(data_root), layout)
    log = run_logger()
    for c in found:
        log.info("%s: %d train, %d test images%s", c.key, len(c.train), len(c.test),
                 "" if c.has_masks else " (no masks)")
    return found


@dataclass(frozen=True)
class Extraction:
    report: ExtractionReport
    backbone: dict  # name, weight source, level channels


@task(name="extract-features", cache_policy=NONE, retries=2, retry_delay_seconds=10)
def extract_features_task(store_url: str, config_json: str, samples: list[Sample], data_root: str) -> Extraction:
    """Write features of ``samples`` into the store's Zarr groups; only missing or changed images."""
    cfg = PipelineConfig.from_json(config_json)
    log = run_logger()
    extractor = FeatureExtractor(cfg.backbone)
    card = backbone_card(extractor)
    fstore = FeatureStore(Store(store_url), cfg, card)
    report = extract_into(fstore, samples, extractor, storage_options_from_env(data_root),
                          progress=LogProgress(log))
    log.info("features: %d extracted, %d already in the store, %d unreadable", report.extracted,
             report.reused, len(report.failures))
    for url, error in report.failures:
        log.warning("unreadable image skipped: %s (%s)", url, error)
    require_readable(report)
    return Extraction(report, card)
