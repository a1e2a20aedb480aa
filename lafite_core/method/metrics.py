"""Detection and segmentation metrics: AUROC, AP, AUPRO, and their aggregation.

Every curve comes from one descending sort of the scores; tied scores form one group and the curve
takes a point only at the end of each group, so results match scikit-learn's ``roc_auc_score`` and
``average_precision_score`` and MVTec AD's PRO evaluation, tie handling included. Counts are
accumulated in int64 and areas in float64, so ten million pixels cost one argsort and a few
cumulative sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import ndimage

# 4-connectivity inside each image, no connection across the image axis: labelling [N, H, W] at
# once gives every image its own regions with labels that are unique over all images.
_REGIONS_4_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_REGIONS_4_CONNECTED[1] = ndimage.generate_binary_structure(2, 1)


def _check_scores(scores: np.ndarray, name: str) -> None:
    if scores.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real-valued array, got dtype {scores.dtype}")
    if scores.dtype.kind == "f" and np.isnan(scores).any():
        raise ValueError(f"{name} contain NaN; replace or drop those entries before scoring")


def _binary_labels(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flat bool labels and flat scores, checked: same shape, labels in {0, 1}, scores without NaN.

    bool labels and contiguous scores are flattened without a copy.
    """
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels have shape {y.shape} but scores have shape {s.shape}; pass one score per label")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    _check_scores(s, "scores")
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


def _ranked_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True- and false-positive counts [G] (float64, exact) at each distinct threshold, highest first."""
    order, ends = _descending_tie_groups(s)
    tps = np.cumsum(y[order], dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve; ties count one half, as in ``sklearn.metrics.roc_auc_score``.

    labels: 0/1 or bool, any shape; scores: same shape, higher means more anomalous. Both are
    flattened. Raises ValueError on a shape mismatch, NaN scores, or a single class.
    """
    y, s = _binary_labels(labels, scores)
    tps, fps = _ranked_counts(y, s)
    d_fps = np.diff(fps, prepend=0.0)
    tps_prev = np.concatenate(([0.0], tps[:-1]))
    # Trapezoids in count units: every term is an exact integer below 2**53 for < ~10**8 samples.
    area = float(np.dot(d_fps, tps + tps_prev))
    return area / (2.0 * tps[-1] * fps[-1])


def average_precision(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Average precision, sum over thresholds of (R_k - R_{k-1}) P_k, as in ``average_precision_score``.

    No interpolation of the precision-recall curve. Same inputs and errors as :func:`auroc`.
    """
    y, s = _binary_labels(labels, scores)
    tps, fps = _ranked_counts(y, s)
    d_tps = np.diff(tps, prepend=0.0)
    precision = tps / (tps + fps)
    return float(np.dot(d_tps, precision) / tps[-1])


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
    return CategoryMetrics(
        image_auroc=image_auroc,
        image_ap=image_ap,
        pixel_auroc=auroc(m, a),
        pixel_ap=average_precision(m, a),
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
