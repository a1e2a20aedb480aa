"""Memory-bank coreset (eq. 9): seeded greedy k-center, chunked so that it scales to millions of patches.

Exact greedy k-center (Gonzalez) selects M = keep_rate * N centres, each step scanning all N
points: O(N * M * d), about 0.3 s per centre for 1.8 million patches on a 2-core CPU, i.e. hours for
an MVTec-size bank. Here:

1. distances are computed on a seeded Gaussian random projection to ``projection_dim`` dimensions
   (Johnson-Lindenstrauss: pairwise distances are preserved up to a small relative error; PatchCore
   does the same);
2. patches are split into chunks of at most ``chunk_size`` (first by group, e.g. category, then at
   random), and exact greedy k-center runs inside each chunk with the same keep rate. Cost:
   O(N * chunk_size * keep_rate * d), linear in N.

How the result differs from exact greedy on all patches: each chunk's selection is exactly the greedy
selection for that chunk, but chunks do not see each other's centres, so where two chunks cover the
same region of feature space both place centres there (some redundancy), and the covering radius of
the union can be larger than that of global greedy. ``covering_radius`` measures it; the tests bound
the ratio against exact greedy on a set small enough for both.

A warm start merges (``coreset.merge``): the parent's rows over images that are still fitted stay,
and new chunks over the new images add theirs (:func:`merge_plan`, :func:`bank_rows`). That is the
same approximation as above with another chunking (old patches in the parent's chunks, new ones in
new chunks), so each patch stays covered by its own chunk's centres. ``BankSources`` records, with
every model, which fitted image and position each bank row is.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from lafite_core.config import CoresetConfig
from lafite_core.method.knn import squared_distances


class Coreset(NamedTuple):
    indices: np.ndarray  # [M] int64, rows of the input in selection order per chunk
    num_chunks: int


def random_projection(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """Gaussian projection matrix [dim_in, dim_out] scaled by 1/sqrt(dim_out); seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=g) / math.sqrt(dim_out)


def project(features: np.ndarray, dim_out: int, seed: int, batch: int = 262_144) -> torch.Tensor:
    """[N, D] -> [N, d] float32 (identity copy when D <= d)."""
    n, d_in = features.shape
    if d_in <= dim_out:
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    proj = random_projection(d_in, dim_out, seed)
    out = torch.empty(n, dim_out)
    for s in range(0, n, batch):
        out[s : s + batch] = torch.from_numpy(np.ascontiguousarray(features[s : s + batch], dtype=np.float32)) @ proj
    return out


@torch.no_grad()
def greedy_kcenter(points: torch.Tensor, n_select: int, start: int) -> torch.Tensor:
    """Exact greedy k-center on ``points`` [N, d]: ``n_select`` distinct row indices [n_select].

    Starts at row ``start``; each step adds the point farthest from the centres chosen so far.
    """
    n = points.shape[0]
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must lie in [1, {n}], got {n_select}")
    sq = (points * points).sum(1)
    selected = torch.empty(n_select, dtype=torch.long)
    min_d = torch.full((n,), float("inf"), device=points.device)
    idx = start
    for i in range(n_select):
        selected[i] = idx
        c = points[idx]
        d = squared_distances(points, c, sq, sq[idx])
        torch.minimum(min_d, d, out=min_d)
        min_d[idx] = -1.0  # a chosen centre is never chosen again, even with duplicate points
        idx = int(torch.argmax(min_d))
    return selected


def select_coreset(
    features: np.ndarray,
    cfg: CoresetConfig,
    seed: int,
    groups: np.ndarray | None = None,
    device: str | None = None,
) -> Coreset:
    """Row indices of the coreset of ``features`` [N, D]; ``groups`` [N] keeps groups apart.

    Same inputs and seed, same indices. Runs on CUDA when available unless ``device`` is given.
    """
    n = features.shape[0]
    if features.ndim != 2 or n == 0:
        raise ValueError(f"features must be a non-empty [N, D] array, got shape {features.shape}")
    if groups is not None and groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(seed)
    projected = project(features, cfg.projection_dim, seed)
    group_ids = np.zeros(n, dtype=np.int64) if groups is None else np.unique(groups, return_inverse=True)[1]
    chosen: list[np.ndarray] = []
    num_chunks = 0
    for g in range(int(group_ids.max()) + 1):
        members = np.flatnonzero(group_ids == g)
        members = members[rng.permutation(members.size)]
        parts = max(1, math.ceil(members.size / cfg.chunk_size))
        for chunk in np.array_split(members, parts):
            n_select = max(1, round(cfg.keep_rate * chunk.size))
            pts = projected[torch.from_numpy(chunk)].to(device)
            local = greedy_kcenter(pts, n_select, int(rng.integers(chunk.size)))
            chosen.append(chunk[local.cpu().numpy()])
            num_chunks += 1
    return Coreset(np.concatenate(chosen).astype(np.int64), num_chunks)


def flat_patches(features: torch.Tensor) -> np.ndarray:
    """Feature maps [N, D, h, w] -> patches [N * h * w, D] float32, row = image * h * w + position."""
    return np.ascontiguousarray(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).cpu().numpy(),
                                dtype=np.float32)


def bank_rows(patches: np.ndarray, per_image: int, groups: np.ndarray, cfg: CoresetConfig, seed: int,
              images: np.ndarray | None = None, kept: np.ndarray | None = None) -> np.ndarray:
    """The memory bank's rows among ``patches`` [N * per_image, D] (eq. 9), sorted: image, then position.

    ``groups`` [N]: category keys (the coreset runs per category first). Without ``images``, the
    coreset runs over every image. A merge (:func:`merge_plan`) passes ``images``, the image rows to
    select over (a category's new images, or all of a rebuilt category's), and ``kept``, patch rows
    that stay as they are (the parent's selection over images that are still fitted): each patch is
    still covered by the centres its own chunk selected, as in a coreset built in one go.
    """
    codes = np.unique(groups, return_inverse=True)[1].astype(np.int32)
    if images is None:  # every image: no copy of the patches
        if kept is not None and len(kept):
            raise ValueError("kept rows need the images to select over (merge_plan gives both)")
        return np.sort(select_coreset(patches, cfg, seed, groups=np.repeat(codes, per_image)).indices)
    images = np.asarray(images, dtype=np.int64)
    chosen = [np.zeros(0, dtype=np.int64) if kept is None else np.asarray(kept, dtype=np.int64)]
    if images.size:
        rows = (images[:, None] * per_image + np.arange(per_image)).reshape(-1)
        core = select_coreset(patches[rows], cfg, seed, groups=np.repeat(codes[images], per_image))
        chosen.append(rows[core.indices])
    return np.sort(np.concatenate(chosen))


def patch_bank(features: torch.Tensor, groups: np.ndarray, cfg: CoresetConfig, seed: int) -> np.ndarray:
    """Feature maps [N, D, h, w] with category keys [N] -> memory bank [M, D] (eq. 9), per category first.

    Rows are the coreset patches in their original order (image, then position), float32.
    """
    patches = flat_patches(features)
    return np.ascontiguousarray(patches[bank_rows(patches, features.shape[2] * features.shape[3], groups, cfg, seed)])


def image_keys(ids: Sequence[str], hashes: Sequence[str]) -> np.ndarray:
    """[N] 16-byte digests of (image id, content hash): an image's identity in :class:`BankSources`."""
    return np.array([hashlib.sha256(f"{i}\0{h}".encode()).digest()[:16] for i, h in zip(ids, hashes)], dtype="S16")


@dataclass(frozen=True)
class BankSources:
    """Where a model's bank rows come from, so that a warm start can keep them (``coreset.merge``).

    ``images`` [N]: the fitted images' identities (:func:`image_keys`: id and content, 16 bytes an
    image); ``categories`` [C] and ``category`` [N]: each one's category key; ``rows`` [M]: each
    LafitE bank row's patch (image * ``per_image`` + position) in that order; ``baseline_rows`` [M']:
    the same for PatchCore's bank (its own view's grid, ``baseline_per_image``).
    """

    images: np.ndarray
    categories: np.ndarray
    category: np.ndarray
    per_image: int
    rows: np.ndarray
    baseline_per_image: int = 0
    baseline_rows: np.ndarray | None = None

    @classmethod
    def of(cls, ids: Sequence[str], hashes: Sequence[str], groups: np.ndarray, per_image: int, rows: np.ndarray,
           baseline_per_image: int = 0, baseline_rows: np.ndarray | None = None) -> "BankSources":
        categories, category = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        return cls(image_keys(ids, hashes), categories, category.astype(np.int32), per_image, rows,
                   baseline_per_image, baseline_rows)

    @property
    def groups(self) -> np.ndarray:
        """[N] category key of each fitted image."""
        return self.categories[self.category]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {"images": self.images.astype("S16"), "categories": self.categories.astype(str),
                  "category": self.category.astype(np.int32), "per_image": np.int64(self.per_image),
                  "rows": self.rows.astype(np.int64), "baseline_per_image": np.int64(self.baseline_per_image)}
        if self.baseline_rows is not None:
            arrays["baseline_rows"] = self.baseline_rows.astype(np.int64)
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "BankSources":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["images"], z["categories"], z["category"], int(z["per_image"]), z["rows"],
                       int(z["baseline_per_image"]), z["baseline_rows"] if "baseline_rows" in z.files else None)


@dataclass(frozen=True)
class MergePlan:
    """What :func:`bank_rows` keeps and what it selects over, for one bank."""

    kept: np.ndarray  # patch rows of the current features kept from the parent
    images: np.ndarray  # image rows the coreset runs over (new images; every image of a rebuilt category)
    merged: tuple[str, ...]  # categories that kept the parent's rows
    rebuilt: dict[str, str]  # category -> why it was built anew


def merge_plan(parent: BankSources, parent_rows: np.ndarray, parent_per_image: int, ids: Sequence[str],
               hashes: Sequence[str], groups: np.ndarray, per_image: int) -> MergePlan:
    """Which parent bank rows a warm start keeps, and which images it selects a coreset over.

    Per category: when every image the parent fitted on is still fitted with the same content (the
    held-out split is per image, so adding images moves none), its rows stay (mapped to the current
    image rows) and the coreset runs over the category's new images only; otherwise (an image
    removed, changed or now held out; a category the parent did not have) the category is rebuilt.
    """
    if parent_per_image != per_image:
        raise ValueError(f"the parent's bank has {parent_per_image} patches an image, these features {per_image}")
    keys = image_keys(ids, hashes).tolist()
    current = {k: n for n, k in enumerate(keys)}
    parent_groups = parent.groups
    kept: list[np.ndarray] = []
    images: list[np.ndarray] = []
    merged: list[str] = []
    rebuilt: dict[str, str] = {}
    parent_image = parent_rows // per_image
    for g in sorted(set(groups.tolist())):
        members = np.flatnonzero(groups == g)
        own = np.flatnonzero(parent_groups == g)
        where = [current.get(k) for k in parent.images[own].tolist()]
        gone = sum(w is None or groups[w] != g for w in where)
        twice = members.size - len({keys[m] for m in members}) + own.size - len(set(parent.images[own].tolist()))
        if own.size == 0 or gone or twice:
            rebuilt[g] = ("the parent did not fit on it" if own.size == 0 else
                          f"{twice} images appear twice (the same id and content)" if twice else
                          f"{gone} of the parent's {own.size} images are no longer fitted on (removed, changed or "
                          f"held out)")
            images.append(members)
            continue
        to_current = np.full(parent.images.size, -1, dtype=np.int64)
        to_current[own] = where
        mine = np.isin(parent_image, own)
        kept.append(to_current[parent_image[mine]] * per_image + parent_rows[mine] % per_image)
        images.append(np.setdiff1d(members, to_current[own]))
        merged.append(g)
    empty = np.zeros(0, dtype=np.int64)
    return MergePlan(np.concatenate(kept) if kept else empty, np.concatenate(images) if images else empty,
                     tuple(merged), rebuilt)


def covering_radius(points: np.ndarray, centre_rows: np.ndarray, batch: int = 8192) -> float:
    """max over points [N, D] of the distance to the nearest of ``points[centre_rows]``."""
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    c = x[torch.from_numpy(centre_rows)]
    c_sq = (c * c).sum(1)
    worst = 0.0
    for s in range(0, x.shape[0], batch):
        d = squared_distances(x[s : s + batch], c, b_sq=c_sq)
        worst = max(worst, float(d.min(1).values.clamp_min(0).max()))
    return math.sqrt(worst)
