import numpy as np
import pytest
from PIL import Image

from lafite_core.method.backbone import FeatureExtractor
from lafite_core.config import BackboneConfig, cpu_profile
from lafite_core.datapath.data import discover
from lafite_core.store.feature_store import FeatureEntry, FeatureStore, extract_into, feature_key
from lafite_core.store.storage import Store


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(BackboneConfig())


def _dataset(root, n=5):
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        p = root / "ds" / "cat" / "train" / "good" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)


def test_extract_only_missing_or_changed_and_read_back(tmp_path, extractor):
    _dataset(tmp_path / "data")
    (bad := tmp_path / "data" / "ds" / "cat" / "train" / "good" / "zz-bad.png").write_bytes(b"not an image")
    cfg = cpu_profile()
    fs = FeatureStore(Store(str(tmp_path / "store")), cfg, {"name": "lite0"})
    samples = list(discover(str(tmp_path / "data"))[0].train)
    first = extract_into(fs, samples, extractor)
    assert (first.extracted, first.reused, len(first.failures)) == (5, 0, 1)
    assert first.failures[0][0] == str(bad)
    again = extract_into(fs, samples, extractor)
    assert (again.extracted, again.reused) == (0, 5)
    # a replaced file (same name, new content) is extracted again and repointed
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(samples[0].url)
    third = extract_into(fs, samples, extractor)
    assert (third.extracted, third.reused) == (1, 4)
    feats, entries = fs.read("ds", "cat", [s.image_id for s in samples[:2]])
    assert feats.shape == (2, 192, 32, 32) and [e.id for e in entries] == [s.image_id for s in samples[:2]]
    assert entries[0].row == 5  # the new row, not the stale one
    direct = extractor(__import__("torch").zeros(1, 3, 224, 224)).numpy()
    np.testing.assert_allclose(feats[0], direct[0], rtol=1e-3, atol=1e-4)  # batch-size numerics
    assert (tmp_path / "store" / "features" / feature_key(cfg) / "ds" / "cat" / "zarr.json").exists()


def test_uncommitted_rows_are_invisible_and_overwritten(tmp_path):
    fs = FeatureStore(Store(str(tmp_path)), cpu_profile(), {})
    fs.append("d", "c", [FeatureEntry("a", "u", "h")], np.ones((1, 2, 2, 2), np.float32))
    g = fs._open("d", "c", "a")
    g["features"].resize((3, 2, 2, 2))  # a crash after growing the array, before committing ids
    g["features"][1:] = 7
    assert list(fs.entries("d", "c")) == ["a"]
    fs.append("d", "c", [FeatureEntry("b", "u2", "h2")], np.full((1, 2, 2, 2), 2, np.float32))
    feats, entries = fs.read("d", "c")
    assert [e.id for e in entries] == ["a", "b"] and feats[1].max() == 2 and entries[1].row == 1
    with pytest.raises(KeyError):
        fs.read("d", "c", ["zzz"])


def _legacy_group(fs, rows):
    """A group as written before the entries log: every entry in the ``image_ids`` attribute."""
    g = fs._open("d", "c", "a")
    arr = g.create_array("features", shape=(len(rows), 2, 2, 2), chunks=(1, 2, 2, 2), dtype="float32",
                         compressors=None)
    arr[:] = np.stack([np.full((2, 2, 2), v, np.float32) for _, v in rows])
    g.attrs.update({"feature_shape": [2, 2, 2],
                    "image_ids": [{"id": i, "url": f"u-{i}", "content_hash": f"h-{i}", "row": r}
                                  for r, (i, _) in enumerate(rows)]})


def test_a_group_written_before_the_log_is_read_and_moved_to_it(tmp_path):
    fs = FeatureStore(Store(str(tmp_path)), cpu_profile(), {})
    _legacy_group(fs, [("a", 1.0), ("b", 2.0)])
    assert [(e.id, e.row) for e in fs.entries("d", "c").values()] == [("a", 0), ("b", 1)]
    # "b" changed: extracted again, it is repointed to a new row; "c" is new
    fs.append("d", "c", [FeatureEntry("b", "u-b", "h-b2"), FeatureEntry("c", "u-c", "h-c")],
              np.stack([np.full((2, 2, 2), v, np.float32) for v in (5.0, 3.0)]))
    g = fs._open("d", "c", "r")
    assert "image_ids" not in g.attrs and g.attrs["rows"] == 4
    entries = fs.entries("d", "c")
    assert [(e.id, e.row, e.content_hash) for e in entries.values()] == [("a", 0, "h-a"), ("b", 2, "h-b2"),
                                                                         ("c", 3, "h-c")]
    feats, got = fs.read("d", "c", ["c", "b", "a"])
    assert [e.id for e in got] == ["c", "b", "a"] and feats[:, 0, 0, 0].tolist() == [3.0, 5.0, 1.0]


def test_the_committed_metadata_does_not_grow_with_the_category(tmp_path):
    """An append rewrites the group's metadata and the log's last chunk only: the metadata's size is
    the same after 3 and after 40 images (the attribute list it replaced grew by an entry an image)."""
    fs = FeatureStore(Store(str(tmp_path)), cpu_profile(), {"name": "lite0"})
    meta = tmp_path / "features" / fs.key / "d" / "c" / "zarr.json"
    sizes = []
    for b in range(20):
        fs.append("d", "c", [FeatureEntry(f"img-{b}-{j}", f"/data/line/img-{b}-{j}.png", "0" * 64) for j in range(2)],
                  np.full((2, 2, 2, 2), b, np.float32))
        sizes.append(len(meta.read_bytes()))
    assert max(sizes[1:]) - min(sizes[1:]) <= 4  # the two counters gain digits, nothing else changes
    entries = fs.entries("d", "c")
    assert len(entries) == 40 and entries["img-19-1"].row == 39
    feats, _ = fs.read("d", "c", ["img-0-0", "img-19-1"])
    assert feats[:, 0, 0, 0].tolist() == [0.0, 19.0]


def test_log_lines_past_the_commit_are_invisible_and_overwritten(tmp_path):
    fs = FeatureStore(Store(str(tmp_path)), cpu_profile(), {})
    fs.append("d", "c", [FeatureEntry("a", "u", "h")], np.ones((1, 2, 2, 2), np.float32))
    g = fs._open("d", "c", "a")
    committed = g.attrs["entries_bytes"]
    torn = b'{"id":"ghost","url":"x","content_hash":"y","row":1}\n{"id":"half'  # a crash mid-append
    g["entries"].resize((committed + len(torn),))
    g["entries"][committed:] = np.frombuffer(torn, np.uint8)
    assert list(fs.entries("d", "c")) == ["a"]
    fs.append("d", "c", [FeatureEntry("b", "u2", "h2")], np.full((1, 2, 2, 2), 2, np.float32))
    assert [(e.id, e.row) for e in fs.entries("d", "c").values()] == [("a", 0), ("b", 1)]
    assert fs._open("d", "c", "r")["entries"].shape == (fs._open("d", "c", "r").attrs["entries_bytes"],)


def test_a_crash_in_the_middle_of_moving_to_the_log_is_redone(tmp_path):
    """The log written, the crash before the commit: the group is still the old kind, and the next
    append moves it again from the start of the log."""
    fs = FeatureStore(Store(str(tmp_path)), cpu_profile(), {})
    _legacy_group(fs, [("a", 1.0), ("b", 2.0)])
    g = fs._open("d", "c", "a")
    half = g.create_array("entries", shape=(30,), chunks=(1 << 16,), dtype="uint8", compressors=None)
    half[:] = np.frombuffer(b'{"id":"x","url":"y","content_h', np.uint8)[:30]
    assert list(fs.entries("d", "c")) == ["a", "b"]
    fs.append("d", "c", [FeatureEntry("c", "u-c", "h-c")], np.full((1, 2, 2, 2), 3.0, np.float32))
    assert [(e.id, e.row) for e in fs.entries("d", "c").values()] == [("a", 0), ("b", 1), ("c", 2)]


def test_a_torn_log_is_refused_with_the_groups_name(tmp_path):
    fs = FeatureStore(Store(str(tmp_path)), cpu_profile(), {})
    fs.append("d", "c", [FeatureEntry("a", "u", "h")], np.ones((1, 2, 2, 2), np.float32))
    g = fs._open("d", "c", "a")
    g.attrs.put({**g.attrs.asdict(), "entries_bytes": g.attrs["entries_bytes"] - 5})  # a commit mid-line
    with pytest.raises(ValueError, match=r"/d/c: the entries log is torn"):
        fs.entries("d", "c")


def test_a_centre_crop_extracts_the_centre_into_a_store_of_its_own(tmp_path, extractor):
    import torch

    from lafite_core.datapath.features import to_tensor
    from lafite_core.datapath.images import decode_image

    _dataset(tmp_path / "data", n=2)
    samples = list(discover(str(tmp_path / "data"))[0].train)
    store = Store(str(tmp_path / "store"))
    whole_cfg = cpu_profile()
    crop_cfg = whole_cfg.with_updates(data={"center_crop": 0.5})
    for cfg in (whole_cfg, crop_cfg):
        assert extract_into(FeatureStore(store, cfg, {"name": "lite0"}), samples, extractor).extracted == 2
    whole, _ = FeatureStore(store, whole_cfg, {"name": "lite0"}).read("ds", "cat", [samples[0].image_id])
    crop, _ = FeatureStore(store, crop_cfg, {"name": "lite0"}).read("ds", "cat", [samples[0].image_id])
    image, _ = decode_image(open(samples[0].url, "rb").read(), 224, crop=0.5)
    with torch.no_grad():
        direct = extractor(to_tensor([image])).numpy()
    np.testing.assert_allclose(crop[0], direct[0], rtol=1e-3, atol=1e-4)
    assert np.abs(crop[0] - whole[0]).mean() > 0.01
    assert {p.name for p in (tmp_path / "store" / "features").iterdir()} == {feature_key(whole_cfg),
                                                                            feature_key(crop_cfg)}
