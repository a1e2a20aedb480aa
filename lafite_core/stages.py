"""The method as a fixed chain of stages, each one function with typed inputs and outputs.

    plan_training                      which images train, which are held out (pseudo-validation;
                                       a per-image draw, stable as categories grow)
    feature_store.extract_into         read, decode, extract features into a sink (Zarr or memory)
    feature_store.read_training_features
    train_model                        statistics, U-Net (eq. 6; or fine-tuned from a parent version,
                                       ``warm_start``), coresets (eq. 9; a warm start merges its
                                       parent's: ``lafite_bank``, ``baseline_bank``) -> untuned model
    select                             pseudo-validation set, search tau then K (4.5), calibration
    selection_files, version_files     the files of a model version (publication)
    score_category, score_images       scores and maps for labelled or unlabelled images (eq. 10-12)
    measure                            metric rows per (category, method)

``lafite_core.pipeline`` composes them in process; the Prefect tasks call the same functions with the
store between them (resolve references, call one stage, write its result). No stage logic lives in
``tasks/`` or ``flows/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from lafite_core.method.backbone import FeatureExtractor
from lafite_core.method.calibration import Calibration, calibrate
from lafite_core.config import CoresetConfig, DiffusionConfig, PipelineConfig, config_hash
from lafite_core.method import patchcore
from lafite_core.method.coreset import BankSources, bank_rows, flat_patches, merge_plan
from lafite_core.datapath.data import Category, LoadedSample, Sample
from lafite_core.store.feature_store import ExtractionReport, TrainingFeatures, feature_key
from lafite_core.datapath.features import LoadFailure, extract, load_many
from lafite_core.datapath.heatmap import overlay_png
from lafite_core.method.metrics import CategoryMetrics, aupro, auroc, average_precision, compute_category_metrics
from lafite_core.method.knn import Neighbours
from lafite_core.method.precision import resolve_precision
from lafite_core.method.model import MODEL_FILES, POSITION_STATS, LafiteModel, Scorer
from lafite_core.method.normalize import FeatureStats
from lafite_core.method.scoring import METHODS, AnomalyMaps, Method, position_normalized_scores
from lafite_core.method.search import SearchResult, search_hyperparameters
from lafite_core.store.storage import Store
from lafite_core.method.synthesis import build_pseudo_anomalies
from lafite_core.store.tables import METRIC_COLUMNS, parquet_bytes, search_table
from lafite_core.method.views import apply_view, native_grids
from lafite_core.method.train import TrainState, pick_device, planned_epochs, train_unet
from lafite_core.warm_start import WarmStart, training_budget

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as long steps advance (total 0 when unknown)."""

SEARCH_FILE = "search.parquet"
CALIBRATION_FILE = "calibration.json"
CONFIG_FILE = "config.json"
CARD_FILE = "model_card.json"


def quiet(stage: str, done: int, total: int) -> None:
    """A Progress that reports nothing."""


# --------------------------------------------------------------------------- plan


def trainable(categories: Sequence[Category]) -> tuple[list[Category], list[str]]:
    """(categories with train/good images, keys of those without); raises when none has any.

    A category without normal images cannot be learned; it is skipped with a warning (its images
    will score as unfamiliar, i.e. anomalous, which errs on the safe side) and recorded.
    """
    ok = [c for c in categories if c.train]
    skipped = [c.key for c in categories if not c.train]
    for key in skipped:
        log.warning("%s has no train/good images: it is left out of training", key)
    if not ok:
        raise ValueError(f"no category has train/good images ({', '.join(skipped) or 'none found'}); "
                         f"expected <root>/<category>/train/good/*.png")
    return ok, skipped


def holdout_draw(seed: int, image_id: str) -> float:
    """A uniform number in [0, 1) fixed by the seed and the image id (its path in the dataset), so an
    image's side of the split does not depend on which other images the category has."""
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_holdout(samples: Sequence[Sample], cfg: PipelineConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """train/good of one category -> (samples to fit on, held-out pseudo-validation normals).

    An image is held out when its draw (:func:`holdout_draw`) falls below ``holdout_fraction``, so
    the share held out is ``holdout_fraction`` on average (binomial: a 10-image category holds out 4
    or more about one time in eight) and images added to a category later never move an earlier
    fitted image to the held-out side (a nightly warm start keeps its parent's coreset rows:
    ``coreset.merge``); when fewer than ``min_holdout`` fall below it, the ``min_holdout`` lowest
    draws are held out. Nothing is held out when fewer than two images would remain to fit on (so a
    category that grows past that point, and one whose draws hold out all but one, is the exception:
    a warm start then rebuilds its coreset). The held-out normals calibrate the threshold even when
    the search is disabled.
    """
    syn = cfg.synthesis
    n = len(samples)
    if syn.holdout_fraction == 0:
        return list(samples), []
    draws = np.array([holdout_draw(seed, s.image_id) for s in samples])
    hold = draws < syn.holdout_fraction
    if hold.sum() < syn.min_holdout:
        hold = np.zeros(n, dtype=bool)
        hold[np.argsort(draws, kind="stable")[: syn.min_holdout]] = True
    if n - hold.sum() < 2:
        log.warning("a category with %d train images is too small to hold out pseudo-validation "
                    "normals; it is left out of the search and the calibration", n)
        return list(samples), []
    return [s for s, h in zip(samples, hold) if not h], [s for s, h in zip(samples, hold) if h]


@dataclass(frozen=True)
class TrainingPlan:
    """Which categories train, which were skipped, and the fit / held-out split of train/good."""

    categories: list[Category]
    skipped: list[str]
    fit: list[Sample]
    holdout: list[Sample]

    @property
    def category_keys(self) -> list[str]:
        return [c.key for c in self.categories]


def plan_training(categories: Sequence[Category], cfg: PipelineConfig) -> TrainingPlan:
    """All categories' train/good -> TrainingPlan (held-out normals drawn per image from cfg.seed)."""
    ok, skipped = trainable(categories)
    fit: list[Sample] = []
    holdout: list[Sample] = []
    for c in ok:
        keep, hold = split_holdout(c.train, cfg, cfg.seed)
        fit += keep
        holdout += hold
    return TrainingPlan(ok, skipped, fit, holdout)


# --------------------------------------------------------------------------- images


def load_all(samples: Sequence[Sample], cfg: PipelineConfig, storage_options: dict | None = None,
             progress: Progress = quiet, stage: str = "load") -> tuple[list[LoadedSample], list[LoadFailure]]:
    """Read and decode ``samples``; unreadable ones come back as failures, in order."""
    ok: list[LoadedSample] = []
    bad: list[LoadFailure] = []
    for i, item in enumerate(load_many(samples, cfg.data.image_size, cfg.data.max_image_pixels, storage_options,
                                          crop=cfg.data.center_crop)):
        if isinstance(item, LoadFailure):
            bad.append(item)
        else:
            ok.append(item)
        progress(stage, i + 1, len(samples))
    return ok, bad


def require_readable(report: ExtractionReport) -> None:
    """Raises, naming the first unreadable files, when extraction left nothing to train on."""
    if report.extracted + report.reused == 0:
        raise ValueError("no readable training images: "
                         + "; ".join(f"{url} ({error})" for url, error in report.failures[:5]))


def image_seed(base: int, content_hash: str) -> int:
    """Noise seed for one image: depends on the image's bytes and the run seed, not on its batch."""
    return (int(content_hash[:15], 16) ^ (base * 0x9E3779B97F4A7C15)) % (2**63)


def backbone_card(extractor: FeatureExtractor) -> dict:
    """What a model records about its backbone: name, weight source, level channels and strides."""
    return {"name": extractor.info.name, "weights": extractor.info.weights_source,
            "channels": list(extractor.info.channels), "reductions": list(extractor.info.reductions)}


# --------------------------------------------------------------------------- train


def training_key(cfg: PipelineConfig, data: Sequence[tuple[str, str]], precision: str = "fp32",
                 parent_version: str | None = None) -> str:
    """Identifies trained U-Net weights: feature settings, diffusion settings, seed, training data,
    the training precision (as resolved on the training device; fp32 keeps the keys it always had),
    the number of data-parallel workers (when more than one) and, for a warm start, the parent
    version and the fraction of the budget.

    ``data`` is (image id, content hash) of every training image. Scoring, search, synthesis and
    coreset settings are left out: changing them reuses the weights; so is ``warm_start_fraction``
    when training from scratch.
    """
    payload = {"feature_key": feature_key(cfg), "view": cfg.features.model_dump(mode="json"),
               "diffusion": cfg.diffusion.model_dump(mode="json", exclude={"warm_start_fraction"}), "seed": cfg.seed}
    if precision != "fp32":
        payload["precision"] = precision
    if cfg.train.workers != 1:  # data-parallel weights differ from one worker's; one worker keeps its keys
        payload["workers"] = cfg.train.workers
    if parent_version is not None:
        payload["warm_start"] = {"parent": parent_version, "fraction": cfg.diffusion.warm_start_fraction}
    h = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for image_id, content in sorted(data):
        h.update(f"{image_id}\0{content}\n".encode())
    return "t" + h.hexdigest()[:16]


@dataclass(frozen=True)
class Trained:
    """An untuned model (tau and K from the config until :func:`select`) and how training went."""

    model: LafiteModel
    losses: list[float]
    epochs: int
    device: str
    resumed_from_epoch: int
    precision: str = "fp32"
    parent_version: str | None = None  # the version whose U-Net it fine-tuned (None: from scratch)
    warm_start_fraction: float | None = None  # the share of the budget it trained, when warm-started
    unet_seconds: float = 0.0  # wall time this run spent training the U-Net (statistics and coresets apart)

    @property
    def final_loss(self) -> float:
        return float(self.losses[-1]) if self.losses else float("nan")


@dataclass(frozen=True)
class UNetJob:
    """What training the U-Net needs once the features are standardised (:func:`train_model`)."""

    features: torch.Tensor  # normalised [N, D, S, S], all training rows
    stats: FeatureStats  # the standardisation over all rows (for workers that read their own shard)
    budget: DiffusionConfig  # the diffusion settings with the (warm-start) training budget
    seed: int
    device: torch.device
    precision: str
    state: TrainState | None  # an interrupted run to continue
    initial: Mapping[str, torch.Tensor] | None  # a warm start's weights
    on_checkpoint: Callable[[TrainState], None] | None
    on_epoch: Callable[[int, float], None]


def train_locally(job: UNetJob) -> TrainState:
    """The U-Net trained in this process (:func:`train_unet` on all rows)."""
    return train_unet(job.features, job.budget, job.seed, job.device, state=job.state,
                      on_checkpoint=job.on_checkpoint, on_epoch=job.on_epoch, precision=job.precision,
                      initial=job.initial)


def training_view(raw: np.ndarray, cfg: PipelineConfig, backbone: dict) -> torch.Tensor:
    """Raw stored features [N, C, h, w] -> LafitE's view of them [N, D, S, S] (``cfg.features``)."""
    channels = backbone.get("channels")
    if channels is not None and len(channels) != len(cfg.backbone.out_indices):
        raise ValueError(f"the features come from a backbone with {len(channels)} levels but the config asks for "
                         f"out_indices {cfg.backbone.out_indices}: extract them with this config's backbone")
    return apply_view(torch.from_numpy(raw), cfg.features, channels, native_grids(backbone, cfg.data.image_size))


@dataclass(frozen=True)
class Bank:
    """One memory bank: its rows' values, which patches they are (image * per_image + position, see
    ``coreset.BankSources``), and how a warm start merged the parent's (None: built anew)."""

    values: np.ndarray
    rows: np.ndarray
    per_image: int
    merge: dict | None


def merge_refusal(cfg: PipelineConfig, warm_start: WarmStart | None) -> str | None:
    """Why the banks cannot merge the parent's (None when they can)."""
    if warm_start is None:
        return "no warm start"
    if not cfg.coreset.merge:
        return "coreset.merge is off"
    parent = warm_start.config
    if warm_start.sources is None or parent is None:
        return f"the parent {warm_start.parent_version} does not record where its bank rows come from"
    if parent.coreset.model_dump(exclude={"merge"}) != cfg.coreset.model_dump(exclude={"merge"}):
        return "the parent's coreset settings differ"
    if parent.seed != cfg.seed:
        return f"the parent's seed differs ({parent.seed} -> {cfg.seed})"
    return None


BASELINE_BANK_FIELDS = ("recipe", "view", "keep_rate")
"""The baseline settings PatchCore's bank depends on (the rest only change how it scores)."""


def _bank(name: str, view: torch.Tensor, features: TrainingFeatures, coreset: CoresetConfig, seed: int,
          warm_start: WarmStart | None, parent: tuple[np.ndarray, int] | None, refusal: str | None) -> Bank:
    """One bank over ``view`` [N, D, h, w]: merged with the parent's (``parent``: its rows and patches
    an image) unless ``refusal`` says why not, else selected over every image. A warm start that
    does not merge records why (``merge["not_merged"]``) and logs it."""
    n, _, h, w = view.shape
    per_image = h * w
    if refusal is None and parent is not None and parent[1] != per_image:
        refusal = f"the parent's bank has {parent[1]} patches an image, these features {per_image}"
    patches = flat_patches(view)
    if refusal is not None or parent is None:
        rows = bank_rows(patches, per_image, features.groups, coreset, seed)
        merge = None
        if warm_start is not None:
            log.info("%s coreset: built over all %d images (not merged: %s)", name, n, refusal)
            merge = {"not_merged": refusal}
        return Bank(np.ascontiguousarray(patches[rows]), rows, per_image, merge)
    plan = merge_plan(warm_start.sources, parent[0], parent[1], [e.id for e in features.entries],
                      [e.content_hash for e in features.entries], features.groups, per_image)
    rows = bank_rows(patches, per_image, features.groups, coreset, seed, plan.images, plan.kept)
    merge = {"kept_rows": int(plan.kept.size), "selected_over_images": int(plan.images.size),
             "merged": list(plan.merged), "rebuilt": plan.rebuilt}
    log.info("%s coreset merged with the parent %s's: %d rows kept, a coreset over %d images; categories merged "
             "%s, rebuilt %s", name, warm_start.parent_version, merge["kept_rows"], merge["selected_over_images"],
             merge["merged"] or "none", merge["rebuilt"] or "none")
    return Bank(np.ascontiguousarray(patches[rows]), rows, per_image, merge)


def lafite_bank(normalized: torch.Tensor, features: TrainingFeatures, cfg: PipelineConfig,
                warm_start: WarmStart | None) -> Bank:
    """LafitE's coreset of its normalised view [N, D, h, w] (eq. 9) over all fitted images.

    A warm start with ``coreset.merge`` keeps the parent's rows of each category whose fitted images
    are all still fitted and runs the coreset over that category's new images only
    (:func:`coreset.merge_plan`); a category that lost or changed images is rebuilt. Either way the
    rows are patches of the current features, so a merged bank holds exactly the values a rebuilt
    one would for the same rows.
    """
    refusal = merge_refusal(cfg, warm_start)
    src = None if refusal is not None else warm_start.sources
    return _bank("LafitE", normalized, features, cfg.coreset, cfg.seed, warm_start,
                 None if src is None else (src.rows, src.per_image), refusal)


def baseline_bank(features: TrainingFeatures, cfg: PipelineConfig, channels: Sequence[int] | None,
                  grids: Sequence[int] | None, warm_start: WarmStart | None) -> Bank:
    """PatchCore's coreset of its raw view of the features, merged as :func:`lafite_bank` merges."""
    refusal = merge_refusal(cfg, warm_start)
    src = None if refusal is not None else warm_start.sources
    if src is not None:
        parent = warm_start.config.baseline.model_dump(include=set(BASELINE_BANK_FIELDS))
        if src.baseline_rows is None or parent != cfg.baseline.model_dump(include=set(BASELINE_BANK_FIELDS)):
            refusal = "the parent has no PatchCore bank or built it with other baseline settings"
    view = apply_view(torch.from_numpy(features.raw), cfg.baseline.view, channels, grids)
    return _bank("PatchCore", view, features, patchcore.bank_coreset(cfg.baseline, cfg.coreset), cfg.seed,
                 warm_start, None if refusal is not None else (src.baseline_rows, src.baseline_per_image), refusal)


def train_model(
    features: TrainingFeatures, cfg: PipelineConfig, categories: Sequence[str], backbone: dict,
    device: str | None = None, state: TrainState | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None, progress: Progress = quiet,
    warm_start: WarmStart | None = None, train_unet_with: Callable[[UNetJob], TrainState] = train_locally,
) -> Trained:
    """Raw training features -> statistics, U-Net and coreset (and PatchCore's bank), as a model.

    LafitE trains on its view of the features (``cfg.features``), standardised per channel.
    ``state`` continues an interrupted training run; ``on_checkpoint`` saves one. ``warm_start``
    (checked compatible by ``warm_start.choose_parent``) starts from a parent's U-Net and trains
    ``diffusion.warm_start_fraction`` of the budget; the coresets merge the parent's
    (:func:`lafite_bank`, ``coreset.merge``) or are rebuilt over all features.
    ``train_unet_with``: how the U-Net trains (here, or data-parallel on several workers); the
    statistics and the coresets are computed here over all rows either way.
    """
    raw = features.raw
    channels = backbone.get("channels")
    grids = native_grids(backbone, cfg.data.image_size)
    viewed = training_view(raw, cfg, backbone)
    stats = FeatureStats.fit(viewed)
    normalized = stats.apply(viewed)
    del viewed
    dev = pick_device(device)
    precision = resolve_precision(cfg.compute.precision, dev, "training the U-Net")
    resumed = state.epoch if state is not None else 0
    budget = training_budget(cfg.diffusion, warm_start)
    started = time.perf_counter()
    state = train_unet_with(UNetJob(
        normalized, stats, budget, cfg.seed, dev, precision, state,
        None if warm_start is None else warm_start.weights, on_checkpoint,
        lambda e, loss: progress("train", e, planned_epochs(budget, raw.shape[0])),
    ))
    unet_seconds = time.perf_counter() - started
    state.unet.cpu().eval()
    bank = lafite_bank(normalized, features, cfg, warm_start)
    del normalized  # before PatchCore's view of the raw features is built
    base = baseline_bank(features, cfg, channels, grids, warm_start) if cfg.baseline.recipe == "patchcore" else None
    merges = {name: b.merge for name, b in (("lafite", bank), ("patchcore", base)) if b is not None and b.merge}
    sources = BankSources.of([e.id for e in features.entries], [e.content_hash for e in features.entries],
                             features.groups, bank.per_image, bank.rows,
                             0 if base is None else base.per_image, None if base is None else base.rows)
    model = LafiteModel(
        config=cfg, stats=stats, unet=state.unet, bank=bank.values, categories=tuple(sorted(categories)),
        backbone=backbone,
        extra={"config_hash": config_hash(cfg), "train_images": len(features.entries),
               "bank_size": int(bank.values.shape[0]),
               **({} if base is None else {"baseline_bank_size": int(base.values.shape[0])}),
               **({"bank_merge": merges} if merges else {})},
        baseline_bank=None if base is None else base.values, bank_sources=sources,
    )
    return Trained(model, list(state.losses), state.epoch, str(dev), resumed, precision,
                   None if warm_start is None else warm_start.parent_version,
                   None if warm_start is None else cfg.diffusion.warm_start_fraction, unet_seconds)


# --------------------------------------------------------------------------- select


@dataclass(frozen=True)
class PseudoValidation:
    """Held-out normals and synthesised anomalies; features raw [N, D, h, w]."""

    features: np.ndarray
    labels: np.ndarray  # [N] 0/1
    masks: np.ndarray  # [N, S, S] bool
    categories: np.ndarray  # [N] category keys
    seeds: list[int]


def build_pseudo_validation(
    holdout: dict[str, list[np.ndarray]], sources: dict[str, list[np.ndarray]],
    cfg: PipelineConfig, seed: int,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Per category: held-out normals plus anomalies pasted onto them from the category's sources.

    holdout, sources: category key -> uint8 images [S, S, 3]. Returns (images, labels [N],
    masks [N, S, S] bool, category keys [N]).
    """
    images: list[np.ndarray] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    cats: list[str] = []
    size = cfg.data.image_size
    for i, (key, normals) in enumerate(sorted(holdout.items())):
        if not normals or not sources.get(key):
            continue
        anomalies = build_pseudo_anomalies(
            normals, sources[key], cfg.synthesis.anomalies_per_normal, cfg.synthesis,
            seed + 7919 * (i + 1), exclude_same_index=False,
        )
        for img in normals:
            images.append(img)
            labels.append(0)
            masks.append(np.zeros((size, size), dtype=bool))
            cats.append(key)
        for a in anomalies:
            images.append(a.image)
            labels.append(1)
            masks.append(a.mask)
            cats.append(key)
    return images, np.array(labels), np.stack(masks) if masks else np.zeros((0, size, size), bool), np.array(cats)


def search_subset(labels: np.ndarray, categories: np.ndarray, per_category: int | None, seed: int) -> np.ndarray:
    """Indices (sorted) of the pseudo-validation images the search scores: every image of a category
    with at most ``per_category`` of them, else a seeded draw of ``per_category`` that keeps the
    category's share of pseudo-anomalies (at least one normal and one anomaly when it has both)."""
    keep = []
    for key in np.unique(categories):
        idx = np.flatnonzero(categories == key)
        if per_category is None or len(idx) <= per_category:
            keep.append(idx)
            continue
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:4], "big")])
        anomalous, normal = idx[labels[idx] == 1], idx[labels[idx] != 1]
        n_anom = round(per_category * len(anomalous) / len(idx))
        if len(anomalous) and len(normal):
            n_anom = min(max(n_anom, 1), per_category - 1)
        n_anom = min(n_anom, len(anomalous))
        n_norm = min(per_category - n_anom, len(normal))
        keep += [rng.choice(anomalous, n_anom, replace=False), rng.choice(normal, n_norm, replace=False)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


class PseudoEvaluator:
    """The search's evaluate(tau, k, steps) on the pseudo-validation set: mean per-category AUROCs.

    The points are scored on ``subset`` (indices into the set; None: every image, see
    :func:`search_subset`). The bank is searched once for those images, for the largest K of the
    grid, at the first K evaluated; every K reuses those neighbours (the nearest k of the largest K's
    are the k nearest). Each point's image scores are kept (``scores``), so the chosen point is scored
    only on the images outside the subset for the calibration.
    """

    def __init__(self, scorer: Scorer, pseudo: PseudoValidation, progress: Progress = quiet,
                 subset: np.ndarray | None = None) -> None:
        self.scorer, self.pseudo, self.progress = scorer, pseudo, progress
        n = len(pseudo.labels)
        self.subset = np.arange(n) if subset is None else np.asarray(subset, dtype=np.int64)
        if len(self.subset) and (np.any(np.diff(self.subset) <= 0) or self.subset[0] < 0 or self.subset[-1] >= n):
            raise ValueError(f"the search's subset must be increasing indices into the {n} pseudo-validation images")
        self.whole = len(self.subset) == n
        self.feats = torch.from_numpy(pseudo.features)
        self.sub_feats = self.feats if self.whole else self.feats[torch.from_numpy(self.subset)]
        self.sub_seeds = [pseudo.seeds[i] for i in self.subset]
        sub = self.subset
        self.sub_labels, self.sub_categories = pseudo.labels[sub], pseudo.categories[sub]
        self.sub_masks = pseudo.masks if self.whole else pseudo.masks[sub]
        self.found: Neighbours | None = None
        self.scores: dict[tuple[int, int | None, int], np.ndarray] = {}
        """Each scored point's image scores, in ``subset``'s order."""

    def neighbours(self, k: int) -> Neighbours:
        """The subset's patches' bank neighbours for every K up to the grid's largest (>= k)."""
        if self.found is None or self.found.indices.shape[1] < k:
            start = time.perf_counter()
            self.found = self.scorer.neighbours(self.sub_feats, max(k, *self.scorer.model.config.search.ks))
            log.info("search: bank neighbours of %d pseudo-validation patches (K=%d) in %.1f s",
                     self.found.indices.shape[0], self.found.indices.shape[1], time.perf_counter() - start)
        return self.found

    def __call__(self, tau: int, k: int | None, steps: int) -> tuple[float, float | None]:
        search = self.scorer.model.config.search
        method: Method = "lafite" if k is not None else "lafite_no_edit"
        start = time.perf_counter()
        found = self.neighbours(k) if k is not None else None
        out = self.scorer.score(self.sub_feats, method, self.sub_seeds, tau=tau, k=k, found=found, steps=steps)
        scores = out.scores.numpy()
        self.scores[(tau, k, steps)] = scores
        labels, categories, masks = self.sub_labels, self.sub_categories, self.sub_masks
        img, pix = [], []
        for key in np.unique(categories):
            sel = categories == key
            if len(np.unique(labels[sel])) < 2:
                continue
            m = compute_category_metrics(labels[sel], scores[sel], masks[sel], out.maps.numpy()[sel], with_aupro=False)
            img.append(m.image_auroc)
            pix.append(m.pixel_auroc)
        log.info("search: tau=%d K=%s DDIM steps=%d scored in %.1f s", tau, k, steps, time.perf_counter() - start)
        self.progress("search", len(self.scores), len(search.taus) + len(search.ks) + len(search.ddim_steps))
        return float(np.mean(img)), float(np.mean(pix))

    def final_scores(self, model: LafiteModel, chunk: int = 256) -> np.ndarray:
        """LafitE's image scores of the whole pseudo-validation set with ``model``'s tau, K and steps:
        the search's where it scored that point, the other images scored now, ``chunk`` images at a
        time (their bank neighbours searched once; the search's reused when it scored every image)."""
        sc, n = model.config.scoring, len(self.pseudo.labels)
        kept = self.scores.get((sc.tau, sc.k, sc.ddim_steps))
        if kept is not None and self.whole:
            return kept
        scorer = Scorer(model, self.scorer.device)
        if self.whole:
            return scorer.score(self.feats, "lafite", self.pseudo.seeds, found=self.neighbours(sc.k)).scores.numpy()
        todo = np.setdiff1d(np.arange(n), self.subset) if kept is not None else np.arange(n)
        start = time.perf_counter()
        out = np.empty(n, dtype=np.float32)
        if kept is not None:
            out[self.subset] = kept
        for s in range(0, len(todo), chunk):
            rows = todo[s : s + chunk]
            feats = self.feats[torch.from_numpy(rows)]
            out[rows] = scorer.score(feats, "lafite", [self.pseudo.seeds[i] for i in rows],
                                     found=scorer.neighbours(feats, sc.k)).scores.numpy()
        log.info("calibration: %d pseudo-validation images scored at tau=%d K=%d DDIM steps=%d in %.1f s (%s)",
                 len(todo), sc.tau, sc.k, sc.ddim_steps, time.perf_counter() - start,
                 "the images outside the search's" if kept is not None else "a point the search did not score")
        return out

    def final_errors(self, model: LafiteModel, chunk: int = 256) -> torch.Tensor:
        """LafitE's feature-level errors [N, h, w] of the whole pseudo-validation set at ``model``'s tau, K and
        steps, before position statistics (what ``scoring.position_norm`` fits them on), ``chunk`` images at a
        time with their bank neighbours searched once."""
        scorer, n, start = Scorer(model, self.scorer.device), len(self.pseudo.labels), time.perf_counter()
        out = []
        for s in range(0, n, chunk):
            feats = self.feats[s : s + chunk]
            out.append(scorer.feature_errors(feats, self.pseudo.seeds[s : s + chunk],
                                             scorer.neighbours(feats, model.k)))
        log.info("calibration: %d pseudo-validation images scored at tau=%d K=%d DDIM steps=%d in %.1f s "
                 "(errors for the position statistics)", n, model.tau, model.k, model.config.scoring.ddim_steps,
                 time.perf_counter() - start)
        return torch.cat(out) if out else torch.zeros(0)


def with_position_stats(model: LafiteModel, errors: torch.Tensor, labels: np.ndarray) -> tuple[LafiteModel, np.ndarray]:
    """``scoring.position_norm``: (the model with position statistics fitted on the pseudo-validation set's
    normal images, every pseudo-validation image's LafitE score with them: the normal ones' left out of their
    own statistics, see :func:`position_normalized_scores`)."""
    sc = model.config.scoring
    normal = torch.from_numpy(np.asarray(labels) == 0)
    stats, scores = position_normalized_scores(errors, normal, model.config.data.image_size, sc.smoothing_sigma,
                                               sc.image_pool)
    st = stats.numpy()
    log.info("position statistics from %d held-out normal images: mean error %.3g (%.3g-%.3g over positions), "
             "std %.3g (%.3g-%.3g)", int(normal.sum()), st[0].mean(), st[0].min(), st[0].max(), st[1].mean(),
             st[1].min(), st[1].max())
    return dataclasses.replace(model, position_stats=st), scores.numpy()


@dataclass(frozen=True)
class Selection:
    """What the pseudo-validation set decided: the tuned model, the search table and the calibration.

    ``search.points`` is empty when the search is disabled (tau and K then come from the config).
    """

    model: LafiteModel
    search: SearchResult
    pseudo: PseudoValidation
    calibration: Calibration
    failures: list[LoadFailure] = field(default_factory=list)

    @property
    def searched(self) -> bool:
        return bool(self.search.points)


def select(
    model: LafiteModel, extractor: FeatureExtractor, holdout: Sequence[Sample], sources: Sequence[Sample],
    storage_options: dict | None = None, device: str | None = None, progress: Progress = quiet,
) -> Selection:
    """Pseudo-validation set from held-out normals, search tau then K (then DDIM steps) on its
    ``search.images_per_category`` subset, calibrate the threshold on the whole set. With
    ``scoring.position_norm`` the position statistics are fitted at the chosen point on the set's normal
    images (:func:`with_position_stats`) and the threshold is calibrated on the scores they give.

    Returns a new model with the chosen tau and K in its config (``model`` is not changed). Raises
    when no category has held-out normals: the threshold cannot be calibrated without them.
    """
    cfg = model.config
    model = dataclasses.replace(model, position_stats=None)  # the search scores without (a rerun may pass a tuned one)
    pseudo, failures = pseudo_validation(cfg, extractor, holdout, sources, storage_options, progress)
    subset = (search_subset(pseudo.labels, pseudo.categories, cfg.search.images_per_category, cfg.seed)
              if cfg.search.enabled else None)
    evaluator = PseudoEvaluator(Scorer(model, device), pseudo, progress, subset)
    if cfg.search.enabled:
        images = len(evaluator.subset)
        log.info("search: scoring %d of %d pseudo-validation images (search.images_per_category=%s)",
                 images, len(pseudo.labels), cfg.search.images_per_category)
        search = dataclasses.replace(search_hyperparameters(evaluator, cfg.search, cfg.scoring.ddim_steps),
                                     images=images)
    else:
        log.info("hyperparameter search disabled: tau=%d, K=%d from the config", model.tau, model.k)
        search = SearchResult(model.tau, model.k, ())
    tuned = model.with_hyperparameters(search.tau, search.k, search.ddim_steps)
    if cfg.scoring.position_norm:
        tuned, scores = with_position_stats(tuned, evaluator.final_errors(tuned), pseudo.labels)
    else:
        scores = evaluator.final_scores(tuned)
    calibration = calibrate(scores, pseudo.labels, pseudo.categories, "lafite")
    return Selection(tuned, search, pseudo, calibration, failures)


def pseudo_validation(
    cfg: PipelineConfig, extractor: FeatureExtractor, holdout: Sequence[Sample], sources: Sequence[Sample],
    storage_options: dict | None = None, progress: Progress = quiet,
) -> tuple[PseudoValidation, list[LoadFailure]]:
    """The pseudo-validation set (held-out normals and anomalies pasted onto them from ``sources``),
    its features extracted, and the images that could not be read. Raises when no category has
    held-out normals: the threshold cannot be calibrated without them."""
    hold, bad1 = load_all(holdout, cfg, storage_options, progress, "read held-out normals")
    src, bad2 = load_all(sources, cfg, storage_options, progress, "read paste sources")
    for f in bad1 + bad2:
        log.warning("unreadable image left out of the pseudo-validation set: %s", f.error)
    holdout_imgs: dict[str, list[np.ndarray]] = {}
    source_imgs: dict[str, list[np.ndarray]] = {}
    for s in hold:
        holdout_imgs.setdefault(s.sample.category_key, []).append(s.image)
    for s in src:
        source_imgs.setdefault(s.sample.category_key, []).append(s.image)
    images, labels, masks, cats = build_pseudo_validation(holdout_imgs, source_imgs, cfg, cfg.seed)
    if not images:
        raise ValueError("a model needs held-out normal images to calibrate its threshold, and none could be "
                         "held out: give each category at least 4 readable train/good images and keep "
                         "synthesis.holdout_fraction above 0")
    pseudo = PseudoValidation(extract(extractor, images), labels, masks, cats,
                              [cfg.seed * 1_000_003 + i for i in range(len(images))])
    return pseudo, bad1 + bad2


# --------------------------------------------------------------------------- publish


def selection_files(selection: Selection) -> dict[str, bytes]:
    """The tuned model's files, the search table and the calibration (what a version is made of)."""
    cfg = selection.model.config
    return {
        **selection.model.to_files(),
        SEARCH_FILE: parquet_bytes(search_table(selection.search), {"config_hash": config_hash(cfg)}),
        CALIBRATION_FILE: json.dumps(selection.calibration.to_json()).encode(),
    }


def training_summary(trained: Trained, unreadable: Sequence[tuple[str, str]], skipped: Sequence[str]) -> dict:
    """The model card's account of training: epochs, loss, device, images, what was left out, and
    for a warm start its parent, the budget's share and how the coresets merged the parent's."""
    return {"trained_epochs": trained.epochs, "final_loss": trained.final_loss, "device": trained.device,
            "precision": trained.precision, "parent_version": trained.parent_version,
            "warm_start_fraction": trained.warm_start_fraction,
            "coreset_merge": trained.model.extra.get("bank_merge"),  # how a warm start merged the parent's banks
            "train_images": int(trained.model.extra.get("train_images", 0)),
            "unreadable_train_images": [{"url": u, "error": e} for u, e in unreadable],
            "skipped_categories": list(skipped)}


def position_stats_file(cfg: PipelineConfig) -> tuple[str, ...]:
    """The position statistics' file name when a searched and calibrated model of ``cfg`` must have it (a
    model before the search has none: they are fitted at the chosen point)."""
    return (POSITION_STATS,) if cfg.scoring.position_norm else ()


def version_files(files: dict[str, bytes], run_id: str, summary: dict[str, Any]) -> dict[str, bytes]:
    """:func:`selection_files` plus ``config.json`` and the model card, all from one model.json.

    tau, K and the threshold are read from the files themselves, so config.json, model.json, the
    card and calibration.json cannot disagree.
    """
    meta = json.loads(files["model.json"])
    cfg = PipelineConfig.model_validate(meta["config"])
    missing = [n for n in (*MODEL_FILES, SEARCH_FILE, CALIBRATION_FILE, *position_stats_file(cfg)) if n not in files]
    if missing:
        raise ValueError(f"cannot publish: missing {missing}")
    calibration = Calibration.from_json(json.loads(files[CALIBRATION_FILE]))
    card = {"run_id": run_id, "config_hash": config_hash(cfg), "tau": cfg.scoring.tau, "k": cfg.scoring.k,
            "ddim_steps": cfg.scoring.ddim_steps,
            "threshold": calibration.overall.threshold, "categories": meta["categories"],
            "backbone": meta["backbone"], **summary}
    return {**files, CONFIG_FILE: cfg.to_json().encode(),
            CARD_FILE: json.dumps(card, indent=2, sort_keys=True).encode()}


def load_published(store: Store, version: str) -> tuple[LafiteModel, Calibration, dict[str, bytes]]:
    """A verified model version of ``store``: the model, its calibration, and all its files."""
    files = store.load_model_files(version)
    model = LafiteModel.from_files(files)
    if position_stats_file(model.config) and model.position_stats is None:
        raise ValueError(f"model version {version} is incomplete: scoring.position_norm is on and it has no "
                         f"{POSITION_STATS}")
    return model, Calibration.from_json(json.loads(files[CALIBRATION_FILE])), files


def published_categories(store: Store, version: str) -> tuple[str, ...]:
    """The categories ("dataset/category") of a published version, from its verified model.json alone."""
    return tuple(json.loads(store.load_model_file(version, "model.json"))["categories"])


# --------------------------------------------------------------------------- score and measure


def score_images(scorer: Scorer, extractor: FeatureExtractor, images: Sequence[np.ndarray],
                 content_hashes: Sequence[str], methods: Sequence[Method]) -> dict[Method, AnomalyMaps]:
    """uint8 images [S, S, 3] -> AnomalyMaps per method; each image's noise seeded by its bytes."""
    feats = torch.from_numpy(extract(extractor, list(images)))
    seeds = [image_seed(scorer.model.config.seed, h) for h in content_hashes]
    return {m: scorer.score(feats, m, seeds) for m in methods}


@dataclass(frozen=True)
class Judged:
    """One unlabelled image scored and judged: raw score, and where the method is the calibrated one,
    the normalised score (0 typical normal, 1 at the threshold) and the decision; a heat map on request."""

    raw_score: float
    normalized_score: float | None
    decision: str | None  # "anomalous" | "normal"
    heatmap_png: bytes | None


def judge_images(scorer: Scorer, extractor: FeatureExtractor, calibration: Calibration, method: Method,
                 images: Sequence[np.ndarray], content_hashes: Sequence[str], categories: Sequence[str | None],
                 heatmaps: bool = False) -> list[Judged]:
    """Batch scoring of uint8 images [S, S, 3]: one :class:`Judged` per image, per-category thresholds."""
    out = score_images(scorer, extractor, images, content_hashes, (method,))[method]
    judged = []
    for image, category, raw, amap in zip(images, categories, out.scores.numpy(), out.maps.numpy()):
        cut = calibration.cut_for(category)
        calibrated = method == calibration.method
        png = None
        if heatmaps:
            png = overlay_png(image, amap, cut.normal_median, 2 * cut.threshold - cut.normal_median)
        judged.append(Judged(
            float(raw), cut.normalize(float(raw)) if calibrated else None,
            ("anomalous" if calibration.decide(float(raw), category) else "normal") if calibrated else None, png))
    return judged


@dataclass
class CategoryScores:
    """Scores of one category's test set for every method; maps [N, S, S]."""

    category: Category
    loaded: list[LoadedSample]
    scores: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]


def score_category(
    scorer: Scorer, extractor: FeatureExtractor, category: Category,
    methods: Sequence[Method] = METHODS, storage_options: dict | None = None, progress: Progress = quiet,
) -> tuple[CategoryScores, list[LoadFailure]]:
    """Read, extract and score one category's test images with every method."""
    cfg = scorer.model.config
    loaded, failures = load_all(category.test, cfg, storage_options, progress, f"read {category.key}")
    if not loaded:
        raise ValueError(f"{category.key}: no readable test images")
    warn_cropped_defects(category.key, loaded, cfg.data.center_crop)
    out = score_images(scorer, extractor, [s.image for s in loaded], [s.content_hash for s in loaded], methods)
    progress(f"score {category.key}", len(methods), len(methods))
    return (CategoryScores(category, loaded, {m: o.scores.numpy() for m, o in out.items()},
                           {m: o.maps.numpy() for m, o in out.items()}), failures)


def warn_cropped_defects(key: str, loaded: Sequence[LoadedSample], crop: float) -> None:
    """A WARNING when the centre crop cut off part of a category's ground truth: those defects are not
    inspected, and the category's metrics are measured on what the crop kept."""
    cut = sum(s.mask_cut for s in loaded)
    if not cut:
        return
    total = cut + sum(int(s.mask.sum()) for s in loaded if s.mask is not None)
    gone = sum(1 for s in loaded if s.mask_cut and s.mask is not None and not s.mask.any())
    log.warning("%s: data.center_crop=%s cuts off %.1f%% of the ground truth's defect pixels; %d defect image(s) "
                "keep none of theirs inside the crop. Those regions are not inspected, and pixel metrics cover "
                "the crop only", key, crop, 100.0 * cut / total, gone)


def metrics_for(cs: CategoryScores, method: str) -> CategoryMetrics:
    """Image metrics over all readable test images; pixel metrics over those with a known mask."""
    labels = np.array([s.sample.label for s in cs.loaded])
    image = compute_category_metrics(labels, cs.scores[method], None, None)
    known = np.array([s.mask is not None for s in cs.loaded])
    if not cs.category.has_masks or labels[known].max(initial=0) == 0:
        return image
    masks = np.stack([s.mask for s in cs.loaded if s.mask is not None])
    maps = cs.maps[method][known]
    return dataclasses.replace(image, pixel_auroc=auroc(masks, maps), pixel_ap=average_precision(masks, maps),
                               aupro=aupro(masks, maps))


@dataclass(frozen=True)
class MetricsRow:
    """One (category, method) result; :meth:`record` is its row in the metrics table."""

    dataset: str
    category: str
    method: Method
    metrics: CategoryMetrics
    seed: int
    config_hash: str
    num_images: int
    num_failed: int = 0

    def record(self) -> dict:
        """The METRICS_SCHEMA columns this row knows (run id, version and time are stamped later)."""
        return {"dataset": self.dataset, "category": self.category, "method": self.method,
                **{c: (None if getattr(self.metrics, c) is None else float(getattr(self.metrics, c)))
                   for c in METRIC_COLUMNS},
                "num_images": self.num_images, "num_failed": self.num_failed, "seed": self.seed,
                "config_hash": self.config_hash}


def measure(cs: CategoryScores, methods: Sequence[Method], cfg: PipelineConfig, num_failed: int = 0,
            seed: int | None = None) -> list[MetricsRow]:
    """Metric rows of one scored category, one per method; ``seed`` defaults to the config's."""
    c = cs.category
    return [MetricsRow(c.dataset, c.name, m, metrics_for(cs, m), cfg.seed if seed is None else seed,
                       config_hash(cfg), len(cs.loaded), num_failed) for m in methods]
