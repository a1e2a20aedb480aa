"""Training the epsilon U-Net on normalised training features (eq. 6), resumable from checkpoints.

AdamW (lr and weight decay from the config), lr x0.1 after ``lr_drop_at`` of the epochs, uniform
timesteps, MSE between true and predicted noise. Every epoch draws its shuffling, timesteps and noise
from a generator seeded by (seed, epoch), so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lafite_core.config import DiffusionConfig
from lafite_core.method.precision import Resolved, autocast
from lafite_core.method.schedule import add_noise, cosine_schedule
from lafite_core.method.unet import UNet

log = logging.getLogger(__name__)


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when present (or when asked); says loudly when training falls back to the CPU."""
    if prefer:
        if prefer.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {prefer!r} requested but CUDA is not available")
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    log.warning("CUDA is not available: training the diffusion U-Net on the CPU (slow; the `paper` "
                "profile needs a GPU worker)")
    return torch.device("cpu")


@dataclass
class TrainState:
    """Everything needed to continue training: weights, optimiser, lr schedule, epochs done."""

    unet: UNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0
    losses: list[float] = field(default_factory=list)

    def to_bytes(self, config_json: str) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "unet": self.unet.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch,
                "losses": torch.tensor(self.losses, dtype=torch.float64),
                "config": config_json,
            },
            buf,
        )
        return buf.getvalue()


class Shard(NamedTuple):
    """One data-parallel worker's part: rank of world, holding some of ``total`` training rows.

    Every rank runs the same number of steps per epoch (its rows reshuffled and cycled up to
    ceil(total / world), batches of ceil(batch_size / world)), so the global batch stays about
    ``batch_size`` and the step count that of one worker; gradients are averaged by the wrapper
    (DistributedDataParallel) the caller passes to :func:`train_unet`.
    """

    rank: int
    world: int
    total: int


def planned_epochs(cfg: DiffusionConfig, num_samples: int) -> int:
    """Whole epochs a run trains: ``cfg.epochs``, or fewer when ``cfg.max_steps`` is reached first.

    With a step budget the run ends after the epoch that reaches it (ceil(max_steps / steps per
    epoch) epochs), so the per-epoch random streams, and with them resuming, stay as they are.
    """
    if num_samples < 1:
        raise ValueError("no training samples")
    if cfg.max_steps is None:
        return cfg.epochs
    per_epoch = math.ceil(num_samples / cfg.batch_size)
    return max(1, min(cfg.epochs, math.ceil(cfg.max_steps / per_epoch)))


def new_state(in_channels: int, feature_size: int, cfg: DiffusionConfig, seed: int,
              device: torch.device, epochs: int | None = None) -> TrainState:
    """Fresh weights, AdamW and the lr drop at ``lr_drop_at`` of ``epochs`` (default ``cfg.epochs``)."""
    torch.manual_seed(seed)  # parameter initialisation is the one use of the global generator
    unet = UNet(in_channels, feature_size, cfg).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    drop = max(1, int(round(cfg.lr_drop_at * (epochs or cfg.epochs))))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[drop], gamma=0.1)
    return TrainState(unet, opt, sched)


def load_state(data: bytes, in_channels: int, feature_size: int, cfg: DiffusionConfig,
               device: torch.device) -> TrainState:
    """Restore a TrainState saved by ``to_bytes`` (loaded with weights_only=True)."""
    ckpt = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    state = new_state(in_channels, feature_size, cfg, 0, device)
    state.unet.load_state_dict(ckpt["unet"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.epoch = int(ckpt["epoch"])
    state.losses = [float(x) for x in ckpt["losses"]]
    return state


def train_unet(
    features: torch.Tensor,
    cfg: DiffusionConfig,
    seed: int,
    device: torch.device | None = None,
    state: TrainState | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    precision: Resolved = "fp32",
    initial: Mapping[str, torch.Tensor] | None = None,
    shard: Shard | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> TrainState:
    """Train (or continue training) on normalised features [N, D, S, S] for :func:`planned_epochs`.

    ``on_checkpoint`` is called every ``cfg.checkpoint_every`` epochs and after the last one;
    ``on_epoch(epoch, mean_loss)`` after every epoch (progress display). ``precision``: bf16 runs the
    U-Net's forward pass under autocast (fp32 weights, optimiser and loss). ``initial``: U-Net weights
    to start from instead of a fresh initialisation (a warm start; the optimiser state is fresh);
    ignored when ``state`` continues a run.

    ``shard``: this worker's part of a data-parallel run (``features`` are its rows only; epochs are
    planned from ``shard.total``; its streams are seeded by (seed, epoch, rank)); ``wrap`` wraps the
    U-Net for the forward and backward passes (DistributedDataParallel, which averages gradients).
    ``on_checkpoint`` is then called on every rank, the epoch losses are the mean over the ranks.
    """
    if features.ndim != 4 or features.shape[0] == 0:
        raise ValueError(f"need non-empty features [N, D, S, S], got {tuple(features.shape)}")
    device = device or pick_device()
    n, d, s, _ = features.shape
    epochs = planned_epochs(cfg, n if shard is None else shard.total)
    if state is None:
        state = new_state(d, s, cfg, seed, device, epochs)
        if initial is not None:
            state.unet.load_state_dict(initial)  # shapes were checked by the caller; strict all the same
    schedule = cosine_schedule(cfg.timesteps)
    ab = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32, device=device)
    data = features.to(device)
    net = state.unet if wrap is None else wrap(state.unet)
    batch = cfg.batch_size if shard is None else math.ceil(cfg.batch_size / shard.world)
    state.unet.train()
    for epoch in range(state.epoch, epochs):
        stream = seed * 1_000_003 + epoch
        if shard is not None:
            stream = stream * 1_009 + shard.rank
        g = torch.Generator().manual_seed(stream)
        # timesteps and noise are drawn where the model runs (no host-to-GPU copy of the noise)
        g_dev = torch.Generator(device=device).manual_seed(stream)
        order = torch.randperm(n, generator=g)
        if shard is not None:  # the same step count on every rank: its rows cycled to its share
            share = math.ceil(shard.total / shard.world)
            order = order.repeat(math.ceil(share / n))[:share]
        total, batches = 0.0, 0
        for start in range(0, order.numel(), batch):
            idx = order[start : start + batch]
            x0 = data[idx.to(device)]
            t = torch.randint(0, cfg.timesteps, (idx.numel(),), generator=g_dev, device=device)
            eps = torch.randn(x0.shape, generator=g_dev, device=device)
            x_t = add_noise(x0, eps, ab[t])  # eq. 3 / 8
            with autocast(device, precision):
                pred = net(x_t, t)
            loss = F.mse_loss(pred.float(), eps)  # eq. 6
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            total += loss.item()
            batches += 1
        mean_loss = total / batches
        if shard is not None and dist.is_available() and dist.is_initialized():
            summed = torch.tensor([mean_loss], dtype=torch.float64, device=device)
            dist.all_reduce(summed)
            mean_loss = float(summed.item()) / shard.world
        state.scheduler.step()
        state.epoch = epoch + 1
        state.losses.append(mean_loss)
        if not torch.isfinite(torch.tensor(state.losses[-1])):
            raise FloatingPointError(f"training loss became {state.losses[-1]} at epoch {epoch + 1}; "
                                     f"lower the learning rate")
        if on_epoch:
            on_epoch(state.epoch, state.losses[-1])
        if on_checkpoint and (state.epoch % cfg.checkpoint_every == 0 or state.epoch == epochs):
            on_checkpoint(state)
    state.unet.eval()
    return state
