"""Tests for lafite_core.method.metrics: parity with scikit-learn (the rank-based fast path and the
curves included), hand-computed AUPRO, a brute-force AUPRO."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as sk_metrics
from sklearn.metrics import average_precision_score, roc_auc_score

from lafite_core.method import metrics
from lafite_core.method.metrics import (
    CategoryMetrics,
    PrCurve,
    RocCurve,
    Summary,
    aupro,
    auroc,
    average_precision,
    compute_category_metrics,
    mean_std_over_seeds,
    pr_curve,
    roc_curve,
    summarize,
)

# ---------------------------------------------------------------------------------------------
# AUROC and AP against scikit-learn


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_auroc_ap_match_sklearn_with_ties(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(3000) < 0.2
    scores = rng.random(3000) + 0.3 * labels  # informative but overlapping
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties, some across classes
        assert np.unique(scores).size < 200
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-10)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-10)


def test_auroc_ap_accept_2d_uint8_labels_and_float32_scores() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random((40, 50)) < 0.1).astype(np.uint8)
    scores = np.round(rng.random((40, 50)) + 0.5 * labels, 1).astype(np.float32)
    flat_l, flat_s = labels.ravel(), scores.ravel()
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(flat_l, flat_s), abs=1e-10)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(flat_l, flat_s), abs=1e-10)


def test_auroc_ap_all_scores_tied() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.zeros(5)
    assert auroc(labels, scores) == 0.5
    assert average_precision(labels, scores) == pytest.approx(3 / 5, abs=1e-15)


def test_perfect_and_inverted_classifier() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1, 0])
    perfect = labels + 0.1 * np.arange(7)  # every positive above every negative
    assert auroc(labels, perfect) == 1.0
    assert average_precision(labels, perfect) == 1.0
    assert auroc(labels, -perfect) == 0.0
    # Inverted: positives come last, at ranks 5, 6, 7 -> AP = (1/5 + 2/6 + 3/7) / 3.
    expected = (1 / 5 + 2 / 6 + 3 / 7) / 3
    assert average_precision(labels, -perfect) == pytest.approx(expected, abs=1e-15)
    assert average_precision(labels, -perfect) == pytest.approx(average_precision_score(labels, -perfect), abs=1e-12)


@pytest.mark.parametrize("metric", [auroc, average_precision])
def test_errors(metric) -> None:
    with pytest.raises(ValueError, match="only negative"):
        metric(np.zeros(5), np.arange(5.0))
    with pytest.raises(ValueError, match="only positive"):
        metric(np.ones((2, 3), dtype=bool), np.ones((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        metric(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match="inf"):
        metric(np.array([0, 1, 1]), np.array([0.1, np.inf, 0.3], dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        metric(np.array([[0, 1], [1, 0]]), np.arange(4.0))
    with pytest.raises(ValueError, match="0/1"):
        metric(np.array([0, 2, 1]), np.arange(3.0))


# ---------------------------------------------------------------------------------------------
# The rank-based path for large inputs against scikit-learn


def _tied_pixels(seed: int, n: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Labels [n] bool (~3% positive) and float32 scores [n], rounded to ``decimals`` (ties across classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.03
    scores = rng.standard_normal(n) / 8.0 + 0.2 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return labels, scores.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("decimals", [1, 3, None])
def test_rank_path_matches_sklearn_with_ties(seed: int, decimals: int | None) -> None:
    labels, scores = _tied_pixels(seed, 50_000, decimals)
    if decimals is not None:
        assert np.unique(scores).size < scores.size // 5
    assert metrics._rank_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert metrics._rank_average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-9)


def test_rank_path_matches_sklearn_at_the_threshold_size() -> None:
    labels, scores = _tied_pixels(2, metrics._FAST_PATH_MIN_SAMPLES, 4)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)


def test_auroc_and_average_precision_sort_once_and_match_each_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    labels, scores = _tied_pixels(4, metrics._FAST_PATH_MIN_SAMPLES, 3)
    expected = (auroc(labels, scores), average_precision(labels, scores))
    sorts = []
    real = metrics._class_sorted
    monkeypatch.setattr(metrics, "_class_sorted", lambda y, s: sorts.append(1) or real(y, s))
    assert metrics.auroc_and_average_precision(labels, scores) == expected
    assert len(sorts) == 1
    small = (labels[:5000], scores[:5000])  # below the threshold: scikit-learn's, as each metric
    assert metrics.auroc_and_average_precision(*small) == (auroc(*small), average_precision(*small))


def test_large_inputs_take_the_rank_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def unused(*args, **kwargs):
        raise AssertionError("scikit-learn was called above the fast-path threshold")

    monkeypatch.setattr(metrics, "_FAST_PATH_MIN_SAMPLES", 100)
    monkeypatch.setattr(sk_metrics, "roc_auc_score", unused)
    monkeypatch.setattr(sk_metrics, "average_precision_score", unused)
    labels, scores = _tied_pixels(3, 100, 1)
    labels[:2] = [True, False]
    auroc(labels, scores)
    average_precision(labels, scores)
    with pytest.raises(AssertionError, match="scikit-learn was called"):
        auroc(labels[:99], scores[:99])
    with pytest.raises(AssertionError, match="scikit-learn was called"):
        average_precision(labels[:99], scores[:99])


# ---------------------------------------------------------------------------------------------
# ROC and precision-recall curves


@pytest.mark.parametrize("decimals", [2, None])
def test_roc_curve_matches_sklearn_and_is_monotone(decimals: int | None) -> None:
    labels, scores = _tied_pixels(4, 20_000, decimals)
    curve = roc_curve(labels.reshape(100, 200), scores.reshape(100, 200))
    assert isinstance(curve, RocCurve)
    fpr, tpr, thresholds = sk_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(curve.fpr, fpr)
    np.testing.assert_array_equal(curve.tpr, tpr)
    np.testing.assert_array_equal(curve.thresholds, thresholds)
    assert curve.fpr.size == np.unique(scores).size + 1  # one point per distinct score, plus (0, 0)
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)
    assert np.all(np.diff(curve.thresholds) < 0)
    assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(auroc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("decimals", [2, None])
def test_pr_curve_matches_sklearn_and_is_monotone(decimals: int | None) -> None:
    labels, scores = _tied_pixels(5, 20_000, decimals)
    curve = pr_curve(labels, scores)
    assert isinstance(curve, PrCurve)
    precision, recall, thresholds = sk_metrics.precision_recall_curve(labels, scores)
    np.testing.assert_array_equal(curve.precision, precision)
    np.testing.assert_array_equal(curve.recall, recall)
    np.testing.assert_array_equal(curve.thresholds, thresholds)
    assert curve.thresholds.size == curve.recall.size - 1
    assert (curve.recall[0], curve.recall[-1], curve.precision[-1]) == (1.0, 0.0, 1.0)
    assert curve.precision[0] == pytest.approx(labels.mean(), abs=1e-15)  # every sample flagged
    assert np.all(np.diff(curve.recall) <= 0) and np.all(np.diff(curve.thresholds) > 0)
    assert np.all((curve.precision >= 0) & (curve.precision <= 1))
    ap = -np.sum(np.diff(curve.recall) * curve.precision[:-1])
    assert ap == pytest.approx(average_precision(labels, scores), abs=1e-12)


def _is_sub_curve(x: np.ndarray, y: np.ndarray, t: np.ndarray, full_x: np.ndarray, full_y: np.ndarray,
                  full_t: np.ndarray) -> bool:
    """Whether every (x, y, t) point of a thinned curve is a point of the full curve (points [P] and [Q])."""
    at = np.searchsorted(-full_t, -t) if full_t[0] > full_t[-1] else np.searchsorted(full_t, t)
    at = np.minimum(at, full_t.size - 1)
    return bool(np.array_equal(full_t[at], t) and np.array_equal(full_x[at], x) and np.array_equal(full_y[at], y))


def test_roc_curve_thinned() -> None:
    labels, scores = _tied_pixels(6, 50_000, None)
    full = roc_curve(labels, scores)
    # drop_intermediate alone (max_points above its count) drops collinear points: same area.
    dropped = roc_curve(labels, scores, max_points=10**9)
    assert dropped.fpr.size < full.fpr.size
    assert np.trapezoid(dropped.tpr, dropped.fpr) == pytest.approx(auroc(labels, scores), abs=1e-12)
    thin = roc_curve(labels, scores, max_points=200)
    assert 100 <= thin.fpr.size <= 200
    assert (thin.fpr[0], thin.tpr[0], thin.fpr[-1], thin.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(thin.fpr) >= 0) and np.all(np.diff(thin.tpr) >= 0)
    assert _is_sub_curve(thin.fpr, thin.tpr, thin.thresholds, full.fpr, full.tpr, full.thresholds)
    assert np.trapezoid(thin.tpr, thin.fpr) == pytest.approx(auroc(labels, scores), abs=1e-3)
    assert roc_curve(labels, scores, max_points=2).fpr.tolist() == [0.0, 1.0]


def test_pr_curve_thinned() -> None:
    labels, scores = _tied_pixels(7, 50_000, None)
    full = pr_curve(labels, scores)
    thin = pr_curve(labels, scores, max_points=200)
    assert 100 <= thin.recall.size <= 200
    assert thin.thresholds.size == thin.recall.size - 1
    assert (thin.recall[0], thin.recall[-1], thin.precision[-1]) == (1.0, 0.0, 1.0)
    assert np.all(np.diff(thin.recall) <= 0) and np.all(np.diff(thin.thresholds) > 0)
    assert _is_sub_curve(thin.recall[:-1], thin.precision[:-1], thin.thresholds,
                         full.recall[:-1], full.precision[:-1], full.thresholds)
    ap = -np.sum(np.diff(thin.recall) * thin.precision[:-1])
    assert ap == pytest.approx(average_precision(labels, scores), abs=5e-3)


@pytest.mark.parametrize("curve", [roc_curve, pr_curve])
def test_curve_errors(curve) -> None:
    labels, scores = _tied_pixels(8, 100, 1)
    labels[:2] = [True, False]
    with pytest.raises(ValueError, match="max_points"):
        curve(labels, scores, max_points=1)
    with pytest.raises(ValueError, match="only negative"):
        curve(np.zeros(5), np.arange(5.0))
    with pytest.raises(ValueError, match="inf"):
        curve(labels, np.where(labels, np.inf, scores))


# ---------------------------------------------------------------------------------------------
# AUPRO: hand-computed cases
#
# One 3x3 image, mask (A and B touch only diagonally, so 4-connectivity gives two regions):
#   A . .
#   . B B
#   . . .
# Region A has 1 pixel, region B 2 pixels, R = 2; 6 normal pixels (n1..n6).

_MASK = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], dtype=bool)


def test_aupro_hand_computed_distinct_scores() -> None:
    # Scores, descending:  A 0.9 | n1 0.8 | B1 0.7 | n2 0.6 | B2 0.5 | n3..n6 0.4, 0.3, 0.2, 0.1
    #   layout:  A=0.9  n1=0.8  n2=0.6
    #            n3=0.4 B1=0.7  B2=0.5
    #            n4=0.3 n5=0.2  n6=0.1
    # Curve (FPR, PRO), PRO = (frac_A + frac_B) / 2:
    #   (0, 0) start; 0.9 -> (0, 1/2); 0.8 -> (1/6, 1/2); 0.7 -> (1/6, 3/4); 0.6 -> (2/6, 3/4);
    #   0.5 -> (2/6, 1); 0.4..0.1 -> (3/6, 1) .. (6/6, 1).
    # Trapezoids (all rectangles here): [0, 1/6] at 1/2 -> 2/24; [1/6, 2/6] at 3/4 -> 3/24;
    #   [2/6, 1] at 1 -> 16/24.
    # fpr_limit = 1: area 21/24 = 7/8.   fpr_limit = 1/3: area 5/24, normalised 5/8.
    # (8-connectivity would merge A and B into one region of 3 pixels: PRO 1/3, 2/3, 1 -> 1/2 at 1/3.)
    maps = np.array([[[0.9, 0.8, 0.6], [0.4, 0.7, 0.5], [0.3, 0.2, 0.1]]])
    assert aupro(_MASK, maps, fpr_limit=1.0) == pytest.approx(7 / 8, abs=1e-12)
    assert aupro(_MASK, maps, fpr_limit=1 / 3) == pytest.approx(5 / 8, abs=1e-12)


def test_aupro_hand_computed_tie_and_interpolation() -> None:
    # Scores, descending:  B1 0.9 | n1 0.8 | A and n2 tied at 0.7 | B2 0.5 | n3..n6 0.4..0.1
    #   layout:  A=0.7  n1=0.8  n2=0.7
    #            n3=0.4 B1=0.9  B2=0.5
    #            n4=0.3 n5=0.2  n6=0.1
    # Curve: (0, 0); (0, 1/4); (1/6, 1/4); tie group 0.7 -> one point (2/6, 3/4); (2/6, 1); ...
    # fpr_limit = 1/4 falls inside the segment (1/6, 1/4) -> (2/6, 3/4): halfway, PRO = 1/2.
    # Trapezoids: [0, 1/6] at 1/4 -> 1/24; [1/6, 1/4]: width 1/12, mean height (1/4 + 1/2) / 2 = 3/8
    #   -> 1/32. Area 1/24 + 1/32 = 7/96; normalised by 1/4: 7/24.
    # (Splitting the tie would give 5/12 with A first or 1/4 with n2 first.)
    maps = np.array([[[0.7, 0.8, 0.7], [0.4, 0.9, 0.5], [0.3, 0.2, 0.1]]])
    assert aupro(_MASK, maps, fpr_limit=0.25) == pytest.approx(7 / 24, abs=1e-12)


def test_aupro_regions_across_images_are_weighted_equally() -> None:
    # Image 0 (2x3): a region of 4 pixels and 2 normal; image 1: a region of 1 pixel and 5 normal.
    masks = np.zeros((2, 2, 3), dtype=bool)
    masks[0, :, :2] = True  # 4 pixels
    masks[1, 0, 0] = True  # 1 pixel
    maps = np.zeros((2, 2, 3))
    maps[1, 0, 0] = 1.0  # only the small region scores high
    maps[0, 0, 0] = 0.5  # one pixel of the large region next
    # Curve: (0, 0); 1.0 -> (0, 1/2); 0.5 -> (0, 1/2 + 1/8); 0.0 (everything else) -> (1, 1).
    # fpr_limit = 1/2: segment (0, 5/8) -> (1, 1) at x = 1/2 gives 13/16;
    #   area = 1/2 * (5/8 + 13/16) / 2 = 23/64; normalised: 23/32.
    assert aupro(masks, maps, fpr_limit=0.5) == pytest.approx(23 / 32, abs=1e-12)


def test_aupro_perfect_and_inverted() -> None:
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 3, 16, 16)
    perfect = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert aupro(masks, perfect) == 1.0
    # Every normal pixel above every anomalous one: PRO stays 0 until FPR = 1.
    assert aupro(masks, -perfect) == 0.0
    assert aupro(masks, -perfect, fpr_limit=1.0) == 0.0


def test_aupro_invariant_to_monotone_transform() -> None:
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, 4, 12, 12)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2)
    base = aupro(masks, maps)
    assert 0.0 < base < 1.0
    assert aupro(masks, np.exp(3.0 * maps) - 7.0) == pytest.approx(base, abs=1e-12)
    assert aupro(masks, maps.astype(np.float32)) == pytest.approx(base, abs=1e-12)


def test_aupro_errors() -> None:
    maps = np.zeros((1, 3, 3))
    with pytest.raises(ValueError, match="no anomalous region"):
        aupro(np.zeros((1, 3, 3), dtype=bool), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        aupro(np.ones((1, 3, 3), dtype=bool), maps)
    with pytest.raises(ValueError, match="binarise"):
        aupro(_MASK.astype(np.uint8), maps)
    with pytest.raises(ValueError, match="shape"):
        aupro(_MASK, np.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match="leading axis"):
        aupro(_MASK[0], maps[0])
    with pytest.raises(ValueError, match="NaN"):
        aupro(_MASK, np.full((1, 3, 3), np.nan))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(_MASK, maps, fpr_limit=0.0)


# ---------------------------------------------------------------------------------------------
# AUPRO: brute-force reference


def _random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """[n, h, w] bool blobs: smoothed noise, thresholded; every image gets at least one pixel."""
    noise = ndimage.uniform_filter(rng.random((n, h, w)), size=(1, 3, 3))
    masks = noise > np.quantile(noise, 0.8)
    masks[:, 0, 0] = True
    return masks


def _brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Threshold by threshold: PRO over explicit regions, FPR over normal pixels, clipped trapezoids."""
    regions = []  # (image index, [H, W] bool region)
    for index, mask in enumerate(masks):
        lab, count = ndimage.label(mask)  # default structure: 4-connectivity
        regions += [(index, lab == i) for i in range(1, count + 1)]
    normal = ~masks
    curve = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pro = np.mean([np.mean(maps[index][region] >= t) for index, region in regions])
        fpr = np.sum((maps >= t) & normal) / np.sum(normal)
        curve.append((float(fpr), float(pro)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_lim) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 3, 10, 12)
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)  # ~14 distinct values: many ties
    expected = _brute_force_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Category metrics and aggregation


def _category(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    masks = _random_masks(rng, 6, 8, 8)
    masks[:3] = False  # three normal images
    labels = masks.reshape(6, -1).any(axis=1).astype(int)
    maps = rng.random(masks.shape) + 0.5 * masks
    scores = maps.reshape(6, -1).max(axis=1)
    return labels, scores, masks, maps


def test_category_metrics_without_masks() -> None:
    labels, scores, _, maps = _category(np.random.default_rng(0))
    result = compute_category_metrics(labels, scores, None, maps)
    assert isinstance(result, CategoryMetrics)
    assert result.pixel_auroc is None and result.pixel_ap is None and result.aupro is None
    assert result.image_auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_category_metrics_with_masks() -> None:
    labels, scores, masks, maps = _category(np.random.default_rng(1))
    result = compute_category_metrics(labels, scores, masks, maps, fpr_limit=0.3)
    for value in (result.image_auroc, result.image_ap, result.pixel_auroc, result.pixel_ap, result.aupro):
        assert value is not None and 0.0 <= value <= 1.0
    assert result.pixel_auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-10)
    assert result.aupro == pytest.approx(_brute_force_aupro(masks, maps, 0.3), abs=1e-12)


def test_category_metrics_errors() -> None:
    labels, scores, masks, maps = _category(np.random.default_rng(2))
    with pytest.raises(ValueError, match="shape"):
        compute_category_metrics(labels, scores, masks, maps[:, :, :-1])
    with pytest.raises(ValueError, match="N = 6"):
        compute_category_metrics(labels, scores, masks[:5], maps[:5])
    with pytest.raises(ValueError, match="binarise"):
        compute_category_metrics(labels, scores, masks.astype(np.float32), maps)
    with pytest.raises(ValueError, match="without maps"):
        compute_category_metrics(labels, scores, masks, None)
    with pytest.raises(ValueError, match="shape"):
        compute_category_metrics(labels, scores[:5], None, None)


def test_summarize_skips_none_and_uses_population_std() -> None:
    result = summarize([0.5, None, 0.7, 0.9, None])
    assert isinstance(result, Summary)
    assert result.n == 3
    assert result.mean == pytest.approx(0.7, abs=1e-15)
    assert result.std == pytest.approx(np.sqrt(((0.2) ** 2 + 0 + 0.2**2) / 3), abs=1e-15)  # ddof=0
    assert summarize([None, None]) == Summary(None, None, 0)
    assert summarize([0.25]) == Summary(0.25, 0.0, 1)


def test_mean_std_over_seeds_uses_sample_std() -> None:
    result = mean_std_over_seeds([0.5, 0.7, 0.9])
    assert result.n == 3
    assert result.mean == pytest.approx(0.7, abs=1e-15)
    assert result.std == pytest.approx(0.2, abs=1e-15)  # sqrt((0.04 + 0 + 0.04) / 2), ddof=1
    assert mean_std_over_seeds([0.8]) == Summary(0.8, 0.0, 1)
    assert mean_std_over_seeds([]) == Summary(None, None, 0)
    with pytest.raises(ValueError, match="None"):
        mean_std_over_seeds([0.5, None])  # type: ignore[list-item]
