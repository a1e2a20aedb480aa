"""Flow parameters: one pydantic model per flow, shown as the deployment's parameter schema."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lafite_core.config import PipelineConfig, Profile, load_profile
from lafite_core.datapath.layouts import DataLayout
from lafite_core.method.scoring import METHODS, Method


def default_store() -> str:
    """LAFITE_STORE, else ./lafite-store (a local folder)."""
    return os.environ.get("LAFITE_STORE", os.path.abspath("lafite-store"))


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str = Field(default_factory=default_store, description="artefact store: folder or s3://bucket/prefix")
    ray_address: str | None = Field(None, description="existing Ray cluster; default starts a local one")
    run_id: str | None = Field(None, description="defaults to a fresh timestamped id")


class TrainParams(_Params):
    data_root: str = Field(..., description="dataset root: folder or s3:// prefix (MVTec AD, VisA or folder layout)")
    layout: DataLayout = Field(
        default_factory=DataLayout, description='layout of data_root, e.g. {"format": "visa"}; default detected'
    )
    categories: list[str] | None = Field(None, description="category names (or dataset/category); default all")
    profile: Profile = "cpu"
    overrides: dict[str, Any] = Field(
        default_factory=dict, description='nested config updates, e.g. {"diffusion": {"epochs": 50}}'
    )
    seed: int = 0
    evaluate: bool = Field(True, description="evaluate on the labelled test sets after training")
    device: str | None = Field(None, description="training device; default CUDA when present")
    warm_start: str = Field(
        "none", min_length=1,
        description='"latest": fine-tune the latest version\'s U-Net when its features and U-Net shape match this '
                    'config (else from scratch, with a warning); a version name: that one (an error if it does not '
                    'match); "none": from scratch. Fine-tuning trains diffusion.warm_start_fraction of the budget',
    )

    def config(self) -> PipelineConfig:
        cfg = load_profile(self.profile)
        updates = {**self.overrides, "seed": self.seed}
        return cfg.with_updates(**updates)


class EvaluateParams(_Params):
    data_root: str
    layout: DataLayout = Field(default_factory=DataLayout, description="layout of data_root; default detected")
    categories: list[str] | None = None
    model_version: str | None = Field(None, description="default: the latest complete version")
    methods: list[Method] = Field(default_factory=lambda: list(METHODS))
    seed: int | None = Field(None, description="recorded seed; defaults to the model's")


class ScoreParams(_Params):
    source: str = Field(..., description="folder or s3:// prefix of images (png, jpg, bmp, tiff)")
    model_version: str | None = None
    shard_size: int = Field(64, ge=1, description="images per Ray task")
    heatmaps: bool = Field(False, description="write heat-map overlays as PNG")
    method: Method = "lafite"
    stale_after_s: float = Field(
        900.0, ge=0, description="parts of a run silent this long are from a crashed run and are adopted"
    )
