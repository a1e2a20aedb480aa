"""U-Net training and coreset on a Ray worker: a GPU one when the cluster has a GPU, else the CPU, loudly.

Training reads its features from the Zarr store, checkpoints into ``checkpoints/<run_key>/`` and
resumes from there after a crash; the trained parts are staged under ``runs/<run_id>/staged/``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime as runtime
from lafite_core.config import PipelineConfig, config_hash
from lafite_core.data import Sample
from lafite_core.feature_store import FeatureStore
from lafite_core.pipeline import category_key, new_model, train_parts
from lafite_core.storage import Store
from lafite_core.train import load_state
from tasks.progress import LogProgress, run_logger, worker_logger

STAGED = "staged"


@dataclass(frozen=True)
class TrainRef:
    run_id: str
    run_key: str
    epochs: int
    final_loss: float
    bank_size: int
    device: str
    resumed_from_epoch: int
    train_images: int


def run_key(cfg: PipelineConfig, samples: list[tuple[str, str]]) -> str:
    """Identifies a training run by its config and its exact training images (id, content hash)."""
    h = hashlib.sha256(config_hash(cfg).encode())
    for image_id, content in sorted(samples):
        h.update(f"{image_id}\0{content}\n".encode())
    return "t" + h.hexdigest()[:16]


def read_training_features(fstore: FeatureStore, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, list]:
    """Features [N, D, h, w] and category keys [N] of ``samples`` that have committed features."""
    feats, groups, entries = [], [], []
    by_cat: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        by_cat.setdefault((s.dataset, s.category), []).append(s)
    for (ds, cat), group in sorted(by_cat.items()):
        have = fstore.entries(ds, cat)
        ids = [s.image_id for s in group if s.image_id in have]
        if not ids:
            continue
        f, e = fstore.read(ds, cat, ids)
        feats.append(f)
        entries += e
        groups += [category_key(group[0])] * len(ids)
    if not feats:
        raise ValueError("no training features in the store: every training image failed to load")
    return np.concatenate(feats), np.array(groups), entries


def train_body(store_url: str, config_json: str, samples: list[Sample], run_id: str, categories: list[str],
               backbone: dict, device: str | None) -> TrainRef:
    """Runs on the Ray worker (no Prefect context): train, checkpoint, stage the model parts."""
    log = worker_logger("lafite.train")
    runtime.use_assigned_cpus()
    cfg = PipelineConfig.from_json(config_json)
    store = Store(store_url)
    fstore = FeatureStore(store, cfg, backbone)
    raw, groups, entries = read_training_features(fstore, samples)
    key = run_key(cfg, [(e.id, e.content_hash) for e in entries])
    ckpt = ["checkpoints", key, "train_state.pt"]
    import torch

    from lafite_core.train import pick_device

    dev = pick_device(device)
    state = None
    if store.exists(*ckpt):
        state = load_state(store.read_bytes(*ckpt), raw.shape[1], raw.shape[2], cfg.diffusion, dev)
        log.info("resuming training from checkpoint %s at epoch %d/%d", store.url(*ckpt), state.epoch,
                 cfg.diffusion.epochs)
    resumed = state.epoch if state else 0
    parts = train_parts(
        raw, groups, cfg, str(dev), state=state,
        on_checkpoint=lambda st: store.write_bytes(ckpt, st.to_bytes(config_json)),
        progress=LogProgress(log, every_s=10),
    )
    model = new_model(parts, cfg, categories, backbone, len(entries))
    for name, data in model.to_files().items():
        store.write_bytes(["runs", run_id, STAGED, name], data)
    buf = io.BytesIO()
    torch.save(torch.tensor(parts.state.losses, dtype=torch.float64), buf)
    store.write_bytes(["runs", run_id, STAGED, "losses.pt"], buf.getvalue())
    return TrainRef(run_id, key, parts.state.epoch, float(parts.state.losses[-1]), int(parts.bank.shape[0]),
                    str(dev), resumed, len(entries))


@task(name="train-diffusion", cache_policy=NONE, retries=1, retry_delay_seconds=10)
def train_task(store_url: str, config_json: str, samples: list[Sample], run_id: str, categories: list[str],
               backbone: dict, device: str | None = None, ray_address: str | None = None) -> TrainRef:
    """Train on a Ray worker with a GPU when the cluster has one; otherwise on the CPU, with a warning."""
    import ray

    log = run_logger()
    runtime.ray_init(ray_address)
    gpus = runtime.ray_gpus()
    if gpus >= 1:
        options = {"num_gpus": 1, "num_cpus": 1}
        log.info("training on a GPU Ray worker")
    else:
        options = {"num_cpus": max(1, int(ray.cluster_resources().get("CPU", 1)))}
        device = device or "cpu"
        log.warning("no GPU in the Ray cluster: training the diffusion U-Net on the CPU "
                    "(slow for the `paper` profile; run a GPU worker for nightly retraining)")
    remote = ray.remote(**options)(train_body)
    ref = ray.get(remote.remote(store_url, config_json, samples, run_id, categories, backbone, device))
    if ref.resumed_from_epoch:
        log.info("training resumed from epoch %d", ref.resumed_from_epoch)
    log.info("trained %d epochs on %s (final loss %.4f); coreset of %d patches", ref.epochs, ref.device,
             ref.final_loss, ref.bank_size)
    return ref
