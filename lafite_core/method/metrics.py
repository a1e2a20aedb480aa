"""Detection and segmentation metrics: AUROC, AP, their curves, AUPRO, and their aggregation.

AUROC, AP and the ROC and precision-recall curves come from ``sklearn.metrics``, behind this
module's input checks and error messages; tied scores form one group and the curves take a point
only at the end of each group. From ``_FAST_PATH_MIN_SAMPLES`` samples on (pixel-level metrics),
AUROC and AP take a rank-based path instead: the positives' and the negatives' scores each
sorted, every positive placed among the negatives by binary search, int64 counts; faster than
scikit-learn at 10M pixels (``bench/metrics_speed.py``) and equal to it up to float rounding
(tested to 1e-9). AUPRO (MVTec AD's PRO evaluation, which no library provides) is
computed here from a descending argsort of all pixels, with the same tie handling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from sklearn import metrics as sk_metrics

# 4-connectivity inside each image, no connection across the image axis: labelling [N, H, W] at
# once gives every image its own regions with labels that are unique over all images.
_REGIONS_4_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_REGIONS_4_CONNECTED[1] = ndimage.generate_binary_structure(2, 1)

_FAST_PATH_MIN_SAMPLES = 1_000_000
"""From this many samples on, AUROC and AP use the rank-based path instead of scikit-learn."""


def _check_scores(scores: np.ndarray, name: str) -> None:
    if scores.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real-valued array, got dtype {scores.dtype}")
    if scores.dtype.kind == "f" and np.isnan(scores).any():
        raise ValueError(f"{name} contain NaN; replace or drop those entries before scoring")


def _binary_labels(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flat bool labels and flat scores, checked: same shape, labels in {0, 1}, finite scores, both classes.

    bool labels and contiguous scores are flattened without a copy.
    """
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels have shape {y.shape} but scores have shape {s.shape}; pass one score per label")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    _check_scores(s, "scores")
    if s.dtype.kind == "f" and np.isinf(s).any():
        raise ValueError("scores contain inf; scikit-learn's metrics need finite scores: clip them to the "
                         "largest finite score or drop those entries before scoring")
    y = y.ravel()
    if y.dtype != np.bool_:
        if np.any((y != 0) & (y != 1)):
            raise ValueError(f"labels must be 0/1 or bool, got values {np.unique(y)[:5]} (dtype {y.dtype})")
        y = y == 1
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        only = "positive" if n_pos else "negative"
        raise ValueError(f"only {only} labels present ({y.size} samples); the metric needs both classes")
    return y, s.ravel()


def _descending_tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order that sorts flat ``scores`` [M] descending, and the positions in it where each tie group ends.

    Returns ``order`` [M] and ``ends`` [G], G = number of distinct scores; ``ends[-1] == M - 1``.
    """
    order = np.argsort(scores)[::-1]
    ordered = scores[order]
    ends = np.flatnonzero(ordered[1:] != ordered[:-1])
    return order, np.append(ends, ordered.size - 1)


def _class_sorted(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scores of the positives and of the negatives, each sorted ascending (``np.sort``, a SIMD
    sort in numpy 2; an argsort of all scores cost 2.6x as much at 12M pixels on the build machine)."""
    return np.sort(s[y]), np.sort(s[~y])


def _rank_auroc(y: np.ndarray, s: np.ndarray, by_class: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """AUROC of checked flat bool labels [M] and scores [M]: the share of (positive, negative) pairs the
    positive wins, a tie counting one half, from each positive's place among the sorted negatives.

    ``by_class``: their :func:`_class_sorted`, when already computed (the sorts are the whole cost)."""
    pos, neg = by_class if by_class is not None else _class_sorted(y, s)
    below = np.searchsorted(neg, pos, "left")  # negatives scoring strictly lower than each positive
    level = np.searchsorted(neg, pos, "right")  # ... lower or equal
    # Twice the win count in int64: exact for any number of pixels that fits in memory.
    twice = 2 * int(below.sum(dtype=np.int64)) + int((level - below).sum(dtype=np.int64))
    return twice / (2.0 * pos.size * neg.size)


def _rank_average_precision(y: np.ndarray, s: np.ndarray,
                            by_class: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """AP of checked flat bool labels [M] and scores [M]: the mean over the positives of the precision
    among all samples scoring at least as high (a tie group's precision at its end, as scikit-learn)."""
    pos, neg = by_class if by_class is not None else _class_sorted(y, s)
    tps = pos.size - np.searchsorted(pos, pos, "left")  # positives scoring >= each positive
    fps = neg.size - np.searchsorted(neg, pos, "left")  # negatives scoring >= each positive
    return float(np.mean(tps / (tps + fps)))


def auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); ties count one half.

    labels: 0/1 or bool, any shape; scores: same shape, higher means more anomalous. Both are
    flattened. Raises ValueError on a shape mismatch, NaN or inf scores, or a single class.
    """
    y, s = _binary_labels(labels, scores)
    if y.size >= _FAST_PATH_MIN_SAMPLES:
        return _rank_auroc(y, s)
    return float(sk_metrics.roc_auc_score(y, s))


def average_precision(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Average precision, sum over thresholds of (R_k - R_{k-1}) P_k (``sklearn.metrics.average_precision_score``).

    No interpolation of the precision-recall curve. Same inputs and errors as :func:`auroc`.
    """
    y, s = _binary_labels(labels, scores)
    if y.size >= _FAST_PATH_MIN_SAMPLES:
        return _rank_average_precision(y, s)
    return float(sk_metrics.average_precision_score(y, s))


def auroc_and_average_precision(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[float, float]:
    """:func:`auroc` and :func:`average_precision` of the same inputs, sorting them once (pixel
    metrics: millions of samples, where the sorts are the whole cost of either)."""
    y, s = _binary_labels(labels, scores)
    if y.size >= _FAST_PATH_MIN_SAMPLES:
        by_class = _class_sorted(y, s)
        return _rank_auroc(y, s, by_class), _rank_average_precision(y, s, by_class)
    return float(sk_metrics.roc_auc_score(y, s)), float(sk_metrics.average_precision_score(y, s))


class RocCurve(NamedTuple):
    """ROC curve, P points from (0, 0) to (1, 1), fpr and tpr non-decreasing, thresholds decreasing.

    ``thresholds[0]`` is inf (no sample flagged); point k flags the samples scoring >= thresholds[k].
    """

    fpr: np.ndarray  # [P] float64
    tpr: np.ndarray  # [P] float64
    thresholds: np.ndarray  # [P] float64


class PrCurve(NamedTuple):
    """Precision-recall curve, P points in scikit-learn's order: recall non-increasing from 1 to 0.

    Point k < P - 1 flags the samples scoring >= thresholds[k] (thresholds increasing); the last
    point, precision 1 and recall 0, has no threshold.
    """

    precision: np.ndarray  # [P] float64
    recall: np.ndarray  # [P] float64
    thresholds: np.ndarray  # [P - 1], dtype of the scores


def _check_max_points(max_points: int | None) -> None:
    if max_points is not None and max_points < 2:
        raise ValueError(f"max_points must be at least 2 (the two ends of the curve) or None, got {max_points}")


def _thin(x: np.ndarray, y: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` points of the polyline (x [P], y [P]), evenly spaced along it.

    Distance along the curve is the running sum of |dx| + |dy|, so steep and flat stretches both
    keep points; the first and last points are always kept. Indices are increasing.
    """
    if x.size <= max_points:
        return np.arange(x.size)
    along = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))))
    targets = np.linspace(0.0, along[-1], max_points)[1:-1]
    inner = np.searchsorted(along, targets)
    return np.unique(np.concatenate(([0], inner, [x.size - 1])))


def roc_curve(labels: npt.ArrayLike, scores: npt.ArrayLike, max_points: int | None = None) -> RocCurve:
    """ROC curve of flattened ``labels`` and ``scores`` (``sklearn.metrics.roc_curve``); inputs as :func:`auroc`.

    ``max_points=None`` keeps one point per distinct score. With ``max_points``, points on straight
    stretches are dropped first (``drop_intermediate=True``, which leaves the curve's shape and area
    unchanged), then, if more remain, at most ``max_points`` are kept, evenly spaced along the curve
    (ends included): for plotting curves over millions of pixels. Areas come from :func:`auroc`, not
    from a thinned curve.
    """
    _check_max_points(max_points)
    y, s = _binary_labels(labels, scores)
    fpr, tpr, thresholds = sk_metrics.roc_curve(y, s, drop_intermediate=max_points is not None)
    if max_points is not None:
        keep = _thin(fpr, tpr, max_points)
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return RocCurve(fpr, tpr, thresholds)


def pr_curve(labels: npt.ArrayLike, scores: npt.ArrayLike, max_points: int | None = None) -> PrCurve:
    """Precision-recall curve (``sklearn.metrics.precision_recall_curve``); inputs as :func:`auroc`.

    ``max_points`` thins as in :func:`roc_curve` (``drop_intermediate=True`` drops points that do not
    show on a plot, then even spacing along the curve); :func:`average_precision` gives the area.
    """
    _check_max_points(max_points)
    y, s = _binary_labels(labels, scores)
    precision, recall, thresholds = sk_metrics.precision_recall_curve(
        y, s, drop_intermediate=max_points is not None)
    if max_points is not None:
        keep = _thin(recall, precision, max_points)
        # The last point (precision 1, recall 0) is always kept and is the only one without a threshold.
        precision, recall, thresholds = precision[keep], recall[keep], thresholds[keep[:-1]]
    return PrCurve(precision, recall, thresholds)


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x [P] non-decreasing, y [P]) from x[0] to x_max.

    The point at exactly x_max is interpolated linearly on the first segment that crosses it.
    """
    beyond = np.flatnonzero(x > x_max)
    if beyond.size == 0:
        return float(np.trapezoid(y, x))
    k = int(beyond[0])
    assert k > 0, "the curve must start at or below x_max"
    y_at = y[k - 1] + (y[k] - y[k - 1]) * (x_max - x[k - 1]) / (x[k] - x[k - 1])
    tail = (x_max - x[k - 1]) * (y[k - 1] + y_at) / 2.0
    return float(np.trapezoid(y[:k], x[:k]) + tail)


def aupro(masks: npt.ArrayLike, maps: npt.ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD evaluation).

    masks: [N, H, W] bool ground truth; maps: [N, H, W] anomaly scores. Regions are the
    4-connected components of each image's mask. At a threshold t, PRO is the mean over all regions
    of all images of the fraction of the region's pixels scoring >= t, and FPR the fraction of all
    normal pixels scoring >= t. The curve starts at (0, 0), has one point per distinct score, and
    is integrated with the trapezoid rule up to ``fpr_limit`` (interpolated there), then divided by
    ``fpr_limit``, so the result lies in [0, 1].
    """
    m = np.asarray(masks)
    a = np.asarray(maps)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    if m.dtype != np.bool_:
        raise ValueError(f"masks must be bool, got dtype {m.dtype}; binarise them first, e.g. masks > 0.5")
    if m.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {m.shape}; add a leading axis for one image")
    if a.shape != m.shape:
        raise ValueError(f"maps have shape {a.shape} but masks have shape {m.shape}; resize the maps to the masks")
    _check_scores(a, "maps")

    regions, n_regions = ndimage.label(m, structure=_REGIONS_4_CONNECTED)
    n_normal = m.size - int(np.count_nonzero(m))
    if n_regions == 0:
        raise ValueError("masks contain no anomalous region; AUPRO is undefined without anomalies")
    if n_normal == 0:
        raise ValueError("masks contain no normal pixel; AUPRO is undefined without normal pixels")

    # Each anomalous pixel adds 1 / (R * |its region|) to PRO; label 0 (normal) adds nothing.
    # Dividing the running sum of 1 / |region| by its own total (R up to rounding) rather than by R
    # makes PRO exactly 1 once every anomalous pixel is in.
    region_sizes = np.bincount(regions.ravel())
    pixel_weight = 1.0 / region_sizes.astype(np.float64)
    pixel_weight[0] = 0.0

    order, ends = _descending_tie_groups(a.ravel())
    pro_sum = np.cumsum(pixel_weight[regions.ravel()[order]])[ends]
    pro = pro_sum / pro_sum[-1]
    normal_count = np.cumsum(~m.ravel()[order], dtype=np.int64)[ends]
    fpr = normal_count / n_normal  # counts, not a sum of 1 / N_normal: exact at every point

    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


@dataclass(frozen=True)
class CategoryMetrics:
    """Metrics of one category, fractions in [0, 1]; pixel metrics are None without masks."""

    image_auroc: float
    image_ap: float
    pixel_auroc: float | None
    pixel_ap: float | None
    aupro: float | None


def compute_category_metrics(
    image_labels: npt.ArrayLike,
    image_scores: npt.ArrayLike,
    masks: npt.ArrayLike | None,
    maps: npt.ArrayLike | None,
    fpr_limit: float = 0.3,
    with_aupro: bool = True,
) -> CategoryMetrics:
    """Image-level AUROC/AP and, when masks are given, pixel AUROC/AP and AUPRO of one category.

    ``with_aupro=False`` leaves AUPRO None (the hyperparameter search needs only AUROCs).

    image_labels: [N] 0/1; image_scores: [N]; masks: [N, H, W] bool or None; maps: [N, H, W]
    scores, required when masks are given and ignored otherwise.
    """
    labels = np.asarray(image_labels)
    scores = np.asarray(image_scores)
    if labels.ndim != 1:
        raise ValueError(f"image_labels must be [N], got shape {labels.shape}")
    image_auroc = auroc(labels, scores)
    image_ap = average_precision(labels, scores)
    if masks is None:
        return CategoryMetrics(image_auroc, image_ap, None, None, None)

    if maps is None:
        raise ValueError("masks were given without maps; pass the [N, H, W] anomaly maps or masks=None")
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.dtype != np.bool_:
        raise ValueError(f"masks must be bool, got dtype {m.dtype}; binarise them first, e.g. masks > 0.5")
    if m.ndim != 3 or m.shape[0] != labels.shape[0]:
        raise ValueError(f"masks must be [N, H, W] with N = {labels.shape[0]} images, got shape {m.shape}")
    if a.shape != m.shape:
        raise ValueError(f"maps have shape {a.shape} but masks have shape {m.shape}; resize the maps to the masks")
    pixel_auroc, pixel_ap = auroc_and_average_precision(m, a)
    return CategoryMetrics(
        image_auroc=image_auroc,
        image_ap=image_ap,
        pixel_auroc=pixel_auroc,
        pixel_ap=pixel_ap,
        aupro=aupro(m, a, fpr_limit) if with_aupro else None,
    )


class Summary(NamedTuple):
    """Mean and standard deviation of n values; both None when n == 0."""

    mean: float | None
    std: float | None
    n: int


def summarize(values: Sequence[float | None]) -> Summary:
    """Mean and population std (ddof=0) over categories, skipping None entries.

    The population std describes the spread of this fixed set of categories, not an estimate.
    """
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if present.size == 0:
        return Summary(None, None, 0)
    return Summary(float(present.mean()), float(present.std(ddof=0)), int(present.size))


def mean_std_over_seeds(values: Sequence[float]) -> Summary:
    """Mean and sample std (ddof=1) over seeds; std is 0.0 for a single seed.

    None entries are rejected: a missing seed would silently change n.
    """
    if any(v is None for v in values):
        raise ValueError("values over seeds contain None; rerun the missing seeds or drop them explicitly")
    x = np.array(values, dtype=np.float64)
    if x.size == 0:
        return Summary(None, None, 0)
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return Summary(float(x.mean()), std, int(x.size))
