"""A run's Prefect artifacts: a table and a markdown summary with the key numbers and links to its outputs.

They put "how did it go" on the run's page in the Prefect UI. The builders are pure (a run's outcome
in, a :class:`RunArtifacts` out); :func:`publish` creates the two artifacts and only warns when it
cannot: by then the run's real outputs are in the store. Each flow has fixed keys, so the latest
run's artifacts are found under ``lafite-<flow>-...`` on the Artifacts page.
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass
from typing import Callable, Sequence
from urllib.parse import quote

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lafite_core.method.search import SearchResult
from lafite_core.report.counts import BatchCounts, CategoryCounts
from lafite_core.report.page import pct
from lafite_core.store.tables import search_table, summarize_metrics
from tasks.progress import run_logger

TRAIN_METRICS_KEY = "lafite-train-metrics"  # when the training run evaluated its model
TRAIN_SEARCH_KEY = "lafite-train-search"  # when it did not: the pseudo-validation search
TRAIN_SUMMARY_KEY = "lafite-train-summary"
EVALUATE_METRICS_KEY = "lafite-evaluate-metrics"
EVALUATE_SUMMARY_KEY = "lafite-evaluate-summary"
BATCH_COUNTS_KEY = "lafite-batch-score-counts"
BATCH_SUMMARY_KEY = "lafite-batch-score-summary"

DIGITS = 4  # metrics in the tables are fractions in [0, 1], rounded to this many decimals

Links = Sequence[tuple[str, str | None]]  # (label, URL or local path); None: the output does not exist


@dataclass(frozen=True)
class Settings:
    """What a model version runs with: noise step tau, neighbours K, DDIM steps and the image threshold."""

    tau: int
    k: int
    ddim_steps: int | None
    threshold: float | None

    @classmethod
    def from_card(cls, card: dict) -> Settings:
        """From a version's ``model_card.json``."""
        return cls(card["tau"], card["k"], card.get("ddim_steps"), card.get("threshold"))

    def line(self) -> str:
        steps = "-" if self.ddim_steps is None else self.ddim_steps
        threshold = "-" if self.threshold is None else f"{self.threshold:.4g}"
        return f"tau **{self.tau}**, K **{self.k}**, DDIM steps **{steps}**, threshold **{threshold}**"


@dataclass(frozen=True)
class RunArtifacts:
    """One run's table (rows of JSON values) and markdown, each under its key."""

    table_key: str
    table: list[dict]
    markdown_key: str
    markdown: str
    description: str


def href(url: str) -> str:
    """A link target for ``url``: a local absolute path becomes a ``file://`` URI; spaces and brackets are escaped."""
    if "://" not in url and posixpath.isabs(url):
        return "file://" + quote(url)
    return quote(url, safe=":/@!$&'*+,;=~%?#")


def link_lines(links: Links) -> list[str]:
    """Markdown list items ``- label: [url](target)``; outputs that do not exist are named as such."""
    return [f"- {label}: [`{url}`]({href(url)})" if url else f"- {label}: none written" for label, url in links]


def _fraction(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)


def metric_rows(rows: Sequence[dict]) -> list[dict]:
    """Per category and method (METRICS_SCHEMA rows): image AUROC, pixel AUROC and AUPRO, as fractions."""
    return [{"category": f"{r['dataset']}/{r['category']}", "method": r["method"],
             "image_auroc": _fraction(r["image_auroc"]), "pixel_auroc": _fraction(r["pixel_auroc"]),
             "aupro": _fraction(r["aupro"]), "images": int(r["num_images"])} for r in rows]


def search_rows(search: SearchResult, settings: Settings) -> list[dict]:
    """Every pseudo-validation search point (SEARCH_SCHEMA); one ``config`` row when the search was disabled."""
    rows = search_table(search).to_pylist()
    if not rows:
        return [{"stage": "config", "tau": settings.tau, "k": settings.k, "ddim_steps": settings.ddim_steps,
                 "image_auroc": None, "pixel_auroc": None, "seconds": 0.0, "chosen": True, "images": None}]
    return [{**r, "image_auroc": _fraction(r["image_auroc"]), "pixel_auroc": _fraction(r["pixel_auroc"]),
             "seconds": round(r["seconds"], 1)} for r in rows]


def count_rows(categories: Sequence[CategoryCounts]) -> list[dict]:
    """A batch run's counts per category: scored, anomalous, normal, skipped (already scored), errors."""
    return [asdict(c) for c in categories]


def means_table(rows: Sequence[dict]) -> list[str]:
    """Markdown table of each method's mean image AUROC, pixel AUROC and AUPRO (%) over all categories."""
    means = {(s.method, s.metric): s.mean for s in summarize_metrics(rows) if s.dataset == "all"}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    n = len({(r["dataset"], r["category"]) for r in rows})
    return [f"Mean over {n} categor{'y' if n == 1 else 'ies'} (%):", "",
            "| method | image AUROC | pixel AUROC | AUPRO |", "|---|---:|---:|---:|",
            *[f"| {m} | " + " | ".join(pct(means.get((m, c))) for c in ("image_auroc", "pixel_auroc", "aupro")) + " |"
              for m in methods]]


def evaluate_artifacts(run_id: str, version: str, rows: Sequence[dict], settings: Settings,
                       links: Links) -> RunArtifacts:
    """An evaluation's metrics per category and method, and its means, settings and links."""
    md = [f"# Evaluation `{run_id}`", "", f"Model version `{version}`: {settings.line()}.", "",
          *means_table(rows), "", *link_lines(links)]
    return RunArtifacts(EVALUATE_METRICS_KEY, metric_rows(rows), EVALUATE_SUMMARY_KEY, "\n".join(md) + "\n",
                        f"metrics of model {version}, evaluation {run_id}")


def _training_line(training: dict) -> str:
    """The model card's account of training (stages.training_summary) in one sentence."""
    loss = training.get("final_loss")
    line = (f"Trained {training.get('trained_epochs', '-')} epochs on {training.get('train_images', '-')} images "
            f"({training.get('device', '-')}, {training.get('precision', '-')}), final loss "
            f"{'-' if loss is None else f'{loss:.4g}'}")
    unreadable = len(training.get("unreadable_train_images", []))
    if unreadable:
        line += f"; {unreadable} unreadable training image{'' if unreadable == 1 else 's'} left out"
    skipped = training.get("skipped_categories", [])
    if skipped:
        line += f"; categories skipped (no normal images): {', '.join(skipped)}"
    return line + "."


def train_artifacts(run_id: str, version: str, settings: Settings, training: dict, search: SearchResult,
                    rows: Sequence[dict] | None, links: Links) -> RunArtifacts:
    """A training run's metrics (``rows``, when it evaluated) or else its search, and its key numbers and links."""
    chosen = "chosen by the pseudo-validation search" if search.points else "from the config (search disabled)"
    md = [f"# Training `{run_id}`", "", f"Published model version `{version}`: {settings.line()} ({chosen}).", "",
          _training_line(training), ""]
    md += [*means_table(rows), ""] if rows else ["Not evaluated (no labelled test images, or evaluation off).", ""]
    md += link_lines(links)
    if rows:
        key, table = TRAIN_METRICS_KEY, metric_rows(rows)
    else:
        key, table = TRAIN_SEARCH_KEY, search_rows(search, settings)
    return RunArtifacts(key, table, TRAIN_SUMMARY_KEY, "\n".join(md) + "\n", f"model {version}, training {run_id}")


def batch_artifacts(run_id: str, counts: BatchCounts, categories: Sequence[CategoryCounts],
                    links: Links) -> RunArtifacts:
    """A batch-scoring run's counts per category, and its totals and links."""
    anomalous = sum(c.anomalous for c in categories)
    totals = (f"**{counts.listed}** images listed: **{counts.scored}** scored (**{anomalous}** judged anomalous), "
              f"**{counts.skipped}** skipped as already scored, **{counts.errors}** failed.")
    md = [f"# Batch scoring `{run_id}`", "", f"Model version `{counts.model_version}`.", "", totals, "",
          *link_lines(links)]
    return RunArtifacts(BATCH_COUNTS_KEY, count_rows(categories), BATCH_SUMMARY_KEY, "\n".join(md) + "\n",
                        f"counts of batch scoring {run_id} with model {counts.model_version}")


def publish(build: Callable[[], RunArtifacts]) -> None:
    """Build the run's artifacts and create them in Prefect; any failure is a warning, never the run's failure."""
    try:
        a = build()
        create_table_artifact(a.table, key=a.table_key, description=a.description)
        create_markdown_artifact(a.markdown, key=a.markdown_key, description=a.description)
    except Exception as exc:  # the run's outputs are written; a missing summary must not fail it
        run_logger().warning("could not create the run's Prefect artifacts (its outputs are written): %s: %s",
                             type(exc).__name__, exc)
