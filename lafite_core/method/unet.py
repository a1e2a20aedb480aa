"""Epsilon-prediction U-Net over feature maps (section 3.2), after guided-diffusion's design.

Residual blocks take the timestep embedding; optional self-attention at chosen resolutions; skip
connections between the down and up paths; the last layer of each residual branch and the output
convolution start at zero, so the untrained network predicts eps = 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lafite_core.config import DiffusionConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps. t: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with at most 32 groups of at least 4 channels each."""
    groups = max(g for g in range(1, 33) if channels % g == 0 and (channels // g >= 4 or g == 1))
    return nn.GroupNorm(groups, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block; the timestep embedding scales and shifts the normalised activations
    (guided-diffusion's scale-shift norm), so normalisation cannot cancel it."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.out_norm = _norm(out_ch)
        self.out_layers = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1)),
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        if channels % heads:
            heads = 1
        self.heads = heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class _Step(nn.ModuleList):
    """A sequence of blocks that each may take the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class UNet(nn.Module):
    """eps_theta(x_t, t): [B, C, S, S], [B] -> [B, C, S, S], S divisible by 2**(levels-1)."""

    def __init__(self, in_channels: int, feature_size: int, cfg: DiffusionConfig) -> None:
        super().__init__()
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.in_channels = in_channels
        self.base_channels = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [ch]
        cur, res = ch, feature_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = _Step([ResBlock(cur, ch * mult, emb_dim, cfg.dropout)])
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    blocks.append(AttentionBlock(cur))
                self.down.append(blocks)
                skip_channels.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(_Step([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skip_channels.append(cur)
                res //= 2

        self.middle = _Step(
            [ResBlock(cur, cur, emb_dim, cfg.dropout), AttentionBlock(cur), ResBlock(cur, cur, emb_dim, cfg.dropout)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = _Step([ResBlock(cur + skip_channels.pop(), ch * mult, emb_dim, cfg.dropout)])
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    blocks.append(AttentionBlock(cur))
                if level and i == cfg.num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(cur, cur, 3, padding=1))
                    res *= 2
                self.up.append(blocks)
        assert not skip_channels, "every skip connection must be consumed"

        self.out = nn.Sequential(_norm(cur), nn.SiLU(), _zero(nn.Conv2d(cur, in_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.base_channels))
        h = self.input_conv(x)
        skips = [h]
        for step in self.down:
            h = step(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for step in self.up:
            h = step(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
