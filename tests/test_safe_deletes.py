"""Deletes only of what longctx published (real local folders, loopback S3 server; nothing mocked).

Four classes, each a way an overwrite or `longctx data clean` used to reach what it did not own:
1. a local `--overwrite` onto a folder that is not a committed output (the user's files), or onto a committed
   folder of another kind (a model where a dataset goes): refused, naming it, nothing deleted;
2. a non-shared S3 overwrite of a prefix that holds objects but no `_COMMITTED` marker: nothing under it is
   deleted, nor the object named exactly like the prefix; the new dataset goes into a generation folder;
3. keys with `*`, `?` or `[...]` in a marker: deleted by exact key, never expanded as patterns (s3fs `rm` would
   take `*` as "everything here", the new marker included);
4. `data clean --prefix` with a marker whose `root` names a missing (or damaged) generation: refused, so the
   only real copy is not deleted as an "orphan".
"""

from __future__ import annotations

import json
import os

import pytest

from longctx import storage
from longctx.cli import main
from test_s3_overwrite import committed_keys as _committed
from test_s3_overwrite import keys as _keys

PACKED = "longctx.packed_sequences"


def _write(folder, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def _publish(dest: str, files: dict[str, bytes], **kw) -> None:
    with storage.publish_dir(dest, **kw) as staging:
        _write(staging, files)


def _tree(folder) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


# ------------------------------------------------------------------------------------- 1. local overwrite
def test_local_overwrite_refuses_what_longctx_did_not_publish(tmp_path):
    mine = tmp_path / "mine"
    user_files = {f"notes-{i}.txt": f"mine {i}".encode() for i in range(4)} | {"sub/deep.bin": b"\x00\x01"}
    _write(mine, user_files)
    a_file = tmp_path / "a-file.txt"
    a_file.write_bytes(b"not a folder")
    for dest in (mine, a_file):
        with pytest.raises(storage.StorageError, match=f"{dest}: a (folder|file) that is not a committed output"):
            _publish(str(dest), {"part-00000.parquet": b"new"}, overwrite=True)
    assert _tree(mine) == user_files and a_file.read_bytes() == b"not a folder"  # 5 of 5 files kept
    assert sorted(os.listdir(tmp_path)) == ["a-file.txt", "mine"]  # and no staging folder left behind

    # what overwrite does replace: an empty folder, and a committed output (of the same kind when one is named)
    empty = tmp_path / "empty"
    empty.mkdir()
    _publish(str(empty), {"manifest.json": json.dumps({"kind": PACKED}).encode()}, overwrite=True)
    _publish(str(empty), {"manifest.json": json.dumps({"kind": PACKED, "v": 2}).encode()}, overwrite=True, kind=PACKED)
    assert json.loads((empty / "manifest.json").read_text())["v"] == 2


def test_local_overwrite_refuses_a_committed_folder_of_another_kind(tmp_path):
    model, sft = str(tmp_path / "model"), str(tmp_path / "sft")
    _publish(model, {"config.json": b"{}", "model.safetensors": b"weights"})
    _publish(sft, {"manifest.json": json.dumps({"kind": "sft"}).encode(), "sft-00000.parquet": b"rows"})
    with pytest.raises(storage.StorageError, match=f"{model}: holds a committed folder with no manifest.json kind"):
        _publish(model, {"manifest.json": b"{}"}, overwrite=True, kind=PACKED)
    with pytest.raises(storage.StorageError, match=f"{sft}: holds a committed sft, not a {PACKED}"):
        _publish(sft, {"manifest.json": b"{}"}, overwrite=True, kind=PACKED)
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "sft" / "sft-00000.parquet").read_bytes() == b"rows"


def test_prepare_data_overwrite_refuses_a_foreign_folder_before_reading_the_corpus(tmp_path):
    """The entry point `jobs/prepare_data.py --overwrite` calls: refused before the tokenizer or Ray are used."""
    from longctx.config import load_config
    from longctx.data.pipeline import prepare_data

    mine = tmp_path / "my-thesis"
    files = {f"chapter-{i}.tex": f"chapter {i}".encode() for i in range(5)}
    _write(mine, files)
    cfg = load_config(None, [f"data.output={mine}", "data.tokenizer=/nonexistent/tokenizer"])
    with pytest.raises(storage.StorageError, match=f"{mine}: a folder that is not a committed output"):
        prepare_data(cfg, str(mine), overwrite=True)
    assert _tree(mine) == files


# --------------------------------------------------------------------------- 2. uncommitted S3 prefix
@pytest.mark.s3
@pytest.mark.parametrize("shared", [False, True])
def test_s3_overwrite_of_an_uncommitted_prefix_deletes_nothing(s3_bucket, shared):
    dest = f"{s3_bucket}/out"
    theirs = {f"{s3_bucket}/out": b"object named like the prefix", f"{s3_bucket}/out/user/a.txt": b"a",
              f"{s3_bucket}/out/b.txt": b"b", f"{s3_bucket}/out-other/c.txt": b"c"}
    for uri, data in theirs.items():
        storage.write_bytes(uri, data)
    with storage.publish_dir(dest, overwrite=True, shared=shared) as staging:
        for name, data in (("part-00000.parquet", b"new rows"), ("manifest.json", b"{}")):
            storage.write_bytes(storage.join(staging, name), data)
    assert {u: storage.read_bytes(u) for u in theirs} == theirs  # every object that was there, untouched
    marker = storage.require_committed(dest)
    assert storage.GENERATION.match(marker["root"]) and sorted(marker["files"]) == ["manifest.json",
                                                                                  "part-00000.parquet"]
    assert storage.read_bytes(storage.published_path(dest, "part-00000.parquet")) == b"new rows"
    assert storage.remove_orphans(dest) == [] and {u: storage.read_bytes(u) for u in theirs} == theirs


# ------------------------------------------------------------------------------- 3. glob keys in a marker
@pytest.mark.s3
@pytest.mark.parametrize("name", ["*", "**", "part[1].bin", "part?.bin"])
def test_an_overwrite_deletes_the_old_files_by_exact_key(s3_bucket, name):
    dest = f"{s3_bucket}/globbed"
    _publish(dest, {name: b"old pattern-named", "part1.bin": b"old 1", "keep/inner.bin": b"old inner"})
    assert name in storage.require_committed(dest)["files"]
    _publish(dest, {"part1.bin": b"new 1", "x.bin": b"new x"}, overwrite=True)
    marker = storage.require_committed(dest)  # the new marker is there ...
    assert sorted(marker["files"]) == ["part1.bin", "x.bin"]
    assert storage.read_bytes(storage.published_path(dest, "x.bin")) == b"new x"  # ... and its files
    assert _keys(dest) == _committed(dest)  # every old file gone, by its own key


@pytest.mark.s3
def test_data_clean_removes_retired_keys_exactly_and_keeps_live_files(s3_bucket, capsys):
    dest = f"{s3_bucket}/cleaned"
    _publish(dest, {"part1.bin": b"live 1", "partA.bin": b"live A", "manifest.json": b"{}"})
    marker = storage.require_committed(dest)
    for orphan in ("part[1].bin", "part[A-Z].bin", "*"):  # files an interrupted overwrite left, as retired
        storage.write_bytes(f"{dest}/{orphan}", b"orphan")
    storage.write_json(f"{dest}/{storage.COMMIT_MARKER}", {**marker, "retired": ["part[1].bin", "part[A-Z].bin", "*"]})
    assert main(["data", "clean", "--prefix", dest, "--tmp", "/nonexistent"]) == 0
    assert "removed 3 objects left by interrupted S3 overwrites" in capsys.readouterr().out
    assert _keys(dest) == [storage.COMMIT_MARKER, "manifest.json", "part1.bin", "partA.bin"]
    assert storage.read_bytes(f"{dest}/part1.bin") == b"live 1" and storage.read_bytes(f"{dest}/partA.bin") == b"live A"


# -------------------------------------------------------------------- 4. a marker naming a missing root
@pytest.mark.s3
@pytest.mark.parametrize("damage", ["missing generation", "missing file", "short file"])
def test_data_clean_keeps_every_generation_when_the_committed_one_is_not_complete(s3_bucket, capsys, damage):
    dest = f"{s3_bucket}/damaged"
    _publish(dest, {"part-0.bin": b"v1 rows", "manifest.json": b"{}"})
    _publish(dest, {"part-0.bin": b"v2 rows", "manifest.json": b"{}"}, overwrite=True)  # now under gen-.../
    marker = storage.require_committed(dest)
    real = marker["root"]
    if damage == "missing generation":  # a marker naming a generation that is not there: gen-... is the only copy
        marker = {**marker, "root": "gen-20990101T000000-deadbeef"}
        storage.write_json(f"{dest}/{storage.COMMIT_MARKER}", marker)
    elif damage == "missing file":
        fs, path = storage.fsspec_fs(dest)
        fs.rm_file(f"{path}/{real}/manifest.json")
    else:
        storage.write_bytes(f"{dest}/{real}/part-0.bin", b"v2")
    before = _keys(dest)
    assert any(k.startswith(real + "/") for k in before)
    assert main(["data", "clean", "--prefix", dest, "--tmp", "/nonexistent"]) != 0
    err = capsys.readouterr().err
    assert f"{dest}: the committed generation" in err and "is incomplete" in err and "removing nothing" in err
    assert _keys(dest) == before  # nothing deleted: the real copy is still there
