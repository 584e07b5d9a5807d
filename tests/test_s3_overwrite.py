"""`--overwrite` of a published S3 dataset is crash-safe (loopback moto S3 server, no mock of S3).

An overwrite uploads the new files under a generation folder, switches readers with ONE PUT of `_COMMITTED`, then
deletes the old files (storage.publish_dir). Checked here with the real readers (the training reader
`packed_parquet_files` + `parquet_tables`, `load_manifest`, `expand`, `local_dir`):
- a publish stopped at each stage (uploaded, switched: SIGKILLed in a child process, half the old files deleted)
  leaves exactly the old or exactly the new dataset committed, and the next publish or `longctx data clean --prefix` removes what it left;
- a reader polling in a thread during a real overwrite never fails and never sees a mix; negative control: the
  former order (rm the prefix, upload, marker) makes the same poller fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import longctx
from longctx import storage

pytestmark = pytest.mark.s3

SEQ = 8


def dataset(version: int) -> list[pa.Table]:
    """Shards of a small packed dataset; every version differs in its values and its number of shards, and all
    versions use the same file names (part-00000.parquet, ...), as prepare_data does."""
    tables = []
    for s in range(2 + version % 2):
        rows = 4 + s
        ids = [[version * 1000 + s * 100 + r * SEQ + j for j in range(SEQ)] for r in range(rows)]
        tables.append(pa.table({
            "row_id": pa.array([s * 100 + r for r in range(rows)], pa.int64()),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "position_ids": pa.array([list(range(SEQ))] * rows, pa.list_(pa.int32())),
            "labels": pa.array(ids, pa.list_(pa.int32())),
            "seg_lengths": pa.array([[SEQ]] * rows, pa.list_(pa.int32())),
        }))
    return tables


def write_dataset(staging: str, version: int) -> None:
    shards = []
    for i, table in enumerate(dataset(version)):
        name = f"part-{i:05d}.parquet"
        pq.write_table(table, os.path.join(staging, name))
        shards.append({"path": name, "rows": table.num_rows})
    with open(os.path.join(staging, "manifest.json"), "w") as f:
        json.dump({"version": version, "seq_len": SEQ, "shards": shards}, f)


def publish(dest: str, version: int, overwrite: bool = True) -> None:
    with storage.publish_dir(dest, overwrite=overwrite) as staging:
        write_dataset(staging, version)


def read_rows(uri: str) -> pa.Table:
    """What a training run would read: the driver's shard list, then the workers' shard reader."""
    from longctx.train.batches import parquet_tables
    from longctx.train.trainer import packed_parquet_files

    def read(_root):
        files, rows = packed_parquet_files(uri)
        table = pa.concat_tables(parquet_tables(files))
        assert table.num_rows == rows
        return table

    return storage.read_committed(uri, read)


def version_of(table: pa.Table) -> int | None:
    """The version whose rows `table` is, byte for byte; None for anything else (a mix, a part)."""
    for v in range(1, 8):
        if table.equals(pa.concat_tables(dataset(v)).select(table.column_names)):
            return v
    return None


def keys(uri: str) -> list[str]:
    return sorted(storage.listing(uri)[2])


def committed_keys(uri: str) -> list[str]:
    marker = storage.require_committed(uri)
    root = marker.get("root")
    return sorted([f"{root}/{k}" if root else k for k in marker["files"]] + [storage.COMMIT_MARKER])


def check(uri: str, version: int, listings: bool = False) -> None:
    """The committed dataset at `uri` is exactly `version` for the training reader and load_manifest, and with
    `listings` for expand (folder and glob) and local_dir (what model and tokenizer loading use)."""
    from longctx.data.pipeline import load_manifest

    assert version_of(read_rows(uri)) == version
    assert load_manifest(uri)["version"] == version
    if not listings:
        return
    root = storage.committed_root(uri)
    names = [f"part-{i:05d}.parquet" for i in range(2 + version % 2)]
    assert storage.expand(storage.join(uri, "part-*.parquet")) == [storage.join(root, n) for n in names]
    assert storage.expand(uri) == [storage.join(root, n) for n in ["manifest.json", *names]]
    local = storage.local_dir(uri)
    assert sorted(os.listdir(local)) == sorted(n for n in [".longctx-manifest.json", "manifest.json", *names,
                                                          *([] if root != uri else [storage.COMMIT_MARKER])])
    assert json.load(open(os.path.join(local, "manifest.json")))["version"] == version


_KILL = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from longctx import storage
from test_s3_overwrite import publish
storage.PUBLISH_HOOKS.append(lambda stage, dest: stage == {stage!r} and os.kill(os.getpid(), signal.SIGKILL))
publish({dest!r}, {version})
"""


class Crash(BaseException):
    """Raised by a fault hook: the publish stops where it stands (publish_dir does no S3 cleanup on an
    exception, so what is left on S3 is what a killed process leaves; one stage is also killed for real)."""


def crashed_publish(dest: str, version: int, stage: str) -> None:
    def crash(s, _dest):
        if s == stage:
            raise Crash(stage)

    storage.PUBLISH_HOOKS.append(crash)
    try:
        with pytest.raises(Crash):
            publish(dest, version)
    finally:
        storage.PUBLISH_HOOKS.remove(crash)


def killed_publish(dest: str, version: int, stage: str) -> None:
    """Overwrite `dest` with `version` in a child process SIGKILLed when the publish reaches `stage`."""
    code = _KILL.format(tests=os.path.dirname(__file__), stage=stage, dest=dest, version=version)
    platform = os.path.dirname(os.path.dirname(os.path.abspath(longctx.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([platform, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]


def test_an_overwrite_killed_at_any_stage_leaves_the_old_or_the_new_dataset(s3_bucket, capsys):
    from longctx.cli import main

    dest = f"{s3_bucket}/packed"
    publish(dest, 1, overwrite=False)
    assert keys(dest) == committed_keys(dest)  # a fresh prefix: files at their names, as before

    crashed_publish(dest, 2, "uploaded")  # new files up, marker not switched: the old dataset
    check(dest, 1, listings=True)
    orphans = sorted(set(keys(dest)) - set(committed_keys(dest)))
    assert len(orphans) == 3 and all(storage.GENERATION.match(k.split("/")[0]) for k in orphans), orphans

    killed_publish(dest, 3, "switched")  # marker switched, old files not deleted: the new dataset
    check(dest, 3)
    left = sorted(set(keys(dest)) - set(committed_keys(dest)))
    assert left == ["manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # v1's
    # (v2's orphans were removed when v3 started)

    crashed_publish(dest, 4, "retiring")  # half of v3's files deleted: the new dataset
    check(dest, 4)
    left = sorted(set(keys(dest)) - set(committed_keys(dest)))
    assert len(left) == 2 and all(k.startswith(storage.require_committed(dest)["retired"][0].split("/")[0])
                                  for k in left), left  # v1's remaining ones went when v4 started; v3: 4 -> 2

    assert main(["data", "clean", "--prefix", dest, "--tmp", "/nonexistent"]) == 0
    assert "removed 2 objects left by interrupted S3 overwrites" in capsys.readouterr().out
    assert keys(dest) == committed_keys(dest)

    publish(dest, 5)  # a complete overwrite removes the old generation itself
    check(dest, 5, listings=True)
    assert keys(dest) == committed_keys(dest)
    with pytest.raises(storage.StorageError, match="already published"):
        publish(dest, 6, overwrite=False)


def test_a_read_overtaken_by_a_whole_overwrite_restarts_on_the_new_generation(s3_bucket):
    """A reader that resolved the old generation, then found its files deleted by a completed overwrite, reads the
    new one (read_committed); a file missing while the marker stayed the same is damage and raised."""
    from longctx.train.batches import parquet_tables

    dest = f"{s3_bucket}/overtaken"
    publish(dest, 1, overwrite=False)
    roots = []

    def read(root):
        roots.append(root)
        if len(roots) == 1:
            publish(dest, 2)  # a whole overwrite between the marker read and the file reads
        shards = json.loads(storage.read_text(storage.join(root, "manifest.json")))["shards"]
        return version_of(pa.concat_tables(parquet_tables([storage.join(root, s["path"]) for s in shards])))

    assert storage.read_committed(dest, read) == 2
    assert roots[0] == dest and storage.GENERATION.match(roots[1].rsplit("/", 1)[1])
    fs, _ = storage.fsspec_fs(dest)
    fs.rm(storage.published_path(dest, "part-00001.parquet")[len("s3://"):])
    with pytest.raises(FileNotFoundError):
        read_rows(dest)


class Poller:
    """Reads `dest` with the training reader in a loop in a thread; `polls` holds (start, end, what it saw): the
    version read byte for byte, or the error."""

    def __init__(self, dest: str):
        self.dest, self.polls, self._stop = dest, [], threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                seen = version_of(read_rows(self.dest))
            except Exception as e:  # noqa: BLE001 - counted: the check is that there are none
                seen = f"{type(e).__name__}: {e}"
            self.polls.append((t0, time.monotonic(), seen))

    def hold(self, n: int = 2, timeout: float = 60.0) -> None:
        """Wait until `n` reads that started now or later have finished (a window the reader surely saw)."""
        t, deadline = time.monotonic(), time.monotonic() + timeout
        while sum(t0 >= t for t0, _, _ in self.polls) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        self.hold(1)
        return self

    def __exit__(self, *exc):
        self.hold(1)
        self._stop.set()
        self._thread.join(60)

    def summary(self) -> str:
        seen = [s for _, _, s in self.polls]
        other = [s for s in seen if s not in (1, 2)]
        return f"{len(seen)} polls: {seen.count(1)} old, {seen.count(2)} new, {len(other)} failed or mixed"


def test_a_reader_polling_during_an_overwrite_never_fails_and_never_sees_a_mix(s3_bucket, caplog):
    """Every stage of a real overwrite is held until the poller has read twice inside it."""
    dest = f"{s3_bucket}/live"
    publish(dest, 1, overwrite=False)
    caplog.set_level("INFO", logger="longctx.storage")
    times: dict[str, float] = {}
    with Poller(dest) as poller:
        def hold(stage, _dest):
            times[stage] = time.monotonic()
            if stage in ("uploaded", "switched", "retiring"):
                poller.hold(2)
                times[stage + "_held"] = time.monotonic()

        storage.PUBLISH_HOOKS.append(hold)
        try:
            times["start"] = time.monotonic()
            publish(dest, 2)
        finally:
            storage.PUBLISH_HOOKS.remove(hold)
    polls, seen = poller.polls, [s for _, _, s in poller.polls]
    before = [s for t0, t1, s in polls if t1 < times["uploaded_held"]]  # ended before the marker PUT began
    after = [s for t0, t1, s in polls if t0 > times["switched"]]  # started after it
    retried = sum("overwritten while being read" in r.message for r in caplog.records)
    print(f"\noverwrite with a reader: {poller.summary()}; {retried} reads restarted on the new generation; "
          f"upload {times['uploaded'] - times['start']:.2f}s, marker switch "
          f"{times['switched'] - times['uploaded_held']:.3f}s, deletion of the old files "
          f"{times['done'] - times['retiring_held'] + times['retiring'] - times['switched_held']:.3f}s")
    assert set(seen) == {1, 2}, [s for s in seen if s not in (1, 2)][:3]  # no error, no mix, never nothing
    assert seen == sorted(seen)  # old until the switch, new after, never back
    assert before.count(1) >= 2 and set(before) == {1}  # read during the upload: the old dataset
    assert after.count(2) >= 4 and set(after) == {2}  # read after the switch (old files going): the new one
    check(dest, 2, listings=True)


def test_negative_control_the_former_rm_then_upload_order_is_caught_by_the_poller(s3_bucket):
    """The same poller against the order publish_dir used before: rm the prefix, upload, write the marker."""
    import tempfile

    dest = f"{s3_bucket}/former"
    publish(dest, 1, overwrite=False)
    times = {}
    with Poller(dest) as poller, tempfile.TemporaryDirectory() as staging:
        write_dataset(staging, 2)
        fs, path = storage.fsspec_fs(dest)
        fs.rm(path, recursive=True)
        times["removed"] = time.monotonic()
        poller.hold(2)
        storage.upload_dir(staging, dest)
        poller.hold(1)
        storage.write_json(storage.join(dest, storage.COMMIT_MARKER), storage.manifest_of(staging))
        times["committed"] = time.monotonic()
    failed = [s for _, _, s in poller.polls if s not in (1, 2)]
    print(f"\nformer order: {poller.summary()} (no committed dataset for "
          f"{times['committed'] - times['removed']:.2f}s), e.g. {failed[:1]}")
    assert len(failed) >= 3 and any("_COMMITTED" in str(s) for s in failed)
