"""Every path in the artefact store, built here and nowhere else.

Each function returns path components under the store root (``Store`` joins and checks them)::

    features/<feature_key>/<dataset>/<category>/      Zarr v3 group, array "features" [N, D, h, w]
                                                      chunked per image; attrs: config_hash,
                                                      feature_key, backbone, feature_shape, image_ids
    checkpoints/<training_key>/train_state.pt         resumable U-Net training state
    runs/<run_id>/staged/<file>                       a training run's parts before publication
    models/<version>/<file>                           unet.pt, stats.npz, bank.npy, model.json,
                                                      search.parquet, calibration.json, config.json,
                                                      model_card.json, MANIFEST.json (written last:
                                                      the version exists only once it does)
    tables/metrics/<run_id>.parquet                   per-category metrics of a run
    tables/summary/<run_id>.parquet                   means and inter-category std of a run
    tables/scores/<version>/<run_id>.parquet          batch-scoring results of a run
    tables/scores/<version>/parts/<run_id>/...        per-shard results and heartbeat while it runs
    tables/scores/<version>/merge.lock                held while a run merges its parts
    heatmaps/<version>/<run_id>/<relative path>.png   optional heat-map overlays

The README's store table shows the same layout.
"""

from __future__ import annotations

import posixpath
from typing import Sequence

Parts = list[str]

MANIFEST = "MANIFEST.json"
CHECKPOINT_FILE = "train_state.pt"


def features(feature_key: str, dataset: str, category: str) -> Parts:
    return [*features_root(), feature_key, dataset, category]


def checkpoint(training_key: str) -> Parts:
    return ["checkpoints", training_key, CHECKPOINT_FILE]


def staged(run_id: str, name: str) -> Parts:
    return ["runs", run_id, "staged", name]


def features_root() -> Parts:
    return ["features"]


def models() -> Parts:
    return ["models"]


def model_file(version: str, name: str) -> Parts:
    return ["models", version, name]


def metrics_table(run_id: str) -> Parts:
    return ["tables", "metrics", f"{run_id}.parquet"]


def summary_table(run_id: str) -> Parts:
    return ["tables", "summary", f"{run_id}.parquet"]


def scores(version: str, *rest: str) -> Parts:
    """``tables/scores/<version>/...``: merged run tables, ``parts/<run_id>/...`` and the merge lock."""
    return ["tables", "scores", version, *rest]


def heatmaps(version: str, run_id: str) -> Parts:
    """The folder of one batch-scoring run's overlays."""
    return ["heatmaps", version, run_id]


def heatmap(version: str, run_id: str, relative: Sequence[str]) -> Parts:
    """The overlay of the image at ``relative`` (path components below the scored source)."""
    return [*heatmaps(version, run_id), *relative[:-1], posixpath.splitext(relative[-1])[0] + ".png"]
