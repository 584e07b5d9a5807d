"""Storage: one code path for local, file:// and s3:// (moto server on 127.0.0.1), and atomic publish."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longctx import storage


def test_normalize_and_builtin(tmp_path):
    assert storage.normalize(f"file://{tmp_path}") == str(tmp_path)
    assert storage.normalize("s3a://b/k") == "s3://b/k"
    assert os.path.isdir(storage.normalize("builtin:recipes"))
    with pytest.raises(storage.StorageError, match="no such shipped asset"):
        storage.normalize("builtin:does-not-exist")
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.normalize("gs://bucket/x")


def _roundtrip(root: str):
    storage.write_text(storage.join(root, "a/one.txt"), "hello")
    storage.write_json(storage.join(root, "a/b/two.json"), {"x": 1})
    assert storage.read_text(storage.join(root, "a/one.txt")) == "hello"
    assert json.loads(storage.read_text(storage.join(root, "a/b/two.json"))) == {"x": 1}
    files = storage.expand(storage.join(root, "a"))
    assert files == [storage.join(root, "a/b/two.json"), storage.join(root, "a/one.txt")]  # sorted by path
    assert storage.expand(storage.join(root, "a"), suffixes=(".json",)) == [storage.join(root, "a/b/two.json")]
    assert storage.expand(storage.join(root, "a/*.txt")) == [storage.join(root, "a/one.txt")]
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.expand(storage.join(root, "missing"))
    # pyarrow filesystem on the same URI sees the same bytes (the path Ray Data uses)
    table = pa.table({"x": [1, 2, 3]})
    fs, path = storage.pyarrow_fs(storage.join(root, "t.parquet"))
    if not storage.is_s3(root):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2, 3]


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path))
    _roundtrip(f"file://{tmp_path}/viafile")


@pytest.mark.s3
def test_s3_roundtrip(s3_bucket):
    _roundtrip(f"{s3_bucket}/prefix")


@pytest.mark.s3
def test_s3_endpoint_from_config_beats_environment(s3_bucket, s3_endpoint, monkeypatch):
    """storage.endpoint_url in config works even when the environment names no endpoint."""
    from longctx.config import StorageConfig

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    try:
        storage.configure(StorageConfig(endpoint_url=s3_endpoint))
        storage.write_text(f"{s3_bucket}/cfg.txt", "via config")
        fs, path = storage.pyarrow_fs(f"{s3_bucket}/cfg.txt")
        with fs.open_input_stream(path) as f:
            assert f.read() == b"via config"
    finally:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        storage.configure(None)


def _publish_checks(dest: str):
    with storage.publish_dir(dest) as staging:
        os.makedirs(os.path.join(staging, "shards"))
        for i in range(3):
            with open(os.path.join(staging, "shards", f"part-{i}.bin"), "wb") as f:
                f.write(bytes([i]) * 100)
        assert not storage.is_committed(dest)  # nothing visible while staging
    marker = storage.require_committed(dest)
    assert sorted(marker["files"]) == [f"shards/part-{i}.bin" for i in range(3)]
    assert all(len(v["sha256"]) == 64 and v["bytes"] == 100 for v in marker["files"].values())
    assert storage.read_bytes(storage.join(dest, "shards/part-2.bin")) == b"\x02" * 100
    with pytest.raises(storage.StorageError, match="already published"):
        with storage.publish_dir(dest):
            pass


def _failed_publish_leaves_nothing(dest: str):
    with pytest.raises(RuntimeError, match="writer died"):
        with storage.publish_dir(dest) as staging:
            with open(os.path.join(staging, "half.bin"), "wb") as f:
                f.write(b"x")
            raise RuntimeError("writer died")
    assert not storage.exists(dest) or not storage.is_committed(dest)
    with pytest.raises(storage.StorageError, match="incomplete"):
        storage.require_committed(dest)


def test_atomic_publish_local(tmp_path):
    _publish_checks(str(tmp_path / "out"))
    _failed_publish_leaves_nothing(str(tmp_path / "failed"))
    assert not (tmp_path / "failed").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".staging")] == []


@pytest.mark.s3
def test_atomic_publish_s3(s3_bucket):
    _publish_checks(f"{s3_bucket}/published")
    _failed_publish_leaves_nothing(f"{s3_bucket}/failed")


@pytest.mark.s3
def test_s3_half_written_prefix_is_not_trusted(s3_bucket):
    """A prefix with data but no marker (a writer killed mid-upload) is refused by readers."""
    storage.write_text(f"{s3_bucket}/partial/part-0.parquet", "data")
    with pytest.raises(storage.StorageError, match="_COMMITTED"):
        storage.require_committed(f"{s3_bucket}/partial")


@pytest.mark.s3
def test_download_dir_from_s3(s3_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"abc")
    storage.upload_dir(str(src), f"{s3_bucket}/model")
    out = storage.download_dir(f"{s3_bucket}/model", str(tmp_path / "dl"))
    assert open(os.path.join(out, "sub", "w.bin"), "rb").read() == b"abc"
    with pytest.raises(storage.StorageError, match="empty or missing"):
        storage.download_dir(f"{s3_bucket}/nothing", str(tmp_path / "dl2"))


@pytest.mark.s3
def test_local_dir_downloads_s3_once_and_publishes_complete_copies(s3_bucket, tmp_path, monkeypatch):
    """Models and tokenizers on S3 are copied into one cache folder, whole, and reused afterwards."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    storage.upload_dir(str(src), f"{s3_bucket}/m")
    first = storage.local_dir(f"{s3_bucket}/m")
    assert open(os.path.join(first, "config.json")).read() == '{"a": 1}'
    assert os.path.exists(os.path.join(first, ".complete"))
    storage.write_text(f"{s3_bucket}/m/config.json", '{"a": 2}')  # the cache is keyed by URI and reused
    assert storage.local_dir(f"{s3_bucket}/m") == first
    from longctx.data.tokenize import local_tokenizer_dir
    from longctx.model.load import local_model_dir

    assert local_model_dir(f"{s3_bucket}/m") == local_tokenizer_dir(f"{s3_bucket}/m") == first  # one download
    assert open(os.path.join(first, "config.json")).read() == '{"a": 1}'
    assert [p for p in os.listdir(os.path.dirname(first)) if ".tmp-" in p] == []
    assert storage.local_dir(str(src)) == str(src)  # local folders are used in place
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.local_dir(str(tmp_path / "nope"))
