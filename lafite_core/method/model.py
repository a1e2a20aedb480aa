"""A trained LafitE model (statistics, U-Net, coreset, tau, K) and the scorer that runs it.

The model serialises to a set of named files (``to_files``/``from_files``) without pickle: the U-Net
as a torch state dict loaded with ``weights_only=True``, arrays as ``.npy``/``.npz``, the rest as
JSON. Where the files live, and how a version is published atomically, is the store's business.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from lafite_core.config import PipelineConfig, config_hash
from lafite_core.method.coreset import BankSources
from lafite_core.method.ddim import DDIMSampler
from lafite_core.method.editing import edit_features
from lafite_core.method.knn import Neighbours, ivf_centroids, ivf_lists, knn_for
from lafite_core.method.precision import in_precision, resolve_precision
from lafite_core.method.normalize import FeatureStats
from lafite_core.method.patchcore import patchcore_maps, patches
from lafite_core.method.schedule import cosine_schedule
from lafite_core.method.scoring import (
    METHODS,
    AnomalyMaps,
    Method,
    lafite_errors,
    nearest_distance_errors,
    standardize_positions,
    to_anomaly_maps,
)
from lafite_core.method.unet import UNet
from lafite_core.method.views import apply_view, native_grids

MODEL_FILES = ("unet.pt", "stats.npz", "bank.npy", "model.json")
BASELINE_BANK = "baseline_bank.npy"  # one more model file, with baseline.recipe "patchcore"
BANK_CENTROIDS = "bank_centroids.npy"  # one more, with scoring.knn "ivf": the inverted file's lists
BANK_SOURCES = "bank_sources.npz"  # which fitted image and position each bank row is (a warm start merges them)
POSITION_STATS = "position_stats.npy"  # one more, with scoring.position_norm: the normal errors' mean and std
OPTIONAL_MODEL_FILES = (BASELINE_BANK, BANK_CENTROIDS, BANK_SOURCES, POSITION_STATS)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class LafiteModel:
    """Everything scoring needs. ``bank`` [M, D] holds normalised coreset features.

    tau and K live in ``config.scoring`` and nowhere else: the search returns a new model with them
    set (:meth:`with_hyperparameters`), so the config a version records is the one it scores with.
    """

    config: PipelineConfig
    stats: FeatureStats
    unet: UNet
    bank: np.ndarray
    categories: tuple[str, ...]
    backbone: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    baseline_bank: np.ndarray | None = None  # [M', D'] raw PatchCore features (baseline.recipe "patchcore")
    # [L, D] k-means centroids of ``bank`` (scoring.knn "ivf"): computed once here when not given, saved
    # with the model, so every process that loads it builds the same inverted file
    bank_centroids: np.ndarray | None = None
    bank_sources: BankSources | None = None  # where the bank rows come from (for a warm start's merge)
    # [2, h, w] mean and std of LafitE's feature-level errors of held-out normal images at this model's tau,
    # K and DDIM steps (scoring.position_norm): fitted after the search (stages.select); when set, LafitE's
    # errors are standardised with them before the map and the image score
    position_stats: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.config.baseline.recipe == "patchcore" and self.baseline_bank is None:
            raise ValueError("baseline.recipe is patchcore: the model needs its PatchCore bank (baseline_bank)")
        sc = self.config.scoring
        if sc.knn == "ivf" and self.bank_centroids is None:
            lists = ivf_lists(self.bank.shape[0], sc.ivf_lists)
            object.__setattr__(self, "bank_centroids", ivf_centroids(self.bank, lists, self.config.seed))

    @property
    def tau(self) -> int:
        return self.config.scoring.tau

    @property
    def k(self) -> int:
        return self.config.scoring.k

    @property
    def channels(self) -> tuple[int, ...] | None:
        """Per-level channel counts of the stored features (from the backbone card), when known."""
        ch = self.backbone.get("channels")
        return tuple(int(c) for c in ch) if ch else None

    @property
    def grids(self) -> tuple[int, ...] | None:
        """Per-level native grid sides of the stored features (from the card's strides), when known."""
        return native_grids(self.backbone, self.config.data.image_size)

    @property
    def feature_dim(self) -> int:
        return int(self.bank.shape[1])

    def with_hyperparameters(self, tau: int, k: int, ddim_steps: int | None = None) -> "LafiteModel":
        """A copy scoring with ``tau``, ``k`` and ``ddim_steps`` (None: unchanged; same weights and
        bank); ``extra`` is copied. The copy has no position statistics: they were fitted at the old point."""
        scoring = {"tau": int(tau), "k": int(k)}
        if ddim_steps is not None:
            scoring["ddim_steps"] = int(ddim_steps)
        cfg = self.config.with_updates(scoring=scoring)
        extra = {**self.extra, "config_hash": config_hash(cfg)}
        return dataclasses.replace(self, config=cfg, extra=extra, position_stats=None)

    def to_files(self) -> dict[str, bytes]:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.unet.state_dict().items()}, buf)
        meta = {
            "config": json.loads(self.config.to_json()),
            "config_hash": config_hash(self.config),
            "tau": self.tau,
            "k": self.k,
            "categories": list(self.categories),
            "feature_dim": self.feature_dim,
            "feature_size": self.config.backbone.feature_size,
            "backbone": self.backbone,
            "extra": self.extra,
        }
        files = {
            "unet.pt": buf.getvalue(),
            "stats.npz": self.stats.to_bytes(),
            "bank.npy": _npy(self.bank),
            "model.json": json.dumps(meta, indent=2, sort_keys=True).encode(),
        }
        if self.baseline_bank is not None:
            files[BASELINE_BANK] = _npy(self.baseline_bank)
        if self.bank_centroids is not None:
            files[BANK_CENTROIDS] = _npy(self.bank_centroids)
        if self.bank_sources is not None:
            files[BANK_SOURCES] = self.bank_sources.to_bytes()
        if self.position_stats is not None:
            files[POSITION_STATS] = _npy(self.position_stats)
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes], device: str | torch.device = "cpu") -> "LafiteModel":
        missing = [name for name in MODEL_FILES if name not in files]
        if missing:
            raise ValueError(f"model is incomplete: missing {missing}")
        meta = json.loads(files["model.json"])
        if config_hash(meta["config"]) != meta["config_hash"]:
            raise ValueError("model.json: config does not match its recorded hash")
        config = PipelineConfig.model_validate(meta["config"])
        if config.baseline.recipe == "patchcore" and BASELINE_BANK not in files:
            raise ValueError(f"model is incomplete: missing ['{BASELINE_BANK}'] (baseline.recipe is patchcore)")
        if (config.scoring.tau, config.scoring.k) != (int(meta["tau"]), int(meta["k"])):
            # versions written before tau and K lived in the config recorded them beside it
            config = config.with_updates(scoring={"tau": int(meta["tau"]), "k": int(meta["k"])})
        unet = UNet(int(meta["feature_dim"]), int(meta["feature_size"]), config.diffusion)
        state = torch.load(io.BytesIO(files["unet.pt"]), map_location="cpu", weights_only=True)
        unet.load_state_dict(state)
        bank = np.load(io.BytesIO(files["bank.npy"]), allow_pickle=False)
        return cls(
            config=config,
            stats=FeatureStats.from_bytes(files["stats.npz"]),
            unet=unet.to(device).eval(),
            bank=bank,
            categories=tuple(meta["categories"]),
            backbone=meta.get("backbone", {}),
            extra=meta.get("extra", {}),
            baseline_bank=np.load(io.BytesIO(files[BASELINE_BANK]), allow_pickle=False)
            if BASELINE_BANK in files else None,
            bank_centroids=np.load(io.BytesIO(files[BANK_CENTROIDS]), allow_pickle=False)
            if BANK_CENTROIDS in files else None,
            bank_sources=BankSources.from_bytes(files[BANK_SOURCES]) if BANK_SOURCES in files else None,
            position_stats=np.load(io.BytesIO(files[POSITION_STATS]), allow_pickle=False)
            if POSITION_STATS in files else None,
        )


class Scorer:
    """Scores raw aggregated features [B, D, h, w] with one of the three methods."""

    def __init__(self, model: LafiteModel, device: str | torch.device | None = None) -> None:
        self.model = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.unet.to(self.device).eval()
        self.sampler = DDIMSampler(cosine_schedule(model.config.diffusion.timesteps), model.config.scoring.eta)
        self.precision = resolve_precision(model.config.compute.precision, self.device, "scoring with the U-Net")
        self.eps_model = in_precision(self.model.unet, self.device, self.precision)
        sc = model.config.scoring
        self.knn = knn_for(model.bank, self.device, model.bank_centroids if sc.knn == "ivf" else None,
                           sc.ivf_probes)
        self.baseline_knn = None if model.baseline_bank is None else knn_for(model.baseline_bank, self.device)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw stored features [B, D, h, w] -> LafitE's view, standardised [B, D', h, w]."""
        x = apply_view(raw.to(self.device, torch.float32), self.model.config.features, self.model.channels,
                       self.model.grids)
        return self.model.stats.apply(x)

    def errors(
        self, x0: torch.Tensor, method: Method, seeds: Sequence[int],
        tau: int | None = None, k: int | None = None, found: Neighbours | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Normalised features [B, D, h, w] -> feature-level errors [B, h, w].

        ``patchcore`` here is the ``shared`` recipe; PatchCore's own recipe scores raw features in
        :meth:`score`. ``found``: the patches' bank neighbours when already searched (:meth:`neighbours`).
        ``tau``, ``k``, ``steps`` (DDIM steps): overrides of the model's own, for the search.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if method == "patchcore" and self.model.config.baseline.recipe == "patchcore":
            raise ValueError("PatchCore's own recipe scores raw features: use Scorer.score")
        k = self.model.k if k is None else k
        tau = self.model.tau if tau is None else tau
        if method == "patchcore":
            if found is None:
                found = self.knn.search(patches(x0), 1)
            return nearest_distance_errors(x0, torch.from_numpy(np.ascontiguousarray(found.distances[:, 0])))
        editor = None
        if method == "lafite":
            editor = lambda x: edit_features(x, self.model.bank, self.knn, k, found)  # noqa: E731
        steps = self.model.config.scoring.ddim_steps if steps is None else steps
        return lafite_errors(x0, self.eps_model, self.sampler, tau, steps, seeds, editor)

    @torch.no_grad()
    def neighbours(self, raw: torch.Tensor, k: int) -> Neighbours:
        """The k nearest bank members of every patch of raw features [N, D, h, w] (LafitE's view),
        rows in the order image, then position: searched once, reusable for every K <= k."""
        sc = self.model.config.scoring
        parts = []
        for s in range(0, raw.shape[0], sc.batch_size):
            x0 = self.normalize(raw[s : s + sc.batch_size])
            parts.append(self.knn.search(patches(x0), k))
        return Neighbours(np.concatenate([p.distances for p in parts]), np.concatenate([p.indices for p in parts]))

    def _batches(self, raw: torch.Tensor, found: Neighbours | None):
        """(image slice, its rows of ``found`` or None) for every scoring batch of raw features [N, D, h, w]."""
        bs, per_image = self.model.config.scoring.batch_size, raw.shape[-2] * raw.shape[-1]
        if found is not None and found.indices.shape[0] != raw.shape[0] * per_image:
            raise ValueError(f"neighbours for {found.indices.shape[0]} patches given for {raw.shape[0] * per_image}")
        for s in range(0, raw.shape[0], bs):
            rows = slice(s * per_image, (s + bs) * per_image)
            yield slice(s, s + bs), None if found is None else Neighbours(found.distances[rows], found.indices[rows])

    @torch.no_grad()
    def feature_errors(self, raw: torch.Tensor, seeds: Sequence[int], found: Neighbours | None = None) -> torch.Tensor:
        """LafitE's feature-level errors [N, h, w] of raw features [N, D, h, w] at the model's tau, K and DDIM
        steps, batched, before any position statistics (what :func:`fit_position_stats` is fitted on)."""
        out = []
        for images, part in self._batches(raw, found):
            out.append(self.errors(self.normalize(raw[images]), "lafite", seeds[images], found=part).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, *raw.shape[-2:])

    @torch.no_grad()
    def score(
        self, raw: torch.Tensor, method: Method, seeds: Sequence[int],
        tau: int | None = None, k: int | None = None, found: Neighbours | None = None,
        steps: int | None = None,
    ) -> AnomalyMaps:
        """Raw features [N, D, h, w] -> AnomalyMaps ([N, S, S] maps, [N] scores), batched.

        ``found``: every patch's bank neighbours from :meth:`neighbours` (LafitE and the shared
        recipe), so that scoring the same features at several K searches the bank once. LafitE's errors
        are standardised with the model's position statistics when it has them.
        """
        sc = self.model.config.scoring
        maps, scores = [], []
        cfg = self.model.config
        if method == "lafite" and self.model.position_stats is not None and any(
                v is not None and v != own for v, own in ((tau, sc.tau), (k, sc.k), (steps, sc.ddim_steps))):
            raise ValueError(f"the model's position statistics were fitted at tau={sc.tau}, K={sc.k}, "
                             f"{sc.ddim_steps} DDIM steps; score another point with a copy from with_hyperparameters "
                             f"(it has none)")
        for images, part in self._batches(raw, found):
            if method == "patchcore" and cfg.baseline.recipe == "patchcore":
                # on the scorer's device, as LafitE's view is: the view and the map run there, the search
                # wherever the baseline's index lives
                out = patchcore_maps(raw[images].to(self.device, torch.float32),
                                     self.model.baseline_bank, self.baseline_knn, cfg.baseline, self.model.channels,
                                     self.model.grids, cfg.data.image_size, sc.smoothing_sigma)
            else:
                x0 = self.normalize(raw[images])
                err = self.errors(x0, method, seeds[images], tau, k, part, steps)
                if method == "lafite" and self.model.position_stats is not None:
                    err = standardize_positions(err, torch.from_numpy(self.model.position_stats))
                out = to_anomaly_maps(err, cfg.data.image_size, sc.smoothing_sigma, sc.image_pool)
            maps.append(out.maps.cpu())
            scores.append(out.scores.cpu())
        return AnomalyMaps(torch.cat(maps), torch.cat(scores))
