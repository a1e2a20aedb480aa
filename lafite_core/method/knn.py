"""Exact nearest-neighbour search over a memory bank, through faiss (GPU index when present).

``TorchKNN`` is the chunked-matmul reference the benchmark compares against; both return squared L2
distances, ascending.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)


class Neighbours(NamedTuple):
    distances: np.ndarray  # [Q, K] float32, squared L2, ascending
    indices: np.ndarray  # [Q, K] int64, rows of the bank


class KNN(Protocol):
    def search(self, queries: np.ndarray, k: int) -> Neighbours: ...


def squared_distances(
    a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor | None = None, b_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared L2 distances as one matmul, |a|^2 - 2 a.b + |b|^2: a [N, D], b [M, D] -> [N, M].

    b may be one point [D] (result [N]). ``a_sq`` [N] and ``b_sq`` [M] (or a scalar for one point)
    are the squared norms when the caller keeps them; computed otherwise. Rounding can make
    results slightly negative: clamp where that matters.
    """
    a_sq = (a * a).sum(1) if a_sq is None else a_sq
    b_sq = (b * b).sum(-1) if b_sq is None else b_sq
    if b.ndim == 1:
        return a_sq - 2 * (a @ b) + b_sq
    return a_sq[:, None] - 2 * a @ b.T + b_sq[None]


def _check(bank: np.ndarray) -> None:
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"bank must be a non-empty [M, D] array, got shape {bank.shape}")


class FaissKNN:
    """faiss ``IndexFlatL2`` over ``bank`` [M, D]; moved to GPU 0 when faiss sees a GPU."""

    CALL_QUERIES = 16_384  # 16 images of 32 x 32 patches: a second or two per call on a 2-core CPU

    def __init__(self, bank: np.ndarray, use_gpu: bool | None = None) -> None:
        import faiss

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        _check(bank)
        self.size = bank.shape[0]
        index = faiss.IndexFlatL2(bank.shape[1])
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu is None:
            use_gpu = gpus > 0
        if use_gpu:
            if gpus == 0:
                raise RuntimeError("use_gpu=True but faiss sees no GPU (install faiss-gpu on a GPU machine)")
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(bank)
        self.index = index
        self.on_gpu = bool(use_gpu)

    def search(self, queries: np.ndarray, k: int) -> Neighbours:
        """queries [Q, D] -> k nearest bank rows.

        Searched in calls of at most ``CALL_QUERIES`` queries: faiss holds the thread for a whole call,
        so a long search would otherwise leave Ctrl-C and SIGTERM unanswered for minutes.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or k < 1 or k > self.size:
            raise ValueError(f"need queries [Q, D] and 1 <= k <= {self.size}; got {queries.shape}, k={k}")
        d = np.empty((queries.shape[0], k), np.float32)
        i = np.empty((queries.shape[0], k), np.int64)
        for s in range(0, queries.shape[0], self.CALL_QUERIES):
            d[s : s + self.CALL_QUERIES], i[s : s + self.CALL_QUERIES] = self.index.search(
                queries[s : s + self.CALL_QUERIES], k)
        return Neighbours(np.maximum(d, 0), i)


def knn_for(bank: np.ndarray, device: torch.device | str = "cpu") -> KNN:
    """The fastest exact search available: faiss (GPU index when faiss sees a GPU), or torch matmuls
    on CUDA when the device is a GPU but the installed faiss is the CPU build."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if torch.device(device).type == "cuda" and gpus == 0:
        log.info("faiss has no GPU support here; nearest-neighbour search runs as torch matmuls on %s", device)
        return TorchKNN(bank, device=str(device))
    return FaissKNN(bank)


class TorchKNN:
    """Exact search by chunked ``|q|^2 - 2 q.b + |b|^2`` matmuls with torch (reference path)."""

    def __init__(self, bank: np.ndarray, device: str = "cpu", chunk: int = 4096) -> None:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        _check(bank)
        self.bank = torch.from_numpy(bank).to(device)
        self.bank_sq = (self.bank * self.bank).sum(1)
        self.chunk = chunk
        self.size = bank.shape[0]

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> Neighbours:
        q_all = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=self.bank.device)
        if q_all.ndim != 2 or q_all.shape[1] != self.bank.shape[1] or not 1 <= k <= self.size:
            raise ValueError(f"need queries [Q, {self.bank.shape[1]}] and 1 <= k <= {self.size}; "
                             f"got {tuple(q_all.shape)}, k={k}")
        ds, ids = [], []
        for q in q_all.split(self.chunk):
            d = squared_distances(q, self.bank, b_sq=self.bank_sq)
            v, i = torch.topk(d, k, dim=1, largest=False)
            ds.append(v.clamp_min(0))
            ids.append(i)
        return Neighbours(torch.cat(ds).cpu().numpy(), torch.cat(ids).cpu().numpy().astype(np.int64))
