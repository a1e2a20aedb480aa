"""The method end to end in plain Python: fit one model on normal images, then evaluate it.

The Prefect flows run the same steps with a store between them; this module is what they call and
what a notebook user calls directly:

    cats = discover("data/mpdd")
    fitted = fit(cats, cpu_profile())
    rows = evaluate(fitted.model, cats)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from lafite_core.backbone import FeatureExtractor
from lafite_core.calibration import Calibration, calibrate
from lafite_core.config import PipelineConfig, config_hash
from lafite_core.coreset import select_coreset
from lafite_core.data import Category, LoadedSample, Sample
from lafite_core.features import LoadFailure, extract, load_many
from lafite_core.metrics import CategoryMetrics, aupro, auroc, average_precision, compute_category_metrics
from lafite_core.model import LafiteModel, Scorer
from lafite_core.normalize import FeatureStats
from lafite_core.scoring import METHODS, Method
from lafite_core.search import SearchResult, search_hyperparameters
from lafite_core.synthesis import build_pseudo_anomalies
from lafite_core.train import TrainState, pick_device, train_unet

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as long steps advance (total 0 when unknown)."""


def _quiet(stage: str, done: int, total: int) -> None:
    pass


# --------------------------------------------------------------------------- data


def split_holdout(samples: Sequence[Sample], cfg: PipelineConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """train/good of one category -> (samples to fit on, held-out pseudo-validation normals).

    Holds out ``holdout_fraction`` (at least ``min_holdout``) when the search is enabled and the
    category keeps at least two images for fitting; otherwise holds out nothing.
    """
    syn = cfg.synthesis
    n = len(samples)
    if not cfg.search.enabled or syn.holdout_fraction == 0:
        return list(samples), []
    n_hold = max(syn.min_holdout, int(round(syn.holdout_fraction * n)))
    if n - n_hold < 2:
        log.warning("a category with %d train images is too small to hold out pseudo-validation "
                    "normals; it is left out of the search", n)
        return list(samples), []
    order = np.random.default_rng(seed).permutation(n)
    hold = sorted(order[:n_hold])
    keep = sorted(order[n_hold:])
    return [samples[i] for i in keep], [samples[i] for i in hold]


def load_all(samples: Sequence[Sample], cfg: PipelineConfig, storage_options: dict | None = None,
             progress: Progress = _quiet, stage: str = "load") -> tuple[list[LoadedSample], list[LoadFailure]]:
    """Read and decode ``samples``; unreadable ones come back as failures, in order."""
    ok: list[LoadedSample] = []
    bad: list[LoadFailure] = []
    for i, item in enumerate(load_many(samples, cfg.data.image_size, cfg.data.max_image_pixels, storage_options)):
        if isinstance(item, LoadFailure):
            bad.append(item)
        else:
            ok.append(item)
        progress(stage, i + 1, len(samples))
    return ok, bad


def image_seed(base: int, content_hash: str) -> int:
    """Noise seed for one image: depends on the image's bytes and the run seed, not on its batch."""
    return (int(content_hash[:15], 16) ^ (base * 0x9E3779B97F4A7C15)) % (2**63)


def category_key(sample: Sample) -> str:
    return f"{sample.dataset}/{sample.category}"


# --------------------------------------------------------------------------- fitting


@dataclass
class PseudoValidation:
    """Held-out normals and synthesised anomalies; features raw [N, D, h, w]."""

    features: np.ndarray
    labels: np.ndarray  # [N] 0/1
    masks: np.ndarray  # [N, S, S] bool
    categories: np.ndarray  # [N] category keys
    seeds: list[int]


@dataclass
class FitResult:
    model: LafiteModel
    selection: Selection | None
    losses: list[float]
    timings: dict[str, float] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)


def build_bank(normalized: torch.Tensor, groups: np.ndarray, cfg: PipelineConfig) -> np.ndarray:
    """Normalised features [N, D, h, w], groups [N] -> coreset [M, D] (eq. 9)."""
    n, d, h, w = normalized.shape
    patches = normalized.permute(0, 2, 3, 1).reshape(-1, d).numpy()
    codes = np.unique(groups, return_inverse=True)[1].astype(np.int32)
    patch_groups = np.repeat(codes, h * w)
    core = select_coreset(patches, cfg.coreset, cfg.seed, groups=patch_groups)
    return np.ascontiguousarray(patches[np.sort(core.indices)])


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
    return images, np.array(labels), np.stack(masks), np.array(cats)


def pseudo_evaluator(scorer: Scorer, pseudo: PseudoValidation, progress: Progress = _quiet):
    """The search's evaluate(tau, k) on the pseudo-validation set: mean per-category AUROCs."""
    calls = [0]
    feats = torch.from_numpy(pseudo.features)

    def evaluate(tau: int, k: int | None) -> tuple[float, float | None]:
        method: Method = "lafite" if k is not None else "lafite_no_edit"
        out = scorer.score(feats, method, pseudo.seeds, tau=tau, k=k)
        img, pix = [], []
        for key in np.unique(pseudo.categories):
            sel = pseudo.categories == key
            if len(np.unique(pseudo.labels[sel])) < 2:
                continue
            m = compute_category_metrics(pseudo.labels[sel], out.scores.numpy()[sel], pseudo.masks[sel],
                                         out.maps.numpy()[sel], with_aupro=False)
            img.append(m.image_auroc)
            pix.append(m.pixel_auroc)
        calls[0] += 1
        progress("search", calls[0], len(scorer.model.config.search.taus) + len(scorer.model.config.search.ks))
        return float(np.mean(img)), float(np.mean(pix))

    return evaluate


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


def split_categories(categories: Sequence[Category], cfg: PipelineConfig) -> tuple[list[Sample], list[Sample]]:
    """All categories' train/good -> (samples to fit on, held-out pseudo-validation normals)."""
    empty = [c.key for c in categories if not c.train]
    if empty:
        raise ValueError(f"categories without train/good images: {empty}; filter them with trainable()")
    fit_samples: list[Sample] = []
    holdout_samples: list[Sample] = []
    for i, c in enumerate(categories):
        keep, hold = split_holdout(c.train, cfg, cfg.seed + i)
        fit_samples += keep
        holdout_samples += hold
    return fit_samples, holdout_samples


@dataclass
class TrainedParts:
    stats: FeatureStats
    state: TrainState
    bank: np.ndarray


def train_parts(
    raw: np.ndarray, groups: np.ndarray, cfg: PipelineConfig, device: str | None = None,
    state: TrainState | None = None, on_checkpoint: Callable[[TrainState], None] | None = None,
    progress: Progress = _quiet,
) -> TrainedParts:
    """Raw training features [N, D, h, w] with category keys [N] -> statistics, U-Net, coreset.

    ``state`` continues an interrupted training run; ``on_checkpoint`` saves one.
    """
    stats = FeatureStats.fit(raw)
    normalized = stats.apply(torch.from_numpy(raw))
    state = train_unet(
        normalized, cfg.diffusion, cfg.seed, pick_device(device), state=state, on_checkpoint=on_checkpoint,
        on_epoch=lambda e, loss: progress("train", e, cfg.diffusion.epochs),
    )
    state.unet.cpu().eval()
    return TrainedParts(stats, state, build_bank(normalized, groups, cfg))


@dataclass
class Selection:
    """What the pseudo-validation set decided: tau and K, the search table and the calibration."""

    search: SearchResult
    pseudo: PseudoValidation
    calibration: Calibration


def select_hyperparameters(
    model: LafiteModel, extractor: FeatureExtractor, holdout: dict[str, list[np.ndarray]],
    sources: dict[str, list[np.ndarray]], device: str | None = None, progress: Progress = _quiet,
) -> Selection:
    """Build the pseudo-validation set, search tau then K, calibrate the threshold; updates ``model``."""
    cfg = model.config
    images, labels, masks, cats = build_pseudo_validation(holdout, sources, cfg, cfg.seed)
    pseudo = PseudoValidation(extract(extractor, images), labels, masks, cats,
                              [cfg.seed * 1_000_003 + i for i in range(len(images))])
    scorer = Scorer(model, device)
    search = search_hyperparameters(pseudo_evaluator(scorer, pseudo, progress), cfg.search)
    model.tau, model.k = search.tau, search.k
    final = scorer.score(torch.from_numpy(pseudo.features), "lafite", pseudo.seeds)
    calibration = calibrate(final.scores.numpy(), labels, cats, "lafite")
    return Selection(search, pseudo, calibration)


def backbone_card(extractor: FeatureExtractor) -> dict:
    return {"name": extractor.info.name, "weights": extractor.info.weights_source,
            "channels": list(extractor.info.channels)}


def new_model(parts: TrainedParts, cfg: PipelineConfig, categories: Sequence[str], backbone: dict,
              train_images: int) -> LafiteModel:
    """A model from trained parts, with the config's tau and K until the search replaces them."""
    return LafiteModel(
        config=cfg, stats=parts.stats, unet=parts.state.unet, bank=parts.bank,
        tau=cfg.scoring.tau, k=cfg.scoring.k, categories=tuple(sorted(categories)), backbone=backbone,
        extra={"config_hash": config_hash(cfg), "train_images": train_images, "bank_size": int(parts.bank.shape[0])},
    )


def fit(
    categories: Sequence[Category],
    cfg: PipelineConfig,
    extractor: FeatureExtractor | None = None,
    storage_options: dict | None = None,
    progress: Progress = _quiet,
    device: str | None = None,
) -> FitResult:
    """Train one model on the train/good images of all ``categories`` (the paper's unified setting)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    categories, _ = trainable(categories)
    fit_samples, holdout_samples = split_categories(categories, cfg)
    extractor = extractor or FeatureExtractor(cfg.backbone)
    loaded, failures = load_all(fit_samples + holdout_samples, cfg, storage_options, progress, "read train images")
    for f in failures:
        log.warning("skipping unreadable training image: %s", f.error)
    hold_urls = {s.url for s in holdout_samples}
    fit_loaded = [s for s in loaded if s.sample.url not in hold_urls]
    hold_loaded = [s for s in loaded if s.sample.url in hold_urls]
    if not fit_loaded:
        raise ValueError("no readable training images: " + "; ".join(f.error for f in failures[:5]))

    raw = extract(extractor, [s.image for s in fit_loaded])
    timings["extract_train"] = time.perf_counter() - t0
    t = time.perf_counter()
    parts = train_parts(raw, np.array([category_key(s.sample) for s in fit_loaded]), cfg, device, progress=progress)
    timings["train_and_coreset"] = time.perf_counter() - t
    model = new_model(parts, cfg, [c.key for c in categories], backbone_card(extractor), len(fit_loaded))

    selection = None
    if cfg.search.enabled and hold_loaded:
        t = time.perf_counter()
        holdout: dict[str, list[np.ndarray]] = {}
        sources: dict[str, list[np.ndarray]] = {}
        for s in hold_loaded:
            holdout.setdefault(category_key(s.sample), []).append(s.image)
        for s in fit_loaded:
            sources.setdefault(category_key(s.sample), []).append(s.image)
        selection = select_hyperparameters(model, extractor, holdout, sources, device, progress)
        timings["search"] = time.perf_counter() - t
    timings["fit_total"] = time.perf_counter() - t0
    model.extra["timings"] = timings
    return FitResult(model, selection, parts.state.losses, timings, failures)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class MetricsRow:
    dataset: str
    category: str
    method: Method
    metrics: CategoryMetrics
    seed: int
    config_hash: str
    num_images: int


@dataclass
class CategoryScores:
    """Scores of one category's test set for every method; maps [N, S, S]."""

    category: Category
    loaded: list[LoadedSample]
    scores: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]


def score_category(
    scorer: Scorer, extractor: FeatureExtractor, category: Category, cfg: PipelineConfig,
    methods: Sequence[Method] = METHODS, storage_options: dict | None = None,
    progress: Progress = _quiet,
) -> tuple[CategoryScores, list[LoadFailure]]:
    """Read, extract and score one category's test images with every method."""
    loaded, failures = load_all(category.test, cfg, storage_options, progress, f"read {category.key}")
    if not loaded:
        raise ValueError(f"{category.key}: no readable test images")
    feats = torch.from_numpy(extract(extractor, [s.image for s in loaded]))
    seeds = [image_seed(cfg.seed, s.content_hash) for s in loaded]
    scores, maps = {}, {}
    for i, method in enumerate(methods):
        out = scorer.score(feats, method, seeds)
        scores[method] = out.scores.numpy()
        maps[method] = out.maps.numpy()
        progress(f"score {category.key}", i + 1, len(methods))
    return CategoryScores(category, loaded, scores, maps), failures


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


def evaluate(
    model: LafiteModel, categories: Sequence[Category], extractor: FeatureExtractor | None = None,
    methods: Sequence[Method] = METHODS, storage_options: dict | None = None,
    progress: Progress = _quiet, device: str | None = None,
) -> list[MetricsRow]:
    """Score every test image of every category with every method; one row per (category, method)."""
    cfg = model.config
    extractor = extractor or FeatureExtractor(cfg.backbone)
    scorer = Scorer(model, device)
    rows: list[MetricsRow] = []
    for c in categories:
        if not c.test:
            log.warning("%s has no test images; skipped", c.key)
            continue
        cs, failures = score_category(scorer, extractor, c, cfg, methods, storage_options, progress)
        for f in failures:
            log.warning("unreadable test image left out of the metrics: %s", f.error)
        for method in methods:
            rows.append(MetricsRow(c.dataset, c.name, method, metrics_for(cs, method), cfg.seed,
                                   config_hash(cfg), len(cs.loaded)))
    return rows
