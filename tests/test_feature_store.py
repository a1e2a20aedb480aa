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
