"""Run reports: the evidence an evaluation keeps, the evaluation and batch-scoring report builders, the
``lafite report`` command on an evaluated store, and the page as headless Chromium renders it."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lafite_core.datapath.data import Category, LoadedSample, Sample
from lafite_core.method.calibration import Calibration, Cut
from lafite_core.report import batch, evaluation
from lafite_core.report.counts import COUNT_FIELDS, NO_CATEGORY, CategoryCounts, add_counts, count_by_category
from lafite_core.report.evidence import CategoryEvidence, collect, pick_gallery
from lafite_core.report.target import ReportTarget, find_target
from lafite_core.stages import CategoryScores
from lafite_core.store import layout
from lafite_core.store.storage import Store
from lafite_core.store.tables import METRIC_COLUMNS, scores_table

S = 32  # model input side of the synthetic category
WIDE = (96, 48)  # (width, height) of its image files: the gallery must keep 2:1


class _Images(HTMLParser):
    """Every <img>'s attributes and every element id of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: bytes) -> _Images:
    p = _Images()
    p.feed(page.decode())
    return p


def _scored_category(folder: Path, seed: int = 0) -> CategoryScores:
    """4 normal and 5 anomalous images (files 96x48, model input 32x32) with two methods' scores and maps.

    Normal 3 outscores anomaly 4 (a false alarm above a miss), so every gallery role has members.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    loaded = []
    scores = {"lafite": np.array([0.10, 0.20, 0.15, 0.70, 0.90, 0.80, 0.85, 0.95, 0.30]),
              "patchcore": np.array([0.20, 0.10, 0.30, 0.40, 0.60, 0.90, 0.70, 0.80, 0.50])}
    maps = {m: rng.random((9, S, S)).astype(np.float32) * 0.2 for m in scores}
    for i in range(9):
        label = int(i >= 4)
        path = folder / f"img{i}.png"
        pixels = rng.integers(0, 255, (WIDE[1], WIDE[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        mask = np.zeros((S, S), bool)
        if label:
            mask[8:16, 8 + i:16 + i] = True
            for m in maps:
                maps[m][i][mask] += scores[m][i]
        sample = Sample(str(path), "synthetic", "widget", "test", "scratch" if label else "good",
                        mask_url=str(path) if label else None)
        image = np.asarray(Image.fromarray(pixels).resize((S, S)))
        loaded.append(LoadedSample(sample, image, mask, f"hash{i}", WIDE))
    category = Category("synthetic", "widget", str(folder), (), tuple(s.sample for s in loaded))
    return CategoryScores(category, loaded, scores, maps)


def _calibration() -> Calibration:
    cut = Cut(threshold=0.5, normal_median=0.15, balanced_accuracy=0.9, num_normal=4, num_anomalous=4)
    return Calibration(cut, {"synthetic/widget": cut})


def _metric_rows(run_id: str, version: str) -> list[dict]:
    now = datetime.now(timezone.utc)
    return [{"run_id": run_id, "model_version": version, "dataset": "synthetic", "category": "widget",
             "method": m, **{c: 0.5 + 0.1 * i for i, c in enumerate(METRIC_COLUMNS)}, "num_images": 9,
             "num_failed": 0, "seed": 0, "config_hash": "abc", "created": now} for m in ("lafite", "patchcore")]


SEARCH = [
    {"stage": "tau", "tau": 50, "k": None, "ddim_steps": 2, "image_auroc": 0.8, "pixel_auroc": 0.7,
     "seconds": 1.0, "chosen": False},
    {"stage": "tau", "tau": 200, "k": None, "ddim_steps": 2, "image_auroc": 0.9, "pixel_auroc": 0.8,
     "seconds": 1.0, "chosen": True},
    {"stage": "k", "tau": 200, "k": 1, "ddim_steps": 2, "image_auroc": 0.92, "pixel_auroc": 0.8,
     "seconds": 1.0, "chosen": False},
    {"stage": "k", "tau": 200, "k": 3, "ddim_steps": 2, "image_auroc": 0.95, "pixel_auroc": 0.85,
     "seconds": 1.0, "chosen": True},
    {"stage": "steps", "tau": 200, "k": 3, "ddim_steps": 1, "image_auroc": 0.95, "pixel_auroc": 0.85,
     "seconds": 0.5, "chosen": True},
]
CARD = {"run_id": "train-1", "tau": 200, "k": 3, "ddim_steps": 1, "threshold": 0.5, "config_hash": "abc",
        "trained_epochs": 8, "backbone": {"name": "lite0"}}


def _check_page(files: dict[str, bytes]) -> _Images:
    """The page references exactly the images written beside it, each embedded byte for byte as a PNG."""
    page = _parse(files[layout.REPORT_PAGE])
    assert page.images
    for img in page.images:
        src, kept = img["src"], img["data-file"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        png = base64.b64decode(src.split(",", 1)[1])
        assert png == files[kept] and png.startswith(b"\x89PNG")
        assert Image.open(io.BytesIO(png)).size[0] > 0
    assert {i["data-file"] for i in page.images} == {p for p in files if p.startswith("images/")}
    assert not re.search(rb'(src|href)="(?!data:)', files[layout.REPORT_PAGE])  # nothing outside the page
    return page


def test_gallery_picks_top_anomalies_false_alarms_and_misses_without_overlap():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.95, 0.5])
    assert pick_gallery(labels, scores, 2) == [(5, "top_anomaly"), (3, "top_anomaly"), (1, "false_alarm"),
                                               (2, "false_alarm"), (4, "miss"), (6, "miss")]
    # with few anomalies the misses are what is left after the top ones
    assert pick_gallery(labels, scores, 3) == [(5, "top_anomaly"), (3, "top_anomaly"), (6, "top_anomaly"),
                                               (1, "false_alarm"), (2, "false_alarm"), (0, "false_alarm"),
                                               (4, "miss")]
    assert pick_gallery(labels, scores, 0) == []


def test_evidence_keeps_scores_curves_and_gallery_through_its_file(tmp_path):
    cs = _scored_category(tmp_path / "img")
    ev = collect(cs, "lafite", per_role=2, curve_points=16)
    back = CategoryEvidence.from_bytes(ev.to_bytes())
    assert back.key == "synthetic/widget" and back.gallery_method == "lafite"
    np.testing.assert_array_equal(back.labels, [0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert list(back.urls) == [s.sample.url for s in cs.loaded]
    assert back.original_sizes.tolist() == [list(WIDE)] * 9
    for m in ("lafite", "patchcore"):
        np.testing.assert_array_equal(back.scores[m], cs.scores[m])
        roc, pr = back.pixel_roc[m], back.pixel_pr[m]
        assert 2 <= len(roc.x) <= 16 and (roc.x[0], roc.y[0], roc.x[-1], roc.y[-1]) == (0, 0, 1, 1)
        assert np.all(np.diff(roc.x) >= 0) and np.all(np.diff(roc.y) >= 0)
        assert 2 <= len(pr.x) <= 16 and pr.x[-1] == 0 and pr.y[-1] == 1
    assert [(g.index, g.role) for g in back.gallery] == [(7, "top_anomaly"), (4, "top_anomaly"),
                                                         (3, "false_alarm"), (1, "false_alarm"),
                                                         (8, "miss"), (5, "miss")]
    for g, h in zip(back.gallery, ev.gallery):
        np.testing.assert_array_equal(g.image, h.image)
        np.testing.assert_allclose(g.amap, h.amap, rtol=1e-3, atol=1e-6)  # float16 on file: for display
        np.testing.assert_array_equal(g.mask, h.mask)


def test_evaluation_report_has_every_section_and_shows_images_at_their_aspect_ratio(tmp_path):
    cs = _scored_category(tmp_path / "img")
    ev = collect(cs, "lafite")
    originals = {u: evaluation.read_display_image(u) for u in ev.urls[:4]}  # the rest: the model's input
    assert all(o.shape == (WIDE[1], WIDE[0], 3) for o in originals.values())
    inp = evaluation.EvaluationInputs("eval-1", "v1", _metric_rows("eval-1", "v1"), CARD, _calibration(), SEARCH,
                                      np.linspace(1.0, 0.1, 8), [ev], originals)
    files = evaluation.build(inp)
    page = _check_page(files)
    text = " ".join(page.text)
    for heading in ("model and chosen settings", "metrics (%)", "category synthetic/widget", "gallery",
                    "highest-scoring anomalies", "false alarms", "misses", "pseudo-validation search",
                    "training loss", "mean (all)"):
        assert heading in text, heading
    for fact in ("tau (noise step)", "K (neighbours)", "DDIM steps", "threshold"):
        assert fact in text
    names = {i["data-file"] for i in page.images}
    assert {"images/c0_curves.png", "images/c0_hist.png", "images/search.png", "images/loss.png"} <= names
    gallery = [i for i in page.images if "_g" in i["data-file"]]
    # 3 top anomalies, 3 false alarms, 2 misses (the 5 anomalies less the top 3), each image | heat map | mask
    assert len(gallery) == 3 * 8
    for img in gallery:
        w, h = Image.open(io.BytesIO(files[img["data-file"]])).size
        assert w == 2 * h, (img["data-file"], w, h)  # 96x48 files, whether read or stretched back
    assert "original unreadable" in text  # the images not in ``originals`` say so

    # a run without evidence or search still gives a page, saying what is missing
    bare = evaluation.build(evaluation.EvaluationInputs("eval-2", "v1", _metric_rows("eval-2", "v1"), CARD, None,
                                                        [], None, []))
    text = " ".join(_parse(bare[layout.REPORT_PAGE]).text)
    assert "no per-image scores were kept" in text and "search was disabled" in text and "no loss curve" in text


def _batch_rows(tmp_path: Path, run_id: str) -> list[dict]:
    now = datetime.now(timezone.utc)
    cs = _scored_category(tmp_path / "dump")
    rows = []
    for i, s in enumerate(cs.loaded):
        heat = tmp_path / "heat" / f"img{i}.png"
        heat.parent.mkdir(exist_ok=True)
        Image.fromarray(s.image).save(heat)
        raw = float(cs.scores["lafite"][i])
        rows.append({"image_url": s.sample.url, "content_hash": s.content_hash, "category": "synthetic/widget",
                     "raw_score": raw, "normalized_score": (raw - 0.15) / 0.35,
                     "decision": "anomalous" if raw >= 0.5 else "normal", "model_version": "v1", "method": "lafite",
                     "run_id": run_id, "heatmap_url": str(heat), "error": None, "scored_at": now})
    rows.append({**rows[0], "image_url": "/dump/broken.png", "category": None, "raw_score": None,
                 "normalized_score": None, "decision": None, "heatmap_url": None,
                 "error": "ImageDecodeError: /dump/broken.png: not an image"})
    return rows


def test_batch_report_shows_counts_histograms_top_images_and_errors(tmp_path):
    store = Store(str(tmp_path / "store"))
    run_id = "score-1"
    store.write_table(layout.scores("v1", f"{run_id}.parquet"), scores_table(_batch_rows(tmp_path, run_id)))
    counts = batch.BatchCounts("v1", listed=12, scored=9, skipped=2, errors=1)
    url = batch.write(store, "v1", run_id, counts)
    assert url == store.url(*layout.report(run_id, layout.REPORT_PAGE)) and Path(url).is_file()
    folder = Path(url).parent
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert json.loads(files[batch.RUN_FILE]) == {"model_version": "v1", "listed": 12, "scored": 9, "skipped": 2,
                                                 "errors": 1}
    page = _check_page(files)
    text = " ".join(page.text)
    for part in ("counts", "scores per category", "most anomalous images", "errors", "skipped (already scored)",
                 "not an image", "/dump/broken.png"):
        assert part in text, part
    top = [i["data-file"] for i in page.images if i["data-file"].startswith("images/top")]
    assert len(top) == 2 * batch.TOP_N  # image and heat map of each of the top 8 of the 9 scored
    for name in top:
        w, h = Image.open(io.BytesIO(files[name])).size
        assert w == 2 * h
    first = next(i for i in page.images if i["data-file"] == "images/top0_0_image.png")
    assert first["alt"] == "image of img7.png"  # the highest score first

    # `lafite report` finds batch runs by their recorded counts, and by their table alone
    assert store.exists(*layout.report(run_id, batch.RUN_FILE))
    assert find_target(store, run_id) == ReportTarget("batch", run_id, "v1")
    store.delete(*layout.report(run_id), recursive=True)
    assert find_target(store, run_id).kind == "batch"
    with pytest.raises(ValueError, match="neither a run .* nor a model version"):
        find_target(store, "no-such-run")


def test_batch_counts_per_category_add_up_across_shards():
    def row(category, decision, error=None):
        return {"category": category, "decision": decision, "error": error}

    shard1 = count_by_category([row("d/a", "anomalous"), row("d/a", "normal"), row(None, None, "ValueError: x"),
                                row("d/b", None)], skipped=["d/a", None])
    assert shard1 == [CategoryCounts(NO_CATEGORY, skipped=1, errors=1),
                      CategoryCounts("d/a", scored=2, anomalous=1, normal=1, skipped=1),
                      CategoryCounts("d/b", scored=1)]  # uncalibrated: scored, neither anomalous nor normal
    shard2 = count_by_category([row("d/b", "anomalous")], skipped=["d/c"])
    total = add_counts([shard1, shard2])
    assert [c.category for c in total] == [NO_CATEGORY, "d/a", "d/b", "d/c"]
    assert total[2] == CategoryCounts("d/b", scored=2, anomalous=1)
    for name in COUNT_FIELDS:
        assert sum(getattr(c, name) for c in total) == sum(getattr(c, name) for c in [*shard1, *shard2])


# On a trained store: the flows write the reports, `lafite report` rewrites them, Chromium renders them


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained_store, small_demo, prefect_harness):
    """A copy of the trained store, evaluated on the small demo set and batch-scored with heat maps."""
    import ray

    from flows.batch_score import batch_score_flow
    from flows.evaluate import evaluate_flow
    from flows.params import EvaluateParams, ScoreParams

    root = tmp_path_factory.mktemp("reported")
    store = str(root / "store")
    shutil.copytree(trained_store, store)
    ev = evaluate_flow(EvaluateParams(data_root=str(small_demo.root), store=store, run_id="eval-report"))
    dump = root / "dump"
    for img in sorted(Path(small_demo.root).glob("*/*/test/*/*.png"))[:6]:
        (dump / img.parts[-4]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img, dump / img.parts[-4] / f"{img.parts[-2]}_{img.name}")
    (dump / "broken.png").write_bytes(b"not an image")
    sc = batch_score_flow(ScoreParams(source=str(dump), store=store, heatmaps=True, run_id="score-report"))
    ray.shutdown()
    return store, ev, sc


def _run_artifacts(run_id: str, summary_key: str) -> dict:
    """Artifacts, by key, of the flow run whose summary (under ``summary_key``) names run ``run_id``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        summaries = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[summary_key])))
        flow_run = next(a.flow_run_id for a in summaries if f"`{run_id}`" in a.data)
        made = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run])))
    return {a.key: a for a in made}


def test_flows_write_reports_and_lafite_report_rewrites_them(evaluated, capsys):
    from flows.cli import main

    store, ev, sc = evaluated
    s = Store(store)
    assert ev.report_url == s.url(*layout.report("eval-report", layout.REPORT_PAGE))
    assert sc.report_url == s.url(*layout.report("score-report", layout.REPORT_PAGE))
    page = Path(ev.report_url).read_bytes()
    files = {str(p.relative_to(Path(ev.report_url).parent)): p.read_bytes()
             for p in Path(ev.report_url).parent.rglob("*") if p.is_file()}
    parsed = _check_page(files)
    text = " ".join(parsed.text)
    categories = sorted({f"{r['dataset']}/{r['category']}" for r in ev.rows})
    for key in categories:
        assert f"category {key}" in text
    assert "no per-image scores" not in text and "no loss curve" not in text
    assert s.exists(*layout.model_file(ev.model_version, layout.LOSSES_FILE))  # published with the version
    assert "pseudo-validation search" in text and "training loss" in text
    kept = [CategoryEvidence.from_bytes(s.read_bytes(*layout.evidence("eval-report", *k.split("/"))))
            for k in categories]
    assert all(e.gallery for e in kept)
    assert len([i for i in parsed.images if "_g" in i["data-file"]]) == 3 * sum(len(e.gallery) for e in kept)
    batch_text = " ".join(_parse(Path(sc.report_url).read_bytes()).text)
    assert "broken.png" in batch_text and f"images listed {sc.listed}" in batch_text
    for name in ("scored", "skipped", "errors"):
        assert sum(getattr(c, name) for c in sc.categories) == getattr(sc, name)
    assert CategoryCounts(NO_CATEGORY, errors=1) in sc.categories  # broken.png

    # each flow run's Prefect artifacts: a table and a summary that names the version and links the report
    for run_id, table_key, summary_key, rows in (("eval-report", "lafite-evaluate-metrics", "lafite-evaluate-summary",
                                                  len(ev.rows)),
                                                 ("score-report", "lafite-batch-score-counts",
                                                  "lafite-batch-score-summary", len(sc.categories))):
        made = _run_artifacts(run_id, summary_key)
        assert set(made) == {table_key, summary_key}
        assert len(json.loads(made[table_key].data)) == rows
        summary = made[summary_key].data
        report = s.url(*layout.report(run_id, layout.REPORT_PAGE))
        assert f"`{ev.model_version}`" in summary and f"[`{report}`]" in summary

    Path(ev.report_url).unlink()
    assert main(["report", ev.model_version, "--store", store]) == 0  # a version: its latest evaluation
    out = capsys.readouterr().out
    assert f"evaluation report of run eval-report (model {ev.model_version}): {ev.report_url}" in out
    assert Path(ev.report_url).read_bytes().count(b"<img") == page.count(b"<img")
    assert main(["report", "score-report", "--store", store]) == 0
    assert f"batch report of run score-report (model {sc.model_version})" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a run"):
        main(["report", "nothing-like-it", "--store", store])


@pytest.fixture(scope="session")
def chromium() -> str:
    """The headless browser; session-scoped and asked for first, so that a skip comes before any training."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the page is checked "
                    "without a browser by the other report tests")
    return found


_PROBE = b"""<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-broken', imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length);
});
</script></body>"""


@pytest.mark.parametrize("which", ["evaluation", "batch"])
def test_reports_render_in_headless_chromium(chromium, evaluated, tmp_path, which):
    _, ev, sc = evaluated
    page = Path(ev.report_url if which == "evaluation" else sc.report_url)
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], check=True, timeout=120, capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text, tables and figures, not a blank page
    # every <img> decoded: the page's own load handler counts them (a copy with a probe script appended)
    probe = tmp_path / "probe.html"
    probe.write_bytes(page.read_bytes().replace(b"</body>", _PROBE))
    dom = subprocess.run([*flags, "--dump-dom", "--virtual-time-budget=10000", probe.as_uri()], check=True,
                         timeout=120, capture_output=True, text=True).stdout
    found = re.search(r'data-images="(\d+)" data-broken="(\d+)"', dom)
    assert found, dom[-500:]
    assert int(found[1]) == page.read_bytes().count(b"<img") > 0 and int(found[2]) == 0


def test_gallery_originals_are_cut_to_the_centre_crop_the_model_saw():
    from lafite_core.datapath.images import crop_window
    from lafite_core.report.figures import crop_to_window

    image = np.arange(100 * 200, dtype=np.int32).reshape(100, 200)
    assert (crop_to_window(image, crop_window(224, 1.0)) == image).all()
    window = crop_window(224, 0.875)  # resized to 256, the centre 224 kept: 16 px cut on each side
    assert window == (16 / 256, 240 / 256)
    part = crop_to_window(image, window)
    assert part.shape == (88, 176) and part[0, 0] == image[6, 12] and part[-1, -1] == image[93, 187]


def test_reports_read_the_window_from_the_versions_config(tmp_path):
    from lafite_core.config import cpu_profile
    from lafite_core.report.figures import model_window
    from lafite_core.store.storage import Store

    store = Store(str(tmp_path))
    cropped = json.loads(cpu_profile().with_updates(data={"center_crop": 0.875}).to_json())
    store.write_json(layout.model_file("v-crop", "model.json"), {"config": cropped})
    old = json.loads(cpu_profile().to_json())
    del old["data"]["center_crop"]  # a version published before the option
    store.write_json(layout.model_file("v-old", "model.json"), {"config": old})
    assert model_window(store, "v-crop") == (16 / 256, 240 / 256) and model_window(store, "v-old") == (0.0, 1.0)
