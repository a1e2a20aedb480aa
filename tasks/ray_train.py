"""Data-parallel U-Net training with Ray Train (``train.workers`` > 1): DDP, NCCL on GPUs, gloo on CPUs.

The driver (:func:`tasks.training.train_body`) standardises all training features and builds the
coresets over all of them (``stages.train_model``); only the U-Net's steps run here, on
``workers`` Ray Train workers that each read their shard of the training images from the Zarr store.
Rank 0 reports checkpoints through Ray Train into ``checkpoints/<training key>/ray_train/`` in the
store; a rerun with the same key resumes from the latest of them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Sequence

import torch

import tasks.runtime as runtime
from lafite_core.config import PipelineConfig
from lafite_core.datapath.data import Sample
from lafite_core.method.train import Shard, TrainState, load_state, train_unet
from lafite_core.stages import UNetJob, training_view
from lafite_core.store import layout
from lafite_core.store.feature_store import FeatureStore, read_training_features
from lafite_core.store.storage import Store, fs_protocol
from tasks.progress import LogProgress, QueuedProgress, both, worker_logger

RUN_NAME = "unet"  # one Ray Train run per training key: rerunning it resumes from its checkpoints


def train_loop(config: dict) -> None:
    """One Ray Train worker: read this rank's shard, train with DDP, rank 0 reports checkpoints."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    log = worker_logger("lafite.train")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = PipelineConfig.from_json(config["config_json"])
    store = Store(config["store_url"])
    samples: list[Sample] = config["samples"][rank::world]
    shard = read_training_features(FeatureStore(store, cfg, config["backbone"]), samples)
    data = config["stats"].apply(training_view(shard.raw, cfg, config["backbone"]))
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    budget = config["budget"]
    state: TrainState | None = None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            with open(os.path.join(folder, layout.CHECKPOINT_FILE), "rb") as f:
                state = load_state(f.read(), data.shape[1], data.shape[2], budget, device)
        log.info("rank %d resuming data-parallel training at epoch %d", rank, state.epoch)
    reported = [False]

    def report(st: TrainState) -> None:
        metrics = {"epoch": st.epoch, "loss": st.losses[-1] if st.losses else float("nan"),
                   "resumed_from_epoch": 0 if resumed is None else int(resumed_epoch)}
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                with open(os.path.join(folder, layout.CHECKPOINT_FILE), "wb") as f:
                    f.write(st.to_bytes(config["config_json"]))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
        reported[0] = True

    resumed_epoch = 0 if state is None else state.epoch
    queue = config.get("progress_queue")
    progress = both(LogProgress(log, every_s=10), queue and QueuedProgress(queue)) if rank == 0 else None
    total_epochs = config["epochs"]
    state = train_unet(
        data, budget, config["seed"], device, state=state, on_checkpoint=report,
        on_epoch=(lambda e, loss: progress("train", e, total_epochs)) if progress else None,
        precision=config["precision"], initial=config["initial"],
        shard=Shard(rank, world, config["total"]), wrap=ray.train.torch.prepare_model,
    )
    if not reported[0]:  # resumed a finished run: report its final state again so the result has it
        report(state)


@dataclass
class RayTrainUNet:
    """``stages.train_model``'s ``train_unet_with`` for ``train.workers`` > 1 (a :class:`UNetJob` ->
    the trained state, loaded from the last checkpoint rank 0 reported)."""

    store: Store
    config_json: str
    training_key: str
    backbone: dict
    samples: Sequence[Sample]  # the training images whose features were read (each read by one worker)
    workers: int
    use_gpu: bool
    epochs: int
    progress_queue: object = None
    resumed_from_epoch: int = 0

    def __call__(self, job: UNetJob) -> TrainState:
        import pyarrow.fs
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        log = worker_logger("lafite.train")
        local = fs_protocol(self.store.fs) == "file"
        where = self.store.path(*layout.ray_train(self.training_key))
        run = RunConfig(name=RUN_NAME, storage_path=where,
                        storage_filesystem=None if local else pyarrow.fs.PyFileSystem(
                            pyarrow.fs.FSSpecHandler(self.store.fs)))
        backend = "nccl" if self.use_gpu else "gloo"
        log.info("training the U-Net data-parallel on %d Ray Train workers (%s, %s); checkpoints in %s",
                 self.workers, "GPUs" if self.use_gpu else "CPUs", backend, self.store.url(*layout.ray_train(
                     self.training_key)))
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "config_json": self.config_json, "store_url": self.store.root_url, "backbone": self.backbone,
                "samples": list(self.samples), "stats": job.stats, "budget": job.budget, "seed": job.seed,
                "precision": job.precision, "initial": None if job.initial is None else dict(job.initial),
                "total": int(job.features.shape[0]), "use_gpu": self.use_gpu, "epochs": self.epochs,
                "progress_queue": self.progress_queue,
            },
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(num_workers=self.workers, use_gpu=self.use_gpu),
            run_config=run,
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"data-parallel training ended without a checkpoint in {where}")
        self.resumed_from_epoch = int((result.metrics or {}).get("resumed_from_epoch", 0))
        with result.checkpoint.as_directory() as folder:
            with open(os.path.join(folder, layout.CHECKPOINT_FILE), "rb") as f:
                return load_state(f.read(), job.features.shape[1], job.features.shape[2], job.budget,
                                  torch.device("cpu"))


def workers_with_gpus(workers: int) -> bool:
    """Whether the Ray cluster has a GPU for each of ``workers`` (else they train on CPUs, gloo)."""
    return runtime.ray_gpus() >= workers
