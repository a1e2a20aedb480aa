"""Nearest-neighbour search over a memory bank, through faiss (GPU index when present).

Exact by default (``IndexFlatL2``). With centroids (``ivf_centroids``, k-means over the bank, kept
with the model so that every process builds the same index) the search is an inverted file
(``IndexIVFFlat``): each query compares itself with the centroids, then with the members of its
``nprobe`` nearest lists only. Exact search costs queries x bank x dims; on magnetic_tile's 10%
bank (78,000 x 152) it took 676 ms an image against 34 ms for 256 lists and 4 probes, with the
editing bound's AUROCs within 0.3 points (recall@1 0.88: a near neighbour in place of the nearest
one changes an edited feature little). The lists default to about 4 sqrt(M): a query then compares
itself with more centroids (one matmul) and scans shorter lists (the slow, member-by-member part);
on the cpu profile's real 66,868-member bank at 8 probes that is 11 ms an image against 27 ms for
sqrt(M) lists, recall@1 0.93 against 0.98, and the same test AUROCs within 0.3 points
(``bench/knn_index.py``, ``bench/results/knn_index.md``).

``TorchKNN`` is the chunked-matmul reference the benchmark compares against; all return squared L2
distances, ascending.
"""

from __future__ import annotations

import logging
import math
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


LISTS_PER_SQRT = 4  # default inverted lists: about 4 sqrt(M) (module docstring: why not sqrt(M))


def ivf_lists(bank_size: int, configured: int = 0) -> int:
    """Inverted lists for a bank of ``bank_size``: ``configured`` (at most one per member), or about
    4 sqrt(M) with at least 32 members a list on average (at least one list)."""
    if configured:
        return max(1, min(configured, bank_size))
    return max(1, min(round(LISTS_PER_SQRT * math.sqrt(bank_size)), bank_size // 32))


def ivf_centroids(bank: np.ndarray, lists: int, seed: int) -> np.ndarray:
    """[lists, D] float32: k-means centroids of ``bank`` [M, D] (faiss, 20 iterations, seeded; at most
    256 members a list are sampled for the fit)."""
    import faiss

    bank = np.ascontiguousarray(bank, dtype=np.float32)
    _check(bank)
    km = faiss.Kmeans(bank.shape[1], int(lists), niter=20, seed=int(seed), verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=256)
    km.train(bank)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


class FaissKNN:
    """faiss index over ``bank`` [M, D]: ``IndexFlatL2`` (exact; moved to GPU 0 when faiss sees a GPU),
    or ``IndexIVFFlat`` over the given ``centroids`` searching ``nprobe`` lists (CPU)."""

    CALL_QUERIES = 16_384  # 16 images of 32 x 32 patches: a second or two per call on a 2-core CPU

    def __init__(self, bank: np.ndarray, use_gpu: bool | None = None, centroids: np.ndarray | None = None,
                 nprobe: int = 8) -> None:
        import faiss

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        _check(bank)
        self.bank = bank
        self.size, dim = bank.shape
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu is None:
            use_gpu = gpus > 0
        if use_gpu and gpus == 0:
            raise RuntimeError("use_gpu=True but faiss sees no GPU (install faiss-gpu on a GPU machine)")
        self._exact: FaissKNN | None = None
        self.nprobe = None
        if centroids is not None and not use_gpu:
            centroids = np.ascontiguousarray(centroids, dtype=np.float32)
            if centroids.ndim != 2 or centroids.shape[1] != dim or not len(centroids):
                raise ValueError(f"centroids must be [L, {dim}], got shape {centroids.shape}")
            self._quantizer = faiss.IndexFlatL2(dim)  # kept: the IVF index does not own it
            self._quantizer.add(centroids)
            index = faiss.IndexIVFFlat(self._quantizer, dim, centroids.shape[0], faiss.METRIC_L2)
            if not index.is_trained:
                raise RuntimeError("faiss did not take the given centroids as a trained quantizer")
            self.nprobe = index.nprobe = int(min(max(1, nprobe), centroids.shape[0]))
        else:
            index = faiss.IndexFlatL2(dim)
            if use_gpu:
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(bank)
        self.index = index
        self.on_gpu = bool(use_gpu)

    @property
    def exact(self) -> bool:
        return self.nprobe is None

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
        short = np.flatnonzero((i < 0).any(1))
        if len(short):  # the probed lists held fewer than k members: those queries are searched exactly
            if self._exact is None:
                self._exact = FaissKNN(self.bank, use_gpu=False)
            d[short], i[short] = self._exact.search(queries[short], k)
        return Neighbours(np.maximum(d, 0), i)


def knn_for(bank: np.ndarray, device: torch.device | str = "cpu", centroids: np.ndarray | None = None,
            nprobe: int = 8) -> KNN:
    """The search for ``bank``: faiss exact (a GPU index when faiss sees a GPU), or torch matmuls on
    CUDA when the installed faiss is the CPU build; with ``centroids``, an inverted file on the CPU
    (on a GPU the exact search is fast enough and is used instead)."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and gpus == 0:
        log.info("faiss has no GPU support here; nearest-neighbour search runs as exact torch matmuls on %s%s",
                 device, " (the model's inverted-file index is for CPUs)" if centroids is not None else "")
        return TorchKNN(bank, device=str(device))
    if gpus > 0 and centroids is not None:
        log.info("faiss sees a GPU: the bank is searched exactly there (the inverted-file index is for CPUs)")
        return FaissKNN(bank)
    return FaissKNN(bank, centroids=centroids, nprobe=nprobe)


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
