"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) as the
baseline LafitE is measured against, on the same stored backbone features.

- Features: the baseline's view of the stored features (by default the stride-8 and stride-16 levels,
  each patch averaged with its 3 x 3 neighbourhood on its level's own grid: "locally aware patch
  features"), raw (PatchCore does not standardise them).
- Memory bank: greedy coreset of all training patches of all categories (1% by default), with the same
  chunked k-center as LafitE's bank (eq. 9 of LafitE).
- Pixel map: the distance of every patch to its nearest bank member, upsampled and smoothed as
  LafitE's map is.
- Image score (PatchCore eq. 7): the largest patch distance s*, scaled by 1 - softmax over the
  distances from that test patch to the b nearest bank neighbours of its nearest bank member m*
  (the first of them m* itself), which lowers the score of patches whose neighbourhood in the bank
  is dense.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lafite_core.config import BaselineConfig, CoresetConfig
from lafite_core.method.coreset import flat_patches, patch_bank
from lafite_core.method.knn import KNN
from lafite_core.method.scoring import AnomalyMaps, to_anomaly_maps
from lafite_core.method.views import apply_view


patches = flat_patches  # [N, D, h, w] -> [N*h*w, D] float32 (row-major over images, then positions)


def bank_coreset(baseline: BaselineConfig, coreset: CoresetConfig) -> CoresetConfig:
    """The coreset settings of PatchCore's bank: LafitE's, at the baseline's keep rate."""
    return coreset.model_copy(update={"keep_rate": baseline.keep_rate})


def build_bank(raw: torch.Tensor, groups: np.ndarray, baseline: BaselineConfig, coreset: CoresetConfig,
               channels: Sequence[int] | None, grids: Sequence[int] | None, seed: int) -> np.ndarray:
    """Raw training features [N, D, h, w], category keys [N] -> PatchCore bank [M, D'] (coreset per category first).

    ``channels`` and ``grids``: the stored levels' channel counts and native grid sides (see views)."""
    return patch_bank(apply_view(raw, baseline.view, channels, grids), groups, bank_coreset(baseline, coreset), seed)


def reweighted_scores(query: np.ndarray, nearest_sq: np.ndarray, nearest_idx: np.ndarray, bank: np.ndarray,
                      knn: KNN, neighbours: int) -> np.ndarray:
    """PatchCore's image score for B images.

    query [B, P, D] patch features, nearest_sq [B, P] squared distances to the nearest bank member,
    nearest_idx [B, P] its rows in ``bank`` [M, D] -> scores [B].
    """
    b = query.shape[0]
    dist = np.sqrt(np.clip(nearest_sq, 0, None))
    worst = dist.argmax(1)  # [B] the most anomalous patch of each image
    rows = np.arange(b)
    s_star = dist[rows, worst]
    m_star = bank[nearest_idx[rows, worst]]  # [B, D]
    support = knn.search(np.ascontiguousarray(m_star), min(neighbours, bank.shape[0])).indices  # [B, b]
    q = torch.from_numpy(query[rows, worst])  # [B, D]
    d = torch.linalg.vector_norm(torch.from_numpy(bank[support]) - q[:, None], dim=-1)  # [B, b]
    weight = 1 - F.softmax(d.double(), dim=1)[:, 0].numpy()
    return (weight * s_star).astype(np.float32)


def patchcore_maps(raw: torch.Tensor, bank: np.ndarray, knn: KNN, baseline: BaselineConfig,
                   channels: Sequence[int] | None, grids: Sequence[int] | None, image_size: int,
                   sigma: float) -> AnomalyMaps:
    """Raw features [B, D, h, w] -> AnomalyMaps: smoothed distance maps [B, S, S] and reweighted scores [B]."""
    x = apply_view(raw, baseline.view, channels, grids)
    bsz, d, h, w = x.shape
    q = patches(x)
    found = knn.search(q, 1)
    nearest_sq = found.distances[:, 0].reshape(bsz, h * w)
    errors = torch.from_numpy(np.sqrt(np.clip(nearest_sq, 0, None))).view(bsz, h, w).to(x.device)
    maps = to_anomaly_maps(errors, image_size, sigma, 1).maps
    scores = reweighted_scores(q.reshape(bsz, h * w, d), nearest_sq, found.indices[:, 0].reshape(bsz, h * w),
                               bank, knn, baseline.reweight_neighbours)
    return AnomalyMaps(maps, torch.from_numpy(scores))
