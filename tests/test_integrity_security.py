"""Model integrity (checksums, partial versions, weights-only loading) and path safety."""

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from lafite_core.store.feature_store import FeatureEntry, FeatureStore
from lafite_core.config import cpu_profile
from lafite_core.method.model import LafiteModel
from lafite_core.store.layout import MANIFEST
from lafite_core.store.storage import IntegrityError, Store, safe_part
from tasks.scoring import relative_parts


@pytest.fixture()
def store_copy(tmp_path, trained_store):
    shutil.copytree(trained_store, tmp_path / "store")
    s = Store(str(tmp_path / "store"))
    (v,) = s.list_versions()
    return s, v.version, tmp_path / "store" / "models" / v.version


def test_altered_file_is_refused(store_copy):
    s, version, folder = store_copy
    bank = np.load(folder / "bank.npy")
    bank[0, 0] += 1.0
    np.save(folder / "bank.npy", bank)
    with pytest.raises(IntegrityError, match="bank.npy does not match its checksum"):
        s.load_model_files(version)


def test_missing_file_and_missing_manifest_are_refused(store_copy):
    s, version, folder = store_copy
    (folder / "unet.pt").unlink()
    with pytest.raises(IntegrityError, match="unet.pt is missing"):
        s.load_model_files(version)
    (folder / MANIFEST).unlink()
    assert s.list_versions() == []
    with pytest.raises(IntegrityError):
        s.resolve_version(version)
    with pytest.raises(IntegrityError, match="incomplete"):
        s.load_model_files(version)


class Payload:
    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


def test_checkpoints_load_weights_only(store_copy):
    s, version, _ = store_copy
    files = s.load_model_files(version)
    state = torch.load(io.BytesIO(files["unet.pt"]), weights_only=True)
    buf = io.BytesIO()
    torch.save({**state, "extra": Payload()}, buf)
    files["unet.pt"] = buf.getvalue()
    with pytest.raises(pickle.UnpicklingError):
        LafiteModel.from_files(files)


def test_config_tampering_is_detected(store_copy):
    s, version, _ = store_copy
    files = s.load_model_files(version)
    meta = json.loads(files["model.json"])
    meta["config"]["scoring"]["tau"] = 999
    files["model.json"] = json.dumps(meta).encode()
    with pytest.raises(ValueError, match="does not match its recorded hash"):
        LafiteModel.from_files(files)


@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "a\\b", "x\x00y", " lead", "trail ", "line\nbreak"])
def test_names_cannot_escape_the_store(tmp_path, bad):
    with pytest.raises(ValueError, match="unsafe name"):
        safe_part(bad)
    s = Store(str(tmp_path / "root"))
    with pytest.raises(ValueError):
        s.write_bytes(["tables", bad, "x.parquet"], b"x")
    with pytest.raises(ValueError):
        FeatureStore(s, cpu_profile()).append(bad, "cat", [FeatureEntry("i", "u", "h")], np.zeros((1, 1, 1, 1)))
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_names_with_spaces_and_non_ascii_are_fine(tmp_path):
    s = Store(str(tmp_path))
    s.write_bytes(["heatmaps", "Bügel Teil", "naïve image.png"], b"png")
    assert (tmp_path / "heatmaps" / "Bügel Teil" / "naïve image.png").read_bytes() == b"png"


def test_object_keys_with_dot_dot_are_refused():
    with pytest.raises(ValueError, match="unsafe name"):
        relative_parts("s3://bucket/dump/../../etc/passwd.png", "s3://bucket/dump")
    assert relative_parts("s3://bucket/dump/line 3/ä.png", "s3://bucket/dump") == ["line 3", "ä.png"]
