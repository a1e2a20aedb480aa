"""The runs' Prefect artifacts: tables and markdown built from outcomes, and creation that never fails a run."""

from __future__ import annotations

import json
import logging
import re

import pytest

import tasks.artifacts as artifacts
from lafite_core.method.search import SearchPoint, SearchResult
from lafite_core.report.counts import BatchCounts, CategoryCounts
from tasks.artifacts import RunArtifacts, Settings, batch_artifacts, evaluate_artifacts, href, train_artifacts

KEY = re.compile(r"^[a-z0-9-]+$")  # what Prefect accepts as an artifact key
SETTINGS = Settings(tau=50, k=3, ddim_steps=2, threshold=0.123456)
TRAINING = {"trained_epochs": 8, "final_loss": 0.0123, "device": "cpu", "precision": "fp32", "train_images": 18,
            "unreadable_train_images": [{"url": "/d/bad.png", "error": "truncated"}], "skipped_categories": []}
SEARCH = SearchResult(50, 3, (SearchPoint("tau", 50, None, 2, 0.9, None, 1.26),
                              SearchPoint("tau", 200, None, 2, 0.8, None), SearchPoint("k", 50, 1, 2, 0.91, 0.7),
                              SearchPoint("k", 50, 3, 2, 0.954321, 0.8)), 2)


def _row(category: str, method: str, image: float, pixel: float | None, aupro: float | None) -> dict:
    return {"dataset": "demo", "category": category, "method": method, "image_auroc": image, "image_ap": 0.5,
            "pixel_auroc": pixel, "pixel_ap": None if pixel is None else 0.5, "aupro": aupro, "num_images": 10}


ROWS = [_row("washer", "lafite", 0.9, 0.95, 0.8), _row("washer", "patchcore", 1.0, 0.97, 0.9),
        _row("woven", "lafite", 0.8, 0.85, 0.6), _row("woven", "patchcore", 0.712345678, None, None)]
LOCAL_REPORT = "/tmp/the store/reports/eval-1/index.html"
LINKS = [("report", LOCAL_REPORT), ("metrics table", "s3://bucket/lafite/tables/metrics/eval-1.parquet"),
         ("model version v7", "/tmp/the store/models/v7")]


def _check(a: RunArtifacts) -> None:
    assert KEY.match(a.table_key) and KEY.match(a.markdown_key) and a.table_key != a.markdown_key
    assert json.loads(json.dumps(a.table)) == a.table  # Prefect sends the table as JSON


def test_evaluation_artifacts_hold_every_row_the_means_and_the_links():
    a = evaluate_artifacts("eval-1", "v7", ROWS, SETTINGS, LINKS)
    _check(a)
    assert a.table_key == artifacts.EVALUATE_METRICS_KEY and a.markdown_key == artifacts.EVALUATE_SUMMARY_KEY
    assert [(r["category"], r["method"]) for r in a.table] == [("demo/washer", "lafite"), ("demo/washer", "patchcore"),
                                                               ("demo/woven", "lafite"), ("demo/woven", "patchcore")]
    assert a.table[3] == {"category": "demo/woven", "method": "patchcore", "image_auroc": 0.7123,
                          "pixel_auroc": None, "aupro": None, "images": 10}
    md = a.markdown
    assert "`eval-1`" in md and "`v7`" in md and "Mean over 2 categories" in md
    assert "tau **50**, K **3**, DDIM steps **2**, threshold **0.1235**" in md
    # means in %: lafite (0.9 + 0.8) / 2, patchcore's pixel AUROC and AUPRO from the one category that has them
    assert "| lafite | 85.0 | 90.0 | 70.0 |" in md and "| patchcore | 85.6 | 97.0 | 90.0 |" in md
    assert f"- report: [`{LOCAL_REPORT}`](file:///tmp/the%20store/reports/eval-1/index.html)" in md
    assert "(s3://bucket/lafite/tables/metrics/eval-1.parquet)" in md


def test_training_artifacts_show_metrics_when_evaluated_else_the_search():
    evaluated = train_artifacts("train-1", "v7", SETTINGS, TRAINING, SEARCH, ROWS, LINKS)
    _check(evaluated)
    assert evaluated.table_key == artifacts.TRAIN_METRICS_KEY and len(evaluated.table) == len(ROWS)
    assert evaluated.markdown_key == artifacts.TRAIN_SUMMARY_KEY
    for part in ("`v7`", "chosen by the pseudo-validation search", "Trained 8 epochs on 18 images (cpu, fp32)",
                 "final loss 0.0123", "1 unreadable training image left out", "| lafite | 85.0 |", LOCAL_REPORT):
        assert part in evaluated.markdown, part

    searched = train_artifacts("train-1", "v7", SETTINGS, TRAINING, SEARCH, None, LINKS[2:])
    _check(searched)
    assert searched.table_key == artifacts.TRAIN_SEARCH_KEY and searched.markdown_key == artifacts.TRAIN_SUMMARY_KEY
    assert [(r["stage"], r["tau"], r["k"], r["chosen"]) for r in searched.table] == [
        ("tau", 50, None, True), ("tau", 200, None, False), ("k", 50, 1, False), ("k", 50, 3, True)]
    assert searched.table[0]["seconds"] == 1.3 and searched.table[3]["image_auroc"] == 0.9543
    assert "Not evaluated" in searched.markdown and "Mean over" not in searched.markdown

    config = train_artifacts("train-1", "v7", SETTINGS, TRAINING, SearchResult(50, 3, ()), None, LINKS[2:])
    assert config.table == [{"stage": "config", "tau": 50, "k": 3, "ddim_steps": 2, "image_auroc": None,
                             "pixel_auroc": None, "seconds": 0.0, "chosen": True, "images": None}]
    assert "from the config (search disabled)" in config.markdown


def test_batch_artifacts_count_per_category_and_name_missing_outputs():
    counts = BatchCounts("v7", listed=9, scored=6, skipped=2, errors=1)
    categories = [CategoryCounts("(no category folder)", errors=1),
                  CategoryCounts("demo/washer", scored=4, anomalous=1, normal=3, skipped=2),
                  CategoryCounts("demo/woven", scored=2, anomalous=2)]
    a = batch_artifacts("score-1", counts, categories, [("report", "/s/reports/score-1/index.html"),
                                                         ("score table", None)])
    _check(a)
    assert a.table_key == artifacts.BATCH_COUNTS_KEY and a.markdown_key == artifacts.BATCH_SUMMARY_KEY
    assert a.table[1] == {"category": "demo/washer", "scored": 4, "anomalous": 1, "normal": 3, "skipped": 2,
                          "errors": 0}
    for column in ("scored", "skipped", "errors"):
        assert sum(r[column] for r in a.table) == getattr(counts, column)
    md = a.markdown
    assert "`v7`" in md and "**9** images listed: **6** scored (**3** judged anomalous)" in md
    assert "**2** skipped as already scored, **1** failed" in md
    assert "- score table: none written" in md and "(file:///s/reports/score-1/index.html)" in md


@pytest.mark.parametrize(("url", "target"), [
    ("/a b/(1)/x.html", "file:///a%20b/%281%29/x.html"),
    ("s3://bucket/a b/x (1).parquet", "s3://bucket/a%20b/x%20%281%29.parquet"),
    ("s3://bucket/already%20quoted", "s3://bucket/already%20quoted"),
])
def test_link_targets_are_uris_without_spaces_or_brackets(url, target):
    assert href(url) == target


class _Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def __call__(self, data, key: str, description: str) -> None:
        if self.fail:
            raise RuntimeError("the Prefect API is down")
        self.calls.append((data, key, description))


def test_publish_creates_both_artifacts(monkeypatch):
    table, markdown = _Recorder(), _Recorder()
    monkeypatch.setattr(artifacts, "create_table_artifact", table)
    monkeypatch.setattr(artifacts, "create_markdown_artifact", markdown)
    built = evaluate_artifacts("eval-1", "v7", ROWS, SETTINGS, LINKS)
    artifacts.publish(lambda: built)
    assert table.calls == [(built.table, built.table_key, built.description)]
    assert markdown.calls == [(built.markdown, built.markdown_key, built.description)]


@pytest.mark.parametrize("failing", ["api", "build"])
def test_publish_only_warns_when_artifacts_cannot_be_made(monkeypatch, caplog, failing):
    monkeypatch.setattr(artifacts, "create_table_artifact", _Recorder(fail=failing == "api"))
    monkeypatch.setattr(artifacts, "create_markdown_artifact", _Recorder())

    def build() -> RunArtifacts:
        if failing == "build":
            raise KeyError("tau")
        return evaluate_artifacts("eval-1", "v7", ROWS, SETTINGS, LINKS)

    monkeypatch.setattr(artifacts, "run_logger", lambda: logging.getLogger("test-artifacts"))
    with caplog.at_level(logging.WARNING, logger="test-artifacts"):
        artifacts.publish(build)
    assert "could not create the run's Prefect artifacts" in caplog.text
    assert ("the Prefect API is down" if failing == "api" else "KeyError") in caplog.text


def test_settings_from_a_model_card():
    card = {"tau": 100, "k": 5, "ddim_steps": 3, "threshold": 0.5, "run_id": "train-1"}
    assert Settings.from_card(card) == Settings(100, 5, 3, 0.5)
    assert "DDIM steps **-**, threshold **-**" in Settings.from_card({"tau": 100, "k": 5}).line()
