"""U-Net training and coreset on a Ray worker: a GPU one when the cluster has a GPU, else the CPU, loudly.

Training reads its features from the Zarr store, checkpoints into ``checkpoints/<training key>/`` and
resumes from there after a crash; the untuned model is staged under ``runs/<run_id>/staged/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NONE

import tasks.ray_train as ray_train
import tasks.runtime as runtime
from lafite_core.method.views import view_dim
from lafite_core.store import layout
from lafite_core.config import PipelineConfig
from lafite_core.store.feature_store import FeatureStore, read_training_features
from lafite_core.store.losses import losses_bytes
from lafite_core.stages import TrainingPlan, train_model, training_key, training_summary
from lafite_core.store.storage import Store
from lafite_core.method.train import load_state, pick_device, planned_epochs
from lafite_core.method.precision import resolve_precision
from lafite_core.warm_start import choose_parent, load_warm_start, training_budget
from tasks.progress import LogProgress, QueuedProgress, both, relay_queue, run_logger, wait_relaying, worker_logger

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
    summary: dict  # the model card's account of training (stages.training_summary)
    parent_version: str | None = None  # the version it was fine-tuned from (None: from scratch)


def train_body(store_url: str, config_json: str, plan: TrainingPlan, run_id: str, backbone: dict,
               unreadable: list[tuple[str, str]], device: str | None, parent_version: str | None = None,
               progress_queue=None) -> TrainRef:
    """Runs on the Ray worker (no Prefect context): train, checkpoint, stage the untuned model.

    ``parent_version``: a compatible version to fine-tune (``warm_start.choose_parent``); a warm
    start checkpoints under its own training key, so it resumes apart from from-scratch runs.
    ``progress_queue``: a Ray queue that takes every epoch's progress for the driver's progress bar.
    """
    log = worker_logger("lafite.train")
    runtime.use_assigned_cpus()
    cfg = PipelineConfig.from_json(config_json)
    store = Store(store_url)
    features = read_training_features(FeatureStore(store, cfg, backbone), plan.fit)
    dev = pick_device(device)
    warm = None if parent_version is None else load_warm_start(store, parent_version)
    if cfg.train.workers > 1:
        trained, key = _train_data_parallel(store, cfg, config_json, plan, features, backbone, dev, warm,
                                            parent_version, progress_queue)
    else:
        key = training_key(cfg, [(e.id, e.content_hash) for e in features.entries],
                           resolve_precision(cfg.compute.precision, dev, "training the U-Net"), parent_version)
        ckpt = layout.checkpoint(key)
        budget = training_budget(cfg.diffusion, warm)
        state = None
        if store.exists(*ckpt):
            dim = view_dim(cfg.features, backbone["channels"]) if backbone.get("channels") else features.raw.shape[1]
            state = load_state(store.read_bytes(*ckpt), dim, features.raw.shape[2], budget, dev)  # LafitE's view
            log.info("resuming %s from checkpoint %s at epoch %d/%d",
                     "training" if warm is None else f"the warm start from {parent_version}", store.url(*ckpt),
                     state.epoch, planned_epochs(budget, features.raw.shape[0]))
        trained = train_model(
            features, cfg, plan.category_keys, backbone, str(dev), state=state,
            on_checkpoint=lambda st: store.write_bytes(ckpt, st.to_bytes(config_json)),
            progress=both(LogProgress(log, every_s=10), progress_queue and QueuedProgress(progress_queue)),
            warm_start=warm,
        )
    for name, data in trained.model.to_files().items():
        store.write_bytes(layout.staged(run_id, name), data)
    store.write_bytes(layout.staged(run_id, layout.LOSSES_FILE), losses_bytes(trained.losses))
    return TrainRef(run_id, key, trained.epochs, trained.final_loss, int(trained.model.bank.shape[0]),
                    trained.device, trained.resumed_from_epoch, len(features.entries),
                    training_summary(trained, unreadable, plan.skipped), trained.parent_version)


def _train_data_parallel(store: Store, cfg: PipelineConfig, config_json: str, plan: TrainingPlan,
                         features, backbone: dict, dev, warm, parent_version: str | None, progress_queue):
    """``train.workers`` Ray Train workers train the U-Net; statistics and coresets over all rows here."""
    use_gpu = ray_train.workers_with_gpus(cfg.train.workers)
    # the workers' device decides the precision (and with it the key), not this CPU-only driver's
    precision = (_gpu_precision(cfg.compute.precision) if use_gpu
                 else resolve_precision(cfg.compute.precision, dev, "training the U-Net"))
    key = training_key(cfg, [(e.id, e.content_hash) for e in features.entries], precision, parent_version)
    read = {e.id for e in features.entries}
    budget = training_budget(cfg.diffusion, warm)
    trainer = ray_train.RayTrainUNet(store, config_json, key, backbone, [s for s in plan.fit if s.image_id in read],
                                     cfg.train.workers, use_gpu, planned_epochs(budget, features.raw.shape[0]),
                                     progress_queue)

    def with_precision(job):
        return trainer(dataclasses.replace(job, precision=precision))

    trained = train_model(features, cfg, plan.category_keys, backbone, "cpu", warm_start=warm,
                          train_unet_with=with_precision)
    return dataclasses.replace(trained, device=f"{cfg.train.workers} x {'cuda' if use_gpu else 'cpu'} (Ray Train)",
                               precision=precision, resumed_from_epoch=trainer.resumed_from_epoch), key


def _gpu_precision(setting: str) -> str:
    """``compute.precision`` resolved on a GPU worker of the cluster."""
    import ray

    return ray.get(ray.remote(num_gpus=1, num_cpus=0)(resolve_precision).remote(setting, "cuda", "training the U-Net"))


@task(name="train-diffusion", cache_policy=NONE, retries=1, retry_delay_seconds=10)
def train_task(store_url: str, config_json: str, plan: TrainingPlan, run_id: str, backbone: dict,
               unreadable: list[tuple[str, str]], device: str | None = None,
               ray_address: str | None = None, parent_version: str | None = None) -> TrainRef:
    """Train on a Ray worker with a GPU when the cluster has one; otherwise on the CPU, with a warning.

    ``parent_version``: the compatible version to fine-tune (:func:`warm_start_task`), None from scratch.
    """
    import ray

    log = run_logger()
    runtime.ray_init(ray_address)
    gpus = runtime.ray_gpus()
    workers = PipelineConfig.from_json(config_json).train.workers
    if workers > 1:  # this task only reads, standardises and builds coresets; the workers take the CPUs/GPUs
        options = {"num_cpus": 0}
        device = "cpu"  # the driver's share: statistics and coresets on the CPU
        log.info("train.workers=%d: training the U-Net with Ray Train on %d %s workers (DDP over %s)", workers,
                 workers, "GPU" if gpus >= workers else "CPU", "NCCL" if gpus >= workers else "gloo")
    elif gpus >= 1:
        options = {"num_gpus": 1, "num_cpus": 1}
        log.info("training on a GPU Ray worker")
    else:
        options = {"num_cpus": max(1, int(ray.cluster_resources().get("CPU", 1)))}
        device = device or "cpu"
        log.warning("no GPU in the Ray cluster: training the diffusion U-Net on the CPU "
                    "(slow for the `paper` profile; run a GPU worker for nightly retraining)")
    remote = ray.remote(**options)(train_body)
    queue = relay_queue()  # the epochs on the terminal's progress bar, when there is one
    ref = wait_relaying(remote.remote(store_url, config_json, plan, run_id, backbone, unreadable, device,
                                      parent_version, queue), queue)
    if ref.resumed_from_epoch:
        log.info("training resumed from epoch %d", ref.resumed_from_epoch)
    log.info("trained %d epochs%s on %s (final loss %.4f); coreset of %d patches", ref.epochs,
             f" fine-tuning version {ref.parent_version}" if ref.parent_version else "", ref.device,
             ref.final_loss, ref.bank_size)
    return ref


@task(name="choose-warm-start", cache_policy=NONE)
def warm_start_task(store_url: str, config_json: str, choice: str) -> str | None:
    """"none", "latest" or a version -> the compatible version to fine-tune, or None (from scratch).

    Decided before extraction, in the run's log: an incompatible latest version is a warning, an
    incompatible or unknown named one fails the run at once.
    """
    return choose_parent(Store(store_url), choice, PipelineConfig.from_json(config_json), run_logger())
