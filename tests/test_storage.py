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
def test_shared_s3_staging_is_on_s3_and_an_overwrite_switches_generations(s3_bucket):
    """publish_dir(shared=True) on s3:// (pass 2's shard tasks write there from any node): nothing committed
    while staging, the marker last; a fresh prefix holds the files at their names, an overwrite stages a new
    generation that the marker switches to, the old files deleted; a failure publishes nothing and leaves
    nothing of its own."""
    dest = f"{s3_bucket}/shared-out"
    for gen, names in ((1, ["a.bin", "sub/b.bin"]), (2, ["c.bin"])):
        with storage.publish_dir(dest, overwrite=gen > 1, shared=True) as staging:
            assert storage.is_s3(staging) and staging == (dest if gen == 1 else staging)
            for n in names:
                storage.write_bytes(storage.join(staging, n), bytes([gen]) * 10)
            marker = storage.read_marker(dest)
            assert marker is None if gen == 1 else sorted(marker["files"]) == ["a.bin", "sub/b.bin"]
        marker = storage.require_committed(dest)
        assert sorted(marker["files"]) == sorted(names) and all(v["bytes"] == 10 for v in marker["files"].values())
        assert storage.read_bytes(storage.published_path(dest, names[0])) == bytes([gen]) * 10
    assert marker.get("root", "").startswith("gen-") and marker["retired"] == ["a.bin", "sub/b.bin"]
    assert not storage.exists(f"{dest}/a.bin") and not storage.exists(f"{dest}/sub/b.bin")  # old files deleted
    with pytest.raises(RuntimeError, match="writer died"):
        with storage.publish_dir(f"{s3_bucket}/shared-failed", shared=True) as staging:
            storage.write_bytes(storage.join(staging, "half.bin"), b"x")
            raise RuntimeError("writer died")
    assert not storage.exists(f"{s3_bucket}/shared-failed/half.bin") and not storage.is_committed(
        f"{s3_bucket}/shared-failed")
    with pytest.raises(RuntimeError, match="writer died"):  # a failed overwrite keeps the committed data
        with storage.publish_dir(dest, overwrite=True, shared=True) as staging:
            storage.write_bytes(storage.join(staging, "d.bin"), b"x")
            raise RuntimeError("writer died")
    assert storage.require_committed(dest) == marker and not storage.exists(storage.join(staging, "d.bin"))


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
def test_local_dir_downloads_s3_once_and_again_when_an_object_is_replaced(s3_bucket, tmp_path, monkeypatch):
    """Models and tokenizers on S3 are copied into one private cache folder, whole, reused while the prefix is
    unchanged and downloaded again when an object is replaced (the entry is keyed by ETag + size)."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    storage.upload_dir(str(src), f"{s3_bucket}/m")
    first = storage.local_dir(f"{s3_bucket}/m")
    assert open(os.path.join(first, "config.json")).read() == '{"a": 1}'
    assert os.stat(tmp_path / "cache").st_mode & 0o777 == 0o700  # private to this user
    assert storage.local_dir(f"{s3_bucket}/m") == first  # unchanged prefix: reused
    from longctx.data.tokenize import local_tokenizer_dir
    from longctx.model.load import local_model_dir

    assert local_model_dir(f"{s3_bucket}/m") == local_tokenizer_dir(f"{s3_bucket}/m") == first  # one download
    storage.write_text(f"{s3_bucket}/m/config.json", '{"a": 2}')  # replaced object, same size: new ETag
    second = storage.local_dir(f"{s3_bucket}/m")
    assert second != first and open(os.path.join(second, "config.json")).read() == '{"a": 2}'
    assert not os.path.exists(first)  # the stale version is gone
    assert [p for p in os.listdir(os.path.dirname(second)) if ".tmp-" in p] == []
    assert storage.local_dir(str(src)) == str(src)  # local folders are used in place
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.local_dir(str(tmp_path / "nope"))


@pytest.mark.s3
def test_cache_entry_is_trusted_only_when_its_manifest_matches(s3_bucket, tmp_path, monkeypatch):
    """A planted or tampered entry (wrong manifest, wrong file size) is replaced by a fresh download."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    storage.write_text(f"{s3_bucket}/tok/tokenizer.json", '{"real": true}')
    entry = storage.local_dir(f"{s3_bucket}/tok")
    with open(os.path.join(entry, "tokenizer.json"), "w") as f:  # tampered in place: size differs
        f.write('{"planted": "by someone else"}')
    assert storage.local_dir(f"{s3_bucket}/tok") == entry
    assert open(os.path.join(entry, "tokenizer.json")).read() == '{"real": true}'
    # a folder with a marker but no matching manifest is not an entry (the old `.complete` trust)
    with open(os.path.join(entry, storage.CACHE_MANIFEST), "w") as f:
        f.write("{}")
    open(os.path.join(entry, ".complete"), "w").close()
    assert open(os.path.join(storage.local_dir(f"{s3_bucket}/tok"), "tokenizer.json")).read() == '{"real": true}'


def test_cache_root_is_refused_when_not_owned_or_a_link(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, tmp_path / "link")
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "link"))
    with pytest.raises(storage.StorageError, match="owned by this user"):
        storage.cache_root()
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    monkeypatch.setenv("LONGCTX_CACHE", str(loose))
    assert storage.cache_root() == str(loose) and os.stat(loose).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/x", "a//b", "a/./b", "", "a/", "a\\..\\b", "a\x00b"])
def test_safe_relpath_refuses_keys_that_leave_their_folder(key):
    with pytest.raises(storage.StorageError, match="leave its folder"):
        storage.safe_relpath(key)


def test_safe_relpath_keeps_ordinary_keys():
    assert storage.safe_relpath("sub/w.bin") == os.path.join("sub", "w.bin")
    assert storage.safe_relpath("a..b/.hidden") == os.path.join("a..b", ".hidden")  # dots inside names are fine


@pytest.mark.s3
@pytest.mark.parametrize("key", ["tok/../../../../escaped.txt", "tok//abs/escaped.txt", "tok/./escaped.txt"])
def test_hostile_keys_under_an_s3_prefix_write_nothing_outside(s3_bucket, s3_endpoint, tmp_path, monkeypatch, key):
    import boto3

    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "a" / "b" / "c" / "cache"))
    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket=bucket, Key="tok/tokenizer.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=key, Body=b"pwned")
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert key in listed  # the store really holds the hostile key (a negative control for the refusal below)
    with pytest.raises(storage.StorageError, match="leave its folder"):
        storage.local_dir(f"{s3_bucket}/tok")
    with pytest.raises(storage.StorageError, match="leave its folder"):
        storage.download_dir(f"{s3_bucket}/tok", str(tmp_path / "dl"))
    written = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs]
    assert not [p for p in written if open(p, "rb").read() == b"pwned"]


def _dead_owner_tag() -> str:
    """`pid.start` of a process that has exited (a killed run)."""
    import subprocess

    from longctx import cleanup

    proc = subprocess.Popen(["sleep", "30"])
    start = cleanup.start_time(proc.pid)
    proc.kill()
    proc.wait()
    return f"{proc.pid}.{start}"


def test_work_folders_of_dead_runs_are_removed_by_the_next_run(tmp_path):
    from longctx import cleanup

    dead = tmp_path / f"longctx-tokens-{_dead_owner_tag()}-0badc0de"
    dead.mkdir()
    (dead / "0000.parquet").write_bytes(b"x" * 1000)
    alive = tmp_path / f"longctx-tokens-{cleanup.owner_tag()}-0011aabb"  # this process: running
    alive.mkdir()
    reused = tmp_path / f"longctx-tokens-{os.getpid()}.1-00ff00ff"  # our pid, another start time: pid reused
    reused.mkdir()
    other = tmp_path / "longctx-tokens-not-owned"
    other.mkdir()
    new = cleanup.work_dir("tokens", parent=str(tmp_path))
    assert os.path.isdir(new) and os.stat(new).st_mode & 0o777 == 0o700
    assert not dead.exists() and not reused.exists() and alive.exists() and other.exists()
    assert cleanup.remove_dead([str(tmp_path)]) == []


def test_staging_of_a_killed_publish_is_removed_by_the_next_publish_and_by_data_clean(tmp_path, capsys):
    from longctx import cleanup
    from longctx.cli import main

    dead = tmp_path / f".staging-{_dead_owner_tag()}-deadbeef"
    dead.mkdir()
    with storage.publish_dir(str(tmp_path / "out")) as staging:
        open(os.path.join(staging, "a.txt"), "w").close()
    assert not dead.exists() and sorted(os.listdir(tmp_path)) == ["out"]
    dead.mkdir()
    tokens = tmp_path / f"longctx-tokens-{_dead_owner_tag()}-deadbeef"
    tokens.mkdir()
    assert main(["data", "clean", "--path", str(tmp_path), "--tmp", str(tmp_path)]) == 0
    assert not dead.exists() and not tokens.exists() and "removed 2" in capsys.readouterr().out
    assert cleanup.remove_dead([str(tmp_path)]) == []


def test_overwrite_is_never_without_a_visible_output(tmp_path, monkeypatch):
    """After every rename an overwrite makes, the output folder is there (old or new): the swap is one atomic
    exchange. Negative control: the two-rename fallback leaves a moment with nothing at the path."""
    dest = tmp_path / "out"
    with storage.publish_dir(str(dest)) as staging:
        open(os.path.join(staging, "v"), "w").write("1")
    visible, real = [], os.replace

    def replace(a, b):
        real(a, b)
        visible.append(os.path.exists(dest / "v"))

    monkeypatch.setattr(os, "replace", replace)
    with storage.publish_dir(str(dest), overwrite=True) as staging:
        open(os.path.join(staging, "v"), "w").write("2")
    assert open(dest / "v").read() == "2" and all(visible) and sorted(os.listdir(tmp_path)) == ["out"]
    monkeypatch.setattr(storage.publish, "exchange", lambda a, b: False)
    with storage.publish_dir(str(dest), overwrite=True) as staging:
        open(os.path.join(staging, "v"), "w").write("3")
    assert open(dest / "v").read() == "3" and visible[-2:] == [False, True]


def test_an_overwrite_interrupted_between_its_renames_is_recovered_on_next_open(tmp_path):
    dest = tmp_path / "out"
    with storage.publish_dir(str(dest)) as staging:
        open(os.path.join(staging, "v"), "w").write("old")
    os.rename(dest, tmp_path / "out.old-1234abcd")  # the state a crash after the first rename leaves
    assert storage.require_committed(str(dest))  # the reader restores the old copy
    assert open(dest / "v").read() == "old" and sorted(os.listdir(tmp_path)) == ["out"]


def test_require_private_refuses_folders_others_could_write(tmp_path):
    """Before a sweep resume unpickles tuner.pkl: the folder must be writable only by its owner."""
    exp = tmp_path / "sweep" / "tune"
    exp.mkdir(parents=True)
    pkl = exp / "tuner.pkl"
    pkl.write_bytes(b"\x80\x04N.")
    for p in (tmp_path, tmp_path / "sweep", exp, pkl):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    storage.require_private(str(exp), "resume")  # private: accepted
    os.chmod(pkl, 0o666)
    with pytest.raises(storage.StorageError, match=r"tuner\.pkl is writable by others"):
        storage.require_private(str(exp), "resume")
    os.chmod(pkl, 0o644)
    os.chmod(exp, 0o775)
    if storage.private_group(os.stat(exp).st_gid):  # umask-002 systems: the user's own group may write
        storage.require_private(str(exp), "resume")
    if os.getuid() == 0:  # a shared group (root may give the folder to one)
        os.chown(exp, 0, 1)
        with pytest.raises(storage.StorageError, match="writable by its group 1"):
            storage.require_private(str(exp), "resume")
    os.chmod(exp, 0o755)
    os.chmod(tmp_path / "sweep", 0o777)  # anyone could swap the folder
    with pytest.raises(storage.StorageError, match="ancestor"):
        storage.require_private(str(exp), "resume")
    os.chmod(tmp_path / "sweep", 0o1777)  # sticky, like /tmp: others cannot replace what is ours
    storage.require_private(str(exp), "resume")
    storage.require_private("s3://bucket/sweeps/x/tune", "resume")  # not checkable here: documented instead
