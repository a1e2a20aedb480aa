"""What an evaluation keeps of each category for its report: image scores, pixel curves, a gallery.

The metrics table holds areas; the report also needs what is behind them: every test image's label and
score per method (image ROC and PR curves, score histograms), the pixel-level curves (computed where
the maps are, thinned to a few hundred points), and a few images with their maps and masks (the
gallery). One ``.npz`` per category (no pickles), written by the evaluation's worker; about 1 MB
with the default nine gallery images at 224 px.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from lafite_core.method.metrics import pr_curve, roc_curve
from lafite_core.stages import CategoryScores

GalleryRole = Literal["top_anomaly", "false_alarm", "miss"]


class Curve(NamedTuple):
    """A plotted curve: ROC (x fpr, y tpr) or precision-recall (x recall, y precision); [P] float64 each."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class GalleryItem:
    """One gallery image as the model saw it: image [S, S, 3] uint8, map [S, S] (float16 precision once
    stored: it is for display), mask [S, S] bool or None."""

    index: int  # its row in the category's arrays
    role: GalleryRole
    image: np.ndarray
    amap: np.ndarray
    mask: np.ndarray | None


@dataclass(frozen=True)
class CategoryEvidence:
    """A category's test set as scored: N images, every method's image scores, pixel curves, gallery."""

    dataset: str
    category: str
    urls: np.ndarray  # [N] str
    defect_types: np.ndarray  # [N] str ("good" for normal images)
    labels: np.ndarray  # [N] int8, 1 anomalous
    original_sizes: np.ndarray  # [N, 2] int (width, height) of the files
    scores: dict[str, np.ndarray]  # method -> [N] float64
    pixel_roc: dict[str, Curve]  # method -> curve; empty without masks
    pixel_pr: dict[str, Curve]
    gallery_method: str
    gallery: tuple[GalleryItem, ...]

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.category}"

    def to_bytes(self) -> bytes:
        """The evidence as compressed ``.npz`` bytes (strings as unicode arrays, metadata as JSON)."""
        methods = list(self.scores)
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps({"dataset": self.dataset, "category": self.category, "methods": methods,
                                         "curve_methods": list(self.pixel_roc),
                                         "gallery_method": self.gallery_method})),
            "urls": np.asarray(self.urls, dtype=str), "defect_types": np.asarray(self.defect_types, dtype=str),
            "labels": self.labels.astype(np.int8), "original_sizes": self.original_sizes.astype(np.int64),
        }
        for i, m in enumerate(methods):
            arrays[f"score_{i}"] = self.scores[m].astype(np.float64)
        for i, m in enumerate(self.pixel_roc):
            arrays[f"roc_{i}"] = np.stack(self.pixel_roc[m])
            arrays[f"pr_{i}"] = np.stack(self.pixel_pr[m])
        if self.gallery:
            size = self.gallery[0].image.shape[:2]
            arrays["gallery_index"] = np.array([g.index for g in self.gallery], dtype=np.int64)
            arrays["gallery_role"] = np.array([g.role for g in self.gallery], dtype=str)
            arrays["gallery_image"] = np.stack([g.image for g in self.gallery]).astype(np.uint8)
            arrays["gallery_map"] = np.stack([g.amap for g in self.gallery]).astype(np.float16)  # for display
            arrays["gallery_has_mask"] = np.array([g.mask is not None for g in self.gallery])
            arrays["gallery_mask"] = np.stack([np.zeros(size, bool) if g.mask is None else g.mask
                                               for g in self.gallery])
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "CategoryEvidence":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            gallery: tuple[GalleryItem, ...] = ()
            if "gallery_index" in z:
                gallery = tuple(
                    GalleryItem(int(i), str(role), image, amap.astype(np.float32), mask if has else None)
                    for i, role, image, amap, mask, has in zip(
                        z["gallery_index"], z["gallery_role"], z["gallery_image"], z["gallery_map"],
                        z["gallery_mask"], z["gallery_has_mask"]))
            return cls(
                meta["dataset"], meta["category"], z["urls"], z["defect_types"], z["labels"], z["original_sizes"],
                {m: z[f"score_{i}"] for i, m in enumerate(meta["methods"])},
                {m: Curve(*z[f"roc_{i}"]) for i, m in enumerate(meta["curve_methods"])},
                {m: Curve(*z[f"pr_{i}"]) for i, m in enumerate(meta["curve_methods"])},
                meta["gallery_method"], gallery)


def pick_gallery(labels: np.ndarray, scores: np.ndarray, per_role: int) -> list[tuple[int, GalleryRole]]:
    """(index, role) of the gallery: the ``per_role`` highest-scoring anomalies, highest-scoring normals
    (false alarms) and lowest-scoring anomalies (misses, none of them already among the highest).

    labels [N] 0/1, scores [N]. Ties keep the file order (a stable sort), so the pick is deterministic.
    """
    if per_role < 0:
        raise ValueError(f"per_role must be >= 0, got {per_role}")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    anomalies = [int(i) for i in order if labels[i] == 1]
    normals = [int(i) for i in order if labels[i] == 0]
    top = anomalies[:per_role]
    misses = [i for i in reversed(anomalies) if i not in top][:per_role]
    return ([(i, "top_anomaly") for i in top] + [(i, "false_alarm") for i in normals[:per_role]]
            + [(i, "miss") for i in misses])


def collect(cs: CategoryScores, gallery_method: str = "lafite", per_role: int = 3,
            curve_points: int = 256) -> CategoryEvidence:
    """A scored category -> its evidence: scores of every method, thinned pixel curves, the gallery.

    Pixel curves are computed over the images with a known mask, as the pixel metrics are, when the
    category has masks and at least one defect pixel; at most ``curve_points`` points each. The
    gallery shows ``gallery_method`` (the first method scored when that one was not).
    """
    samples = [s.sample for s in cs.loaded]
    labels = np.array([s.label for s in samples], dtype=np.int8)
    method = gallery_method if gallery_method in cs.scores else next(iter(cs.scores))
    roc: dict[str, Curve] = {}
    pr: dict[str, Curve] = {}
    known = np.array([s.mask is not None for s in cs.loaded])
    if cs.category.has_masks and labels[known].max(initial=0) == 1:
        masks = np.stack([s.mask for s in cs.loaded if s.mask is not None])
        for m, maps in cs.maps.items():
            r = roc_curve(masks, maps[known], curve_points)
            p = pr_curve(masks, maps[known], curve_points)
            roc[m], pr[m] = Curve(r.fpr, r.tpr), Curve(p.recall, p.precision)
    gallery = tuple(
        GalleryItem(i, role, cs.loaded[i].image, cs.maps[method][i].astype(np.float32), cs.loaded[i].mask)
        for i, role in pick_gallery(labels, cs.scores[method], per_role))
    return CategoryEvidence(
        cs.category.dataset, cs.category.name, np.array([s.url for s in samples], dtype=str),
        np.array([s.defect_type for s in samples], dtype=str), labels,
        np.array([s.original_size for s in cs.loaded], dtype=np.int64).reshape(-1, 2),
        {m: np.asarray(v, dtype=np.float64) for m, v in cs.scores.items()}, roc, pr, method, gallery)
