"""Bad input tried on purpose: training skips or refuses with the file named, scoring records error rows."""

import logging
import shutil

import pyarrow.parquet as pq
import pytest

from corpus import bad_files, write_dataset, write_dump
from lafite_core.config import cpu_profile
from lafite_core.datapath.data import discover, load_sample
from lafite_core.datapath.images import ImageDecodeError, decode_image
from lafite_core.pipeline import evaluate, fit
from lafite_core.stages import trainable


def test_every_bad_file_is_refused_with_its_name_and_every_odd_image_decodes():
    for f in bad_files():
        if f.valid:
            image, _ = decode_image(f.data, 224, f.name)
            assert image.shape == (224, 224, 3), f.why
        else:
            with pytest.raises(ImageDecodeError) as err:
                decode_image(f.data, 224, f.name)
            assert f.name in str(err.value), f.why


def test_discovery_refuses_links_outside_the_root(tmp_path, caplog):
    files = write_dataset(tmp_path / "data", tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING):
        cats = {c.name: c for c in discover(str(tmp_path / "data"))}
    names = {s.url.rsplit("/", 1)[1] for s in cats["parts"].train}
    assert "link-outside.png" not in names and "links outside the data root" in caplog.text
    assert set(files) - {"link-outside.png"} <= names
    ok, skipped = trainable(list(cats.values()))
    assert [c.name for c in ok] == ["parts"] and skipped == ["dump/empty_category"]
    with pytest.raises(ValueError, match="no category has train/good images"):
        trainable([cats["empty_category"]])
    by_stem = {s.stem: s for s in cats["parts"].test}
    assert by_stem["d2"].mask_url is None and cats["parts"].missing_masks == (by_stem["d2"].url,)
    wrong = load_sample(by_stem["d1"], 224)
    assert wrong.mask is None and "mask is 50x50 but its image is 96x96" in wrong.mask_error


def test_training_skips_what_it_cannot_read_and_evaluation_uses_what_it_can(tmp_path, tiny_overrides, caplog):
    files = write_dataset(tmp_path / "data", tmp_path / "elsewhere")
    cats = discover(str(tmp_path / "data"))
    cfg = cpu_profile().with_updates(**tiny_overrides)
    with caplog.at_level(logging.WARNING):
        result = fit(cats, cfg)
    refused = {url.rsplit("/", 1)[1]: error for url, error in result.failures}
    expected = {n for n, f in files.items() if not f.valid and n != "link-outside.png"}
    assert set(refused) == expected
    for name, error in refused.items():
        assert name in error  # the message names the file
    assert "empty_category" in caplog.text
    valid = sum(f.valid for f in files.values())
    assert result.model.extra["train_images"] + len(result.selection.pseudo.labels[result.selection.pseudo.labels == 0]) \
        == 8 + valid
    rows = evaluate(result.model, [c for c in cats if c.test])
    assert {r.method for r in rows} == {"lafite", "lafite_no_edit", "patchcore"}
    assert all(r.num_images == 6 for r in rows)  # every test image counts for detection
    assert all(r.metrics.pixel_auroc is not None for r in rows)  # from the images whose mask is usable


def test_training_refuses_a_root_with_nothing_learnable(tmp_path, tiny_overrides):
    folder = tmp_path / "data" / "ds" / "cat" / "train" / "good"
    files = write_dump(folder, tmp_path / "elsewhere")
    for f in files.values():
        if f.valid:
            (folder / f.name).unlink()
    with pytest.raises(ValueError, match="no readable training images") as err:
        fit(discover(str(tmp_path / "data")), cpu_profile().with_updates(**tiny_overrides))
    assert "zero-bytes.png" in str(err.value)


def test_batch_scoring_turns_every_bad_file_into_an_error_row(prefect_harness, trained_store, tmp_path):
    from flows.batch_score import batch_score_flow
    from flows.params import ScoreParams

    files = write_dump(tmp_path / "dump", tmp_path / "elsewhere")
    store = str(tmp_path / "store")
    shutil.copytree(trained_store, store)  # the shared trained store stays untouched
    out = batch_score_flow(ScoreParams(source=str(tmp_path / "dump"), store=store, shard_size=4,
                                       heatmaps=True))
    assert out.listed == len(files)
    rows = {r["image_url"].rsplit("/", 1)[1]: r for r in pq.read_table(out.table_url).to_pylist()}
    assert set(rows) == set(files)
    for name, f in files.items():
        r = rows[name]
        if f.valid:
            assert r["error"] is None and r["raw_score"] is not None and r["decision"] in ("normal", "anomalous"), f.why
            assert r["heatmap_url"].endswith(".png")
        else:
            assert r["error"] and r["raw_score"] is None and name in r["error"], f.why
    assert "outside the source folder" in rows["link-outside.png"]["error"]
    assert (out.scored, out.errors) == (sum(f.valid for f in files.values()), sum(not f.valid for f in files.values()))
