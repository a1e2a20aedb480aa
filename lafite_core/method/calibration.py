"""Decision threshold calibrated without real anomalies.

From the pseudo-validation set (held-out normal images and synthesised anomalies) the threshold is
the cut on the raw image score that maximises balanced accuracy (mean of the true-positive and
true-negative rates), placed halfway between the two neighbouring scores; among equally good cuts,
the one nearest the 95th percentile of the normal scores. The normalised score is

    (raw - median of normal scores) / (threshold - median of normal scores),

so a typical normal image scores about 0 and the decision boundary is exactly 1. One calibration is
kept for all categories together and one per category with enough data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Cut:
    threshold: float
    normal_median: float
    balanced_accuracy: float
    num_normal: int
    num_anomalous: int

    def normalize(self, raw: float) -> float:
        scale = self.threshold - self.normal_median
        if scale <= 0:  # degenerate: normals spread above the cut; fall back to the threshold's scale
            scale = max(abs(self.threshold), 1e-12)
        return float((raw - self.normal_median) / scale)


@dataclass(frozen=True)
class Calibration:
    overall: Cut
    per_category: dict[str, Cut] = field(default_factory=dict)
    method: str = "lafite"

    def cut_for(self, category: str | None) -> Cut:
        return self.per_category.get(category or "", self.overall)

    def normalize(self, raw: float, category: str | None = None) -> float:
        return self.cut_for(category).normalize(raw)

    def decide(self, raw: float, category: str | None = None) -> bool:
        """True for anomalous: raw score at or above the threshold."""
        return bool(raw >= self.cut_for(category).threshold)

    def to_json(self) -> dict:
        return {"overall": asdict(self.overall), "per_category": {k: asdict(v) for k, v in self.per_category.items()},
                "method": self.method}

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        return cls(Cut(**data["overall"]), {k: Cut(**v) for k, v in data["per_category"].items()}, data["method"])


def best_cut(normal: np.ndarray, anomalous: np.ndarray) -> Cut:
    """Balanced-accuracy-optimal threshold for 1-D raw scores of normal and anomalous images."""
    normal = np.asarray(normal, dtype=np.float64)
    anomalous = np.asarray(anomalous, dtype=np.float64)
    if normal.size == 0 or anomalous.size == 0:
        raise ValueError("calibration needs at least one normal and one anomalous score")
    values = np.unique(np.concatenate([normal, anomalous]))
    # candidate thresholds: midpoints between consecutive distinct scores, plus both ends
    cands = np.concatenate([[values[0] - 1e-9], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-9]])
    tpr = (anomalous[None, :] >= cands[:, None]).mean(1)
    tnr = (normal[None, :] < cands[:, None]).mean(1)
    bacc = (tpr + tnr) / 2
    best = np.flatnonzero(np.isclose(bacc, bacc.max()))
    q95 = np.quantile(normal, 0.95)
    pick = best[np.argmin(np.abs(cands[best] - q95))]
    return Cut(float(cands[pick]), float(np.median(normal)), float(bacc[pick]), int(normal.size), int(anomalous.size))


def calibrate(scores: np.ndarray, labels: np.ndarray, categories: np.ndarray, method: str = "lafite") -> Calibration:
    """scores [N] raw image scores, labels [N] 0/1, categories [N] keys -> Calibration."""
    scores, labels, categories = np.asarray(scores), np.asarray(labels), np.asarray(categories)
    overall = best_cut(scores[labels == 0], scores[labels == 1])
    per: dict[str, Cut] = {}
    for key in np.unique(categories):
        sel = categories == key
        if (labels[sel] == 0).sum() >= 2 and (labels[sel] == 1).sum() >= 2:
            per[str(key)] = best_cut(scores[sel & (labels == 0)], scores[sel & (labels == 1)])
    return Calibration(overall, per, method)
