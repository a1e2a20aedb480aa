"""Aggregated features in Zarr v3: one group per dataset and category, one chunk per image.

Group ``features/<feature_key>/<dataset>/<category>`` holds the array ``features`` [N, D, h, w]
(float32, chunk (1, D, h, w)), the array ``entries`` (uint8: an append-only log of JSON lines
{id, url, content_hash, row}, chunks of 64 KiB) and attributes ``config_hash``, ``feature_key``,
``backbone``, ``feature_shape``, ``rows`` and ``entries_bytes`` (how many feature rows and log
bytes are committed). A later line for the same id repoints it (a changed image extracted again).
One writer at a time per category: two runs extracting the same category at once can leave a torn
log, which reading then refuses with the group's name (nothing locks a category).

Appending writes the new rows and log lines first and the two counters last: rows and lines past
them (left by a crash between the two) are invisible and overwritten by the next append. An append
costs the same however many images the category holds (the log is only appended to); groups written
before the log kept every entry in an ``image_ids`` attribute rewritten on each append (cost growing
with the category), and are moved to the log by their next append.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import zarr

from lafite_core.method.backbone import FeatureExtractor
from lafite_core.config import PipelineConfig, config_hash
from lafite_core.datapath.data import Sample, by_category
from lafite_core.datapath.features import LoadFailure, extract, load_many
from lafite_core.store import layout
from lafite_core.store.storage import Store

ARRAY = "features"
LOG = "entries"
LOG_CHUNK = 1 << 16  # bytes; Zarr writes whole chunks, so an append rewrites the last one or two (64-128 KiB)


def feature_key(cfg: PipelineConfig) -> str:
    """Hash of everything that determines raw features: backbone settings, input size and crop."""
    b = cfg.backbone
    payload = {"backbone": b.model_dump(mode="json"), "image_size": cfg.data.image_size}
    if cfg.data.center_crop != 1.0:  # keys of uncropped features stay what they were
        payload["center_crop"] = cfg.data.center_crop
    return "f" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class FeatureEntry:
    id: str
    url: str
    content_hash: str
    row: int = -1


class FeatureStore:
    """Read and append per-image features for one feature configuration."""

    def __init__(self, store: Store, cfg: PipelineConfig, backbone: dict | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.key = feature_key(cfg)
        self.backbone = backbone or {"name": cfg.backbone.name}

    def _url(self, dataset: str, category: str) -> str:
        return self.store.url(*layout.features(self.key, dataset, category))

    def _open(self, dataset: str, category: str, mode: str) -> zarr.Group:
        url = self._url(dataset, category)
        if self.store.local:
            return zarr.open_group(url, mode=mode)
        return zarr.open_group(url, mode=mode, storage_options=self.store.storage_options)

    def entries(self, dataset: str, category: str) -> dict[str, FeatureEntry]:
        """Committed entries by image id (empty when the group does not exist yet)."""
        return self.store.retry.call(self._entries, dataset, category,
                                     what=f"reading {self._url(dataset, category)}")

    def _entries(self, dataset: str, category: str) -> dict[str, FeatureEntry]:
        try:
            g = self._open(dataset, category, "r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return {}
        return _committed(g)

    def append(self, dataset: str, category: str, new: Sequence[FeatureEntry], features: np.ndarray) -> None:
        """Add rows for ``new`` ([B, D, h, w] features); an id already present is repointed.

        Safe to retry: a repeated append recomputes where the rows and lines go from the committed
        counters (``rows``, ``entries_bytes``).
        """
        self.store.retry.call(self._append, dataset, category, new, features,
                              what=f"writing {self._url(dataset, category)}")

    def _append(self, dataset: str, category: str, new: Sequence[FeatureEntry], features: np.ndarray) -> None:
        if len(new) != features.shape[0]:
            raise ValueError(f"{len(new)} entries for {features.shape[0]} feature rows")
        if not len(new):
            return
        g = self._open(dataset, category, "a")
        shape = tuple(int(s) for s in features.shape[1:])
        if ARRAY not in g:
            # float features barely compress; compression would only cost CPU on the data path
            arr = g.create_array(ARRAY, shape=(0, *shape), chunks=(1, *shape), dtype="float32", compressors=None)
        else:
            arr = g[ARRAY]
            if tuple(arr.shape[1:]) != shape:
                raise ValueError(f"{self._url(dataset, category)} holds features of shape {arr.shape[1:]}, "
                                 f"new ones have {shape}")
        attrs = g.attrs.asdict()
        lines = b""
        if "image_ids" in attrs:  # written before the log: its entries become the log's first lines
            legacy = [FeatureEntry(**e) for e in attrs.pop("image_ids")]
            start, logged = max((e.row for e in legacy), default=-1) + 1, 0
            lines = _lines(legacy)
        else:
            start, logged = int(attrs.get("rows", 0)), int(attrs.get("entries_bytes", 0))
        arr.resize((start + len(new), *shape))
        arr[start : start + len(new)] = np.asarray(features, dtype=np.float32)
        lines += _lines([FeatureEntry(e.id, e.url, e.content_hash, start + i) for i, e in enumerate(new)])
        log_arr = g[LOG] if LOG in g else g.create_array(LOG, shape=(0,), chunks=(LOG_CHUNK,), dtype="uint8",
                                                         compressors=None)
        log_arr.resize((logged + len(lines),))
        log_arr[logged:] = np.frombuffer(lines, dtype=np.uint8)
        attrs.update(
            {
                "config_hash": config_hash(self.cfg),
                "feature_key": self.key,
                "backbone": self.backbone,
                "feature_shape": list(shape),
                "rows": start + len(new),
                "entries_bytes": logged + len(lines),
            }
        )
        g.attrs.put(attrs)  # the commit: one write of the group's metadata

    def read(self, dataset: str, category: str, ids: Sequence[str] | None = None) -> tuple[np.ndarray, list[FeatureEntry]]:
        """Features [N, D, h, w] for ``ids`` (all committed entries when None), in the given order."""
        return self.store.retry.call(self._read, dataset, category, ids, what=f"reading {self._url(dataset, category)}")

    def _read(self, dataset: str, category: str, ids: Sequence[str] | None) -> tuple[np.ndarray, list[FeatureEntry]]:
        g = self._open(dataset, category, "r")
        by_id = _committed(g)
        if ids is None:
            chosen = sorted(by_id.values(), key=lambda e: e.row)
        else:
            absent = [i for i in ids if i not in by_id]
            if absent:
                raise KeyError(f"{self._url(dataset, category)} has no features for {absent[:3]}")
            chosen = [by_id[i] for i in ids]
        arr = g[ARRAY]
        rows = np.array([e.row for e in chosen], dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, *arr.shape[1:]), np.float32), []
        data = arr.get_orthogonal_selection((rows,)) if rows.size < arr.shape[0] else arr[:][rows]
        return np.asarray(data, dtype=np.float32), chosen


def _lines(entries: Sequence[FeatureEntry]) -> bytes:
    return b"".join(json.dumps(vars(e), separators=(",", ":")).encode() + b"\n" for e in entries)


def _committed(g: zarr.Group) -> dict[str, FeatureEntry]:
    """The group's committed entries by id: the log up to ``entries_bytes`` (a later line for an id
    repoints it), or the ``image_ids`` attribute of a group written before the log."""
    attrs = g.attrs.asdict()
    if "image_ids" in attrs:
        return {e["id"]: FeatureEntry(**e) for e in attrs["image_ids"]}
    n = int(attrs.get("entries_bytes", 0))
    if not n:
        return {}
    data = g[LOG][:n].tobytes()
    if len(data) != n or not data.endswith(b"\n"):
        raise ValueError(f"{g.store_path}: the entries log is torn ({len(data)} of {n} committed bytes, "
                         f"ending {data[-40:]!r}); two runs appended to this category at once. Delete the "
                         f"group to extract its features again")
    out: dict[str, FeatureEntry] = {}
    for line in data.splitlines():
        e = FeatureEntry(**json.loads(line))
        out[e.id] = e  # a repointed id keeps its place among the ids, as the attribute list had it
    return out


class MemoryFeatures:
    """The in-process twin of :class:`FeatureStore`: the same entries/append/read, held in memory.

    ``pipeline.fit`` extracts into one of these through the same :func:`extract_into` as the flows
    use with a Zarr store, so both paths see the same features in the same order.
    """

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.key = feature_key(cfg)
        self._rows: dict[tuple[str, str], dict[str, tuple[FeatureEntry, np.ndarray]]] = {}

    def entries(self, dataset: str, category: str) -> dict[str, FeatureEntry]:
        return {i: e for i, (e, _) in self._rows.get((dataset, category), {}).items()}

    def append(self, dataset: str, category: str, new: Sequence[FeatureEntry], features: np.ndarray) -> None:
        if len(new) != features.shape[0]:
            raise ValueError(f"{len(new)} entries for {features.shape[0]} feature rows")
        rows = self._rows.setdefault((dataset, category), {})
        for e, f in zip(new, features.astype(np.float32)):
            rows[e.id] = (e, f)

    def read(self, dataset: str, category: str, ids: Sequence[str] | None = None) -> tuple[np.ndarray, list[FeatureEntry]]:
        rows = self._rows.get((dataset, category), {})
        chosen = list(rows) if ids is None else list(ids)
        absent = [i for i in chosen if i not in rows]
        if absent:
            raise KeyError(f"no features in memory for {dataset}/{category} {absent[:3]}")
        if not chosen:
            return np.zeros((0,), np.float32), []
        return np.stack([rows[i][1] for i in chosen]), [rows[i][0] for i in chosen]


FeatureSink = FeatureStore | MemoryFeatures
"""Where extracted features go: the Zarr store (flows) or memory (``pipeline.fit``)."""


@dataclass(frozen=True)
class TrainingFeatures:
    """Raw features of the training images [N, D, h, w], their category keys [N] and entries [N]."""

    raw: np.ndarray
    groups: np.ndarray
    entries: list[FeatureEntry]


def read_training_features(sink: FeatureSink, samples: Sequence[Sample]) -> TrainingFeatures:
    """Features of ``samples`` that were extracted (unreadable ones are absent), grouped by category.

    Categories come in sorted order, images in the order of ``samples`` within each.
    """
    feats, groups, entries = [], [], []
    for (ds, cat), group in sorted(by_category(samples).items()):
        have = sink.entries(ds, cat)
        ids = [s.image_id for s in group if s.image_id in have]
        if not ids:
            continue
        f, e = sink.read(ds, cat, ids)
        feats.append(f)
        entries += e
        groups += [f"{ds}/{cat}"] * len(ids)
    if not feats:
        raise ValueError("no training features: every training image failed to load")
    return TrainingFeatures(np.concatenate(feats), np.array(groups), entries)


@dataclass(frozen=True)
class ExtractionReport:
    total: int
    extracted: int
    reused: int
    failures: tuple[tuple[str, str], ...]  # (url, error)


def extract_into(
    fstore: FeatureSink,
    samples: Sequence[Sample],
    extractor: FeatureExtractor,
    storage_options: dict | None = None,
    batch_size: int = 32,
    progress: Callable[[str, int, int], None] | None = None,
) -> ExtractionReport:
    """Extract features of ``samples`` into the store, computing only what is missing or changed.

    Files are read and decoded ahead on a thread pool and each batch is written to Zarr on a writer
    thread while the next batch runs through the backbone. Each batch is committed as it is
    written, so an interrupted run resumes where it stopped.
    """
    cfg = fstore.cfg
    by_cat = by_category(samples)
    extracted = reused = done = 0
    failures: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=1) as writer:
        writes: list[Future] = []
        for (ds, cat), group in by_cat.items():
            have = fstore.entries(ds, cat)
            pending: list[tuple[FeatureEntry, np.ndarray]] = []

            def flush() -> None:
                if pending:
                    feats = extract(extractor, [img for _, img in pending], batch_size)
                    if writes:
                        writes.pop().result()  # one write in flight; appends stay in order
                    writes.append(writer.submit(fstore.append, ds, cat, [e for e, _ in pending], feats))
                    pending.clear()

            for item in load_many(group, cfg.data.image_size, cfg.data.max_image_pixels, storage_options,
                                  crop=cfg.data.center_crop):
                done += 1
                if isinstance(item, LoadFailure):
                    failures.append((item.sample.url, item.error))
                    continue
                entry = FeatureEntry(item.sample.image_id, item.sample.url, item.content_hash)
                old = have.get(entry.id)
                if old is not None and old.content_hash == entry.content_hash:
                    reused += 1
                else:
                    pending.append((entry, item.image))
                    extracted += 1
                    if len(pending) >= batch_size:
                        flush()
                if progress:
                    progress("extract features", done, len(samples))
            flush()
        for w in writes:
            w.result()
    return ExtractionReport(len(samples), extracted, reused, tuple(failures))
