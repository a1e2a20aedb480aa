"""Feature editing (eq. 10): each patch becomes a weighted mix of its K nearest coreset members.

As printed, eq. 10 weighs neighbour n_k by 1 - softmax_k(||x - n_k||_2); those weights sum to K - 1
and vanish for K = 1. Here they are divided by K - 1 so that they sum to 1, and K = 1 is the plain
nearest neighbour (weight 1). Distances are L2 (not squared), as in the equation.
"""

from __future__ import annotations

import numpy as np
import torch

from lafite_core.method.knn import KNN, Neighbours


def editing_weights(distances: torch.Tensor) -> torch.Tensor:
    """[Q, K] L2 distances (ascending) -> [Q, K] weights summing to 1 (normalised eq. 10)."""
    k = distances.shape[1]
    if k == 1:
        return torch.ones_like(distances)
    return (1.0 - torch.softmax(distances, dim=1)) / (k - 1)


def edit_features(features: torch.Tensor, bank: np.ndarray, knn: KNN, k: int,
                  found: Neighbours | None = None) -> torch.Tensor:
    """features [B, D, H, W] -> edited [B, D, H, W]; ``bank`` [M, D] is the coreset ``knn`` indexes.

    ``found``: the patches' neighbours when already searched (rows in the order image, then position;
    at least k columns; the first k are used), so one search for the largest K serves every smaller K.
    """
    b, d, h, w = features.shape
    if bank.shape[1] != d:
        raise ValueError(f"bank has {bank.shape[1]} channels but features have {d}")
    if found is None:
        queries = features.permute(0, 2, 3, 1).reshape(-1, d).detach().cpu().numpy()
        found = knn.search(queries, k)
    elif found.indices.shape[0] != b * h * w or found.indices.shape[1] < k:
        raise ValueError(f"neighbours {found.indices.shape} do not cover {b * h * w} patches with K={k}")
    weights = editing_weights(torch.from_numpy(np.ascontiguousarray(found.distances[:, :k])).sqrt())  # [Q, K]
    rows = torch.from_numpy(np.ascontiguousarray(found.indices[:, :k])).reshape(-1)
    neighbours = torch.from_numpy(np.ascontiguousarray(bank)).index_select(0, rows).view(-1, k, d)  # [Q, K, D]
    # [Q, D]: the weighted mix as one batched matmul (in the bank's dtype, as the elementwise mix promoted to it)
    edited = torch.bmm(weights.to(neighbours.dtype).unsqueeze(1), neighbours).squeeze(1)
    return edited.view(b, h, w, d).permute(0, 3, 1, 2).contiguous().to(features.device, features.dtype)
