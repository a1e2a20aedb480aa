"""Result tables (Parquet schemas) and the summaries computed from them.

Metrics are fractions in [0, 1]; pixel columns are null where a category has no masks.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from lafite_core.method.metrics import mean_std_over_seeds, summarize
from lafite_core.method.search import SearchResult

METRIC_COLUMNS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")

METRICS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_version", pa.string()),
        ("dataset", pa.string()),
        ("category", pa.string()),
        ("method", pa.string()),
        *[(c, pa.float64()) for c in METRIC_COLUMNS],
        ("num_images", pa.int64()),
        ("num_failed", pa.int64()),
        ("seed", pa.int64()),
        ("config_hash", pa.string()),
        ("created", pa.timestamp("us", tz="UTC")),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_version", pa.string()),
        ("dataset", pa.string()),  # "all" for the mean over every category
        ("method", pa.string()),
        ("metric", pa.string()),
        ("mean", pa.float64()),
        ("inter_category_std", pa.float64()),
        ("num_categories", pa.int64()),
        ("created", pa.timestamp("us", tz="UTC")),
    ]
)

SCORES_SCHEMA = pa.schema(
    [
        ("image_url", pa.string()),
        ("content_hash", pa.string()),
        ("category", pa.string()),
        ("raw_score", pa.float64()),
        ("normalized_score", pa.float64()),
        ("decision", pa.string()),  # "anomalous" | "normal" | null on error
        ("model_version", pa.string()),
        ("method", pa.string()),
        ("run_id", pa.string()),
        ("heatmap_url", pa.string()),
        ("error", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        # the listing's "<size>:<ETag>" or "<size>:<mtime_ns>" when scored (lafite_core.datapath.listing):
        # a rerun whose listing shows the same signature skips the image without reading it; null in
        # tables written before it existed and for images listed without one
        ("listing_signature", pa.string()),
    ]
)
SCORES_ROW_GROUP = 16_384  # rows per Parquet row group of a merged score table (sorted by URL): the
#                           unit a streamed lookup reads (lafite_core.store.lookup)

SEARCH_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("tau", pa.int64()),
        ("k", pa.int64()),
        ("ddim_steps", pa.int64()),
        ("image_auroc", pa.float64()),
        ("pixel_auroc", pa.float64()),
        ("seconds", pa.float64()),  # wall time of the point (0 for a step count reused from the K stage)
        ("chosen", pa.bool_()),
        ("images", pa.int64()),  # pseudo-validation images the point was scored on (search.images_per_category)
    ]
)


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None, row_group_size: int | None = None) -> bytes:
    """A table as Parquet bytes; ``metadata`` goes into the schema metadata (config JSON, hash);
    ``row_group_size`` rows per row group (default: pyarrow's)."""
    if metadata:
        merged = {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}}
        table = table.replace_schema_metadata(merged)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def metrics_table(rows: Sequence[dict]) -> pa.Table:
    """Rows with the METRICS_SCHEMA columns -> table (missing pixel metrics become null)."""
    return pa.Table.from_pylist(list(rows), schema=METRICS_SCHEMA)


def scores_table(rows: Sequence[dict]) -> pa.Table:
    """Rows with SCORES_SCHEMA columns -> table (a missing column, e.g. ``listing_signature``, is null)."""
    return pa.Table.from_pylist(list(rows), schema=SCORES_SCHEMA)


def conform_scores(table: pa.Table) -> pa.Table:
    """A score table read back, in SCORES_SCHEMA: columns added since it was written are null."""
    missing = [f for f in SCORES_SCHEMA if f.name not in table.column_names]
    for f in missing:
        table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(SCORES_SCHEMA.names).cast(SCORES_SCHEMA)


def search_table(result: SearchResult) -> pa.Table:
    rows = [
        {"stage": p.stage, "tau": p.tau, "k": p.k, "ddim_steps": p.ddim_steps, "image_auroc": p.image_auroc,
         "pixel_auroc": p.pixel_auroc, "seconds": p.seconds, "chosen": result.chosen(p),
         "images": result.images}
        for p in result.points
    ]
    return pa.Table.from_pylist(rows, schema=SEARCH_SCHEMA)


@dataclass(frozen=True)
class SummaryRow:
    dataset: str
    method: str
    metric: str
    mean: float | None
    inter_category_std: float | None
    num_categories: int


def summarize_metrics(rows: Iterable[dict]) -> list[SummaryRow]:
    """Mean and inter-category std (ddof=0) of every metric, per dataset and over all categories."""
    rows = list(rows)
    out: list[SummaryRow] = []
    datasets = sorted({r["dataset"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ds in [*datasets, "all"]:
        for method in methods:
            sel = [r for r in rows if r["method"] == method and (ds == "all" or r["dataset"] == ds)]
            if not sel:
                continue
            for metric in METRIC_COLUMNS:
                s = summarize([r[metric] for r in sel])
                out.append(SummaryRow(ds, method, metric, s.mean, s.std, s.n))
    return out


def seed_summary(rows: Iterable[dict], metric: str) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(dataset, category, method) -> (mean, sample std, number of seeds) of ``metric`` over seeds."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r[metric] is not None:
            groups.setdefault((r["dataset"], r["category"], r["method"]), []).append(r[metric])
    out = {}
    for key, values in groups.items():
        s = mean_std_over_seeds(values)
        out[key] = (s.mean, s.std, s.n)
    return out


def format_table(rows: Sequence[dict], methods: Sequence[str]) -> str:
    """Plain-text per-category table: image / pixel AUROC, AUPRO per method, then the mean."""
    def pct(v: float | None) -> str:
        return "  -  " if v is None else f"{100 * v:5.1f}"

    cats = list(dict.fromkeys((r["dataset"], r["category"]) for r in rows))
    head = f"{'category':28s}" + "".join(f" | {m:^23s}" for m in methods)
    sub = f"{'':28s}" + "".join(f" | {'img':>5s} {'pix':>5s} {'aupro':>5s}    " for _ in methods)
    lines = [head, sub, "-" * len(head)]
    by = {(r["dataset"], r["category"], r["method"]): r for r in rows}
    for ds, cat in cats:
        cells = []
        for m in methods:
            r = by.get((ds, cat, m))
            cells.append(" | " + (" ".join(pct(r[c]) for c in ("image_auroc", "pixel_auroc", "aupro")) + "    "
                                  if r else " " * 23))
        lines.append(f"{ds + '/' + cat:28.28s}" + "".join(cells))
    summary = {(s.method, s.metric): s for s in summarize_metrics(rows) if s.dataset == "all"}
    cells = []
    for m in methods:
        cells.append(" | " + " ".join(pct(summary[(m, c)].mean) if (m, c) in summary else "  -  "
                                      for c in ("image_auroc", "pixel_auroc", "aupro")) + "    ")
    lines.append("-" * len(head))
    lines.append(f"{'mean':28s}" + "".join(cells))
    return "\n".join(lines)
