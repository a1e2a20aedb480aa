"""Warm start: fine-tune an earlier model version's U-Net instead of training one from scratch.

A parent version can start a run when its U-Net sees the same inputs and has the same shape
(:func:`incompatibility`): the same raw features (the feature key: backbone settings and image size),
the same view of them (``features``: levels and local averaging) and the same network and noise
schedule (:data:`UNET_SHAPE` of ``diffusion``). The run then trains ``diffusion.warm_start_fraction``
of the budget (:func:`training_budget`) over all current training features, with the current
config's optimiser settings and a fresh optimiser state (a version keeps the weights, not the
optimiser). Statistics, search and calibration run as from scratch; the coresets keep the parent's
rows of categories whose fitted images are all still fitted and select over the new images only
(``coreset.merge``; ``stages.lafite_bank``, ``stages.baseline_bank``).

    choose_parent     "latest" | VERSION | "none" -> a compatible parent version, or None
    load_warm_start   a parent version -> its U-Net weights, config and bank sources (verified
                      against the manifest)
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from lafite_core.config import DiffusionConfig, PipelineConfig
from lafite_core.method.coreset import BankSources
from lafite_core.method.model import BANK_SOURCES
from lafite_core.store import layout
from lafite_core.store.feature_store import feature_key
from lafite_core.store.storage import Store

log = logging.getLogger(__name__)

LATEST = "latest"
NONE = "none"
UNET_SHAPE = ("timesteps", "base_channels", "channel_mult", "num_res_blocks", "attention_resolutions")
"""The diffusion fields a U-Net's weights depend on (shapes, and what a timestep means)."""


@dataclass(frozen=True)
class WarmStart:
    """A compatible parent version, its U-Net state dict (tensors on the CPU) and, for merging its
    coresets (``coreset.merge``), its config and where its bank rows come from (None for versions
    written before they recorded it)."""

    parent_version: str
    weights: dict[str, torch.Tensor]
    config: PipelineConfig | None = None
    sources: BankSources | None = None


def _differences(prefix: str, a: dict[str, Any], b: dict[str, Any], fields: tuple[str, ...] | None = None) -> list[str]:
    """'prefix.field parent -> current' for every field (of ``fields``, default all) that differs."""
    return [f"{prefix}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in (fields or sorted({*a, *b})) if a.get(k) != b.get(k)]


def incompatibility(parent: PipelineConfig, cfg: PipelineConfig) -> str | None:
    """Why a U-Net trained under ``parent`` cannot start training under ``cfg``; None when it can."""
    reasons = []
    if feature_key(parent) != feature_key(cfg):
        diff = _differences("backbone", parent.backbone.model_dump(mode="json"), cfg.backbone.model_dump(mode="json"))
        diff += _differences("data", parent.data.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
                             ("image_size", "center_crop"))
        reasons.append(f"other features (feature key {feature_key(parent)} -> {feature_key(cfg)}: {', '.join(diff)})")
    if parent.features != cfg.features:
        diff = _differences("features", parent.features.model_dump(mode="json"), cfg.features.model_dump(mode="json"))
        reasons.append(f"another view of the features ({', '.join(diff)})")
    diff = _differences("diffusion", parent.diffusion.model_dump(mode="json"), cfg.diffusion.model_dump(mode="json"),
                        UNET_SHAPE)
    if diff:
        reasons.append(f"another U-Net shape ({', '.join(diff)})")
    return "; ".join(reasons) or None


def training_budget(cfg: DiffusionConfig, warm_start: WarmStart | None) -> DiffusionConfig:
    """The settings a run trains with: ``cfg`` from scratch; warm-started, ``warm_start_fraction`` of
    its ``epochs`` and ``max_steps`` (rounded up, at least 1), so the lr drop and checkpoints follow
    the shorter run."""
    if warm_start is None:
        return cfg
    f = cfg.warm_start_fraction
    return cfg.model_copy(update={
        "epochs": max(1, math.ceil(f * cfg.epochs)),
        "max_steps": None if cfg.max_steps is None else max(1, math.ceil(f * cfg.max_steps)),
    })


def parent_config(store: Store, version: str) -> PipelineConfig:
    """The config a version was trained with (from its verified model.json)."""
    meta = json.loads(store.load_model_file(version, "model.json"))
    return PipelineConfig.model_validate(meta["config"])


def choose_parent(store: Store, choice: str, cfg: PipelineConfig, logger: logging.Logger | logging.LoggerAdapter = log) -> str | None:
    """The version a run warm-starts from, or None to train from scratch.

    ``choice``: "none"; "latest" (the latest complete version when it is compatible; when there is
    none, an INFO line, when it is incompatible a WARNING with the reason, and None either way); or
    a version name, which must be complete and compatible (ValueError with the reason otherwise).
    """
    if choice == NONE:
        return None
    if choice == LATEST:
        versions = store.list_versions()
        if not versions:
            logger.info("warm start: no earlier model version in %s; training from scratch", store.root_url)
            return None
        version = versions[-1].version
    else:
        version = choice
        if version not in {v.version for v in store.list_versions()}:
            raise ValueError(f"--warm-start {version}: no complete model version of that name in {store.root_url} "
                             f"(`lafite versions` lists them; or use --warm-start latest or none)")
    try:
        reason = incompatibility(parent_config(store, version), cfg)
    except (ValidationError, KeyError) as exc:
        reason = f"its config cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if reason is None:
        logger.info("warm start from model version %s: fine-tuning its U-Net for %.0f%% of the training budget",
                    version, 100 * cfg.diffusion.warm_start_fraction)
        return version
    if choice == LATEST:
        logger.warning("warm start: the latest version %s does not fit this config (%s); training from scratch",
                       version, reason)
        return None
    raise ValueError(f"--warm-start {version}: that version does not fit this config: {reason}; train from "
                     f"scratch (--warm-start none) or use the config it was trained with")


def load_warm_start(store: Store, version: str) -> WarmStart:
    """A version's U-Net weights (loaded with weights_only=True), config and bank sources, each
    verified against its manifest."""
    data = store.load_model_file(version, "unet.pt")
    weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    listed = store.read_json(*layout.model_file(version, layout.MANIFEST))["files"]
    sources = BankSources.from_bytes(store.load_model_file(version, BANK_SOURCES)) if BANK_SOURCES in listed else None
    return WarmStart(version, dict(weights), parent_config(store, version), sources)


def warm_start_from(store: Store, choice: str, cfg: PipelineConfig, logger: logging.Logger | logging.LoggerAdapter = log) -> WarmStart | None:
    """:func:`choose_parent` then :func:`load_warm_start`: what ``pipeline.fit`` takes."""
    version = choose_parent(store, choice, cfg, logger)
    return None if version is None else load_warm_start(store, version)
