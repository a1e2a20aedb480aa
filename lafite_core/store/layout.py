"""Every path in the artefact store, built here and nowhere else.

Each function returns path components under the store root (``Store`` joins and checks them)::

    features/<feature_key>/<dataset>/<category>/      Zarr v3 group, array "features" [N, D, h, w]
                                                      chunked per image, array "entries" (a log of
                                                      JSON lines); attrs: config_hash, feature_key,
                                                      backbone, feature_shape, rows, entries_bytes
    checkpoints/<training_key>/train_state.pt         resumable U-Net training state
    runs/<run_id>/staged/<file>                       a training run's parts before publication
    models/<version>/<file>                           unet.pt, stats.npz, bank.npy, model.json,
                                                      search.parquet, calibration.json, config.json,
                                                      model_card.json, losses.pt, MANIFEST.json
                                                      (written last: the version exists only once
                                                      it does)
    runs/<run_id>/evidence/<dataset>/<category>.npz   an evaluation's per-image scores, pixel curves
                                                      and gallery picks, for its report
    tables/metrics/<run_id>.parquet                   per-category metrics of a run
    tables/summary/<run_id>.parquet                   means and inter-category std of a run
    tables/scores/<version>/<run_id>.parquet          batch-scoring results of a run
    tables/scores/<version>/parts/<run_id>/...        per-shard results, shard manifests
                                                      (manifests/shard-NNNNN.json) and heartbeat
                                                      while it runs
    tables/scores/<version>/merge.lock                held while a run merges its parts
    heatmaps/<version>/<run_id>/<relative path>.png   optional heat-map overlays
    reports/<run_id>/index.html, images/<name>.png    a run's report (evaluation or batch scoring)

The README's store table shows the same layout.
"""

from __future__ import annotations

import posixpath
from typing import Sequence

Parts = list[str]

MANIFEST = "MANIFEST.json"
CHECKPOINT_FILE = "train_state.pt"
LOSSES_FILE = "losses.pt"  # per-epoch training losses, float64 [E], staged by training, published with the model
REPORT_PAGE = "index.html"


def features(feature_key: str, dataset: str, category: str) -> Parts:
    return [*features_root(), feature_key, dataset, category]


def checkpoint(training_key: str) -> Parts:
    return ["checkpoints", training_key, CHECKPOINT_FILE]


def ray_train(training_key: str) -> Parts:
    """The folder Ray Train keeps a data-parallel training's checkpoints in (``train.workers`` > 1)."""
    return ["checkpoints", training_key, "ray_train"]


def staged(run_id: str, name: str) -> Parts:
    return ["runs", run_id, "staged", name]


def features_root() -> Parts:
    return ["features"]


def models() -> Parts:
    return ["models"]


def model_dir(version: str) -> Parts:
    return [*models(), version]


def model_file(version: str, name: str) -> Parts:
    return [*model_dir(version), name]


def evidence(run_id: str, dataset: str, category: str) -> Parts:
    """What an evaluation keeps of one category for its report (scores, curves, gallery picks)."""
    return ["runs", run_id, "evidence", dataset, f"{category}.npz"]


def metrics_tables() -> Parts:
    return ["tables", "metrics"]


def metrics_table(run_id: str) -> Parts:
    return [*metrics_tables(), f"{run_id}.parquet"]


def summary_table(run_id: str) -> Parts:
    return ["tables", "summary", f"{run_id}.parquet"]


def scores_root() -> Parts:
    return ["tables", "scores"]


def scores(version: str, *rest: str) -> Parts:
    """``tables/scores/<version>/...``: merged run tables, ``parts/<run_id>/...`` and the merge lock."""
    return [*scores_root(), version, *rest]


def heatmaps(version: str, run_id: str) -> Parts:
    """The folder of one batch-scoring run's overlays."""
    return ["heatmaps", version, run_id]


def heatmap(version: str, run_id: str, relative: Sequence[str]) -> Parts:
    """The overlay of the image at ``relative`` (path components below the scored source)."""
    return [*heatmaps(version, run_id), *relative[:-1], posixpath.splitext(relative[-1])[0] + ".png"]


def report(run_id: str, *rest: str) -> Parts:
    """``reports/<run_id>/...``: a run's report page and its images."""
    return ["reports", run_id, *rest]
