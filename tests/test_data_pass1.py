"""Pass 1's engine (data/pass1.py: read tasks, one transform task per record block) on the local Ray cluster:
every record once and in input order whatever finishes first, one large file spread over the workers, and
results held back by a slow block bounded (the driver does not run ahead of the file it must hand on next).
The tokenizer itself through this engine: test_data_pipeline.py, test_data_faults.py, test_train_sft.py."""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pytest

from longctx.config import SourceSpec, load_config
from longctx.data import sources as src
from longctx.data.pass1 import record_stream

pytestmark = [pytest.mark.ray]


def _echo_class():
    """A transform (defined here, so Ray ships it by value) that keeps each record's place, says which process ran
    it, sleeps `slow_s` on the blocks of file `slow_file` and logs when each block ran."""

    class Echo:
        def __init__(self, log_dir: str, slow_file: int = -1, slow_s: float = 0.0, sleep_s: float = 0.0):
            self.log_dir, self.slow_file, self.slow_s, self.sleep_s = log_dir, slow_file, slow_s, sleep_s

        def __call__(self, batch: pa.Table) -> pa.Table:
            t0 = time.time()
            f = int(batch.column("file_idx")[0].as_py())
            time.sleep(self.slow_s if f == self.slow_file else self.sleep_s)
            with open(os.path.join(self.log_dir, f"{f}-{batch.column('rec_idx')[0].as_py()}.json"), "w") as out:
                json.dump({"file": f, "start": t0, "end": time.time(), "pid": os.getpid()}, out)
            n = batch.num_rows
            return pa.table({"file_idx": batch.column("file_idx"), "rec_idx": batch.column("rec_idx"),
                             "pid": pa.array([os.getpid()] * n, pa.int64()),
                             "text": batch.column("text")})

    return Echo


def _write(path, records: list[str]) -> None:
    with open(path, "w") as f:
        for i, text in enumerate(records):
            f.write(json.dumps({"text": text, "id": f"{path.name}/{i}"}) + "\n")


def _cfg(workers: int):
    return load_config(None, [f"data.num_tokenize_actors={workers}", "ray.data_cpus_per_task=0.25"])


def test_every_record_once_in_input_order_and_one_large_file_spread_over_the_workers(ray_cluster, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # one large file first: 5 blocks of the reader's 1M characters, then small files of one block each
    records = {"a-large.jsonl": [f"{i:06d} " + "x" * 199_993 for i in range(24)]}
    records.update({f"b-{k}.jsonl": [f"small {k} {i}" for i in range(3 + k)] for k in range(6)})
    for name, texts in records.items():
        _write(corpus / name, texts)
    tasks = src.list_files({"web": SourceSpec(uri=str(corpus))})
    cfg = _cfg(workers=2)
    logs = tmp_path / "logs"
    logs.mkdir()
    # the large file's blocks are slow, the small files' quick
    kwargs = {"log_dir": str(logs), "slow_file": 0, "slow_s": 0.6, "sleep_s": 0.05}
    out = list(record_stream(cfg, tasks, _echo_class(), kwargs, src.read_options(cfg), drop=("text",)))
    assert all("text" not in t.column_names for t in out)  # `drop` left the column behind in the task
    got = [(r["file_idx"], r["rec_idx"]) for t in out for r in t.select(["file_idx", "rec_idx"]).to_pylist()]
    want = [(t.file_idx, i + 1) for t in tasks for i in range(len(records[os.path.basename(t.uri)]))]  # lines from 1
    assert got == want  # every record once, files in order, records in order
    large = [json.loads(p.read_text()) for p in logs.glob("0-*.json")]
    assert len(large) >= 4, f"the large file came in {len(large)} blocks; the test needs several"
    assert len({r["pid"] for r in large}) >= 2, "one large file was transformed by one process only"
    # the blocks finished out of order at least once (the small files are quicker than the large file's blocks),
    # so the order above is the engine's doing, not the cluster's
    ends = sorted((json.loads(p.read_text())["end"], json.loads(p.read_text())["file"]) for p in logs.glob("*.json"))
    assert [f for _, f in ends] != sorted(f for _, f in ends)


def _blocks_during_a_slow_first_block(tmp_path, name: str) -> list[int]:
    corpus = tmp_path / name
    corpus.mkdir()
    for k in range(20):
        _write(corpus / f"part-{k:02d}.jsonl", [f"record {k}"])
    tasks = src.list_files({"web": SourceSpec(uri=str(corpus))})
    cfg = _cfg(workers=2)
    logs = tmp_path / f"{name}-logs"
    logs.mkdir()
    out = list(record_stream(cfg, tasks, _echo_class(), {"log_dir": str(logs), "slow_file": 0, "slow_s": 5.0},
                             src.read_options(cfg)))
    assert [t.column("file_idx")[0].as_py() for t in out] == list(range(20))
    runs = {r["file"]: r for r in (json.loads(p.read_text()) for p in logs.glob("*.json"))}
    return sorted(f for f, r in runs.items() if f != 0 and r["start"] < runs[0]["end"])


def test_a_slow_block_holds_back_at_most_twice_the_workers_results(ray_cluster, tmp_path, monkeypatch):
    """While the first file's block takes 5 s, the other worker goes on with later files, but only until the
    transforms running plus the results waiting for their turn reach 2 x workers: memory stays bounded however
    many files follow. Negative control: with the bound lifted the same run transforms most later files during
    the slow block (their results would all be held by the driver)."""
    from longctx.data import pass1

    during = _blocks_during_a_slow_first_block(tmp_path, "bounded")
    # 2 workers: the slow block plus at most 3 others running or waiting for their turn
    assert 1 <= len(during) <= 2 * 2 - 1, f"blocks started while the first was running: {during}"
    monkeypatch.setattr(pass1, "HELD_PER_WORKER", 100)
    unbounded = _blocks_during_a_slow_first_block(tmp_path, "unbounded")
    assert len(unbounded) >= 8, unbounded
