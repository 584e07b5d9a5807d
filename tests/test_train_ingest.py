"""Per-rank ingest: each data-parallel rank reads only the row groups that hold its rows, measured on the wire.

Packed shards are published to the loopback S3 server; each rank's reader (`lane_row_stream`, what the training loop
runs) goes through its own counting proxy, so the GET bytes of every shard object are counted server side, per
rank. A rank must read about 1/dp of the bytes plus at most one row group; the negative control runs a reader that
reads every shard (the old behaviour) through the same check and sees it fail. Also: the lanes cover every row once,
and a resumed rank skips row groups it already consumed after reading their row ids only. No Ray.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from faultproxy import CountingProxy
from longctx import storage
from longctx.config import StorageConfig
from longctx.data.pack import row_group_sizes
from longctx.train.batches import Ledger, lane_bounds, lane_row_stream, lane_step_rows, parquet_tables
from longctx.train.trainer import packed_shard_rows
from train_helpers import packed_rows

pytestmark = pytest.mark.s3

SEQ = 4096
SHARD_ROWS = [30, 40, 30]  # row groups of 8 rows: rank 0's lane ends inside shard 1's third group
GROUP = 8


def _publish(uri: str, tmp_path, with_row_groups: bool = True) -> tuple[pa.Table, dict]:
    """Shards like the data engine's (manifest with row_groups), written from random rows; returns the rows and
    {shard name: [compressed bytes of each row group]}."""
    table = packed_rows(sum(SHARD_ROWS), SEQ, vocab=50_000, seed=3, min_doc=64)
    group_bytes, entries, start = {}, [], 0
    local = tmp_path / "shards"
    local.mkdir()
    for i, n in enumerate(SHARD_ROWS):
        name = f"part-{i:05d}.parquet"
        path = str(local / name)
        pq.write_table(table.slice(start, n), path, compression="zstd", row_group_size=GROUP)
        meta = pq.ParquetFile(path).metadata
        group_bytes[name] = [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                             for g in range(meta.num_row_groups)]
        entry = {"path": name, "rows": n, "row_id_start": start}
        if with_row_groups:
            entry["row_groups"] = row_group_sizes(path)
        entries.append(entry)
        start += n
    with storage.publish_dir(uri, overwrite=True) as staging:
        for e in entries:
            storage.write_bytes(storage.join(staging, e["path"]), (local / e["path"]).read_bytes())
        storage.write_text(storage.join(staging, "manifest.json"), json.dumps({"shards": entries}))
    return table, group_bytes


def _through(proxy: CountingProxy, fn):
    storage.configure(StorageConfig(endpoint_url=proxy.endpoint))
    try:
        return fn()
    finally:
        storage.configure(None)


def _shard_get_bytes(proxy: CountingProxy) -> dict[str, int]:
    return {f"part-{i:05d}.parquet": proxy.bytes_of("GET", f"part-{i:05d}.parquet") for i in range(len(SHARD_ROWS))}


def _check_rank_bytes(got: dict[str, int], group_bytes: dict, dp: int, requests: int) -> None:
    """The property: a rank's GET bytes <= all shard bytes / dp + one row group + the footers of the shards it
    opened and ~1 KiB of HTTP headers per request."""
    total = sum(sum(g) for g in group_bytes.values())
    opened = sum(1 for n in got.values() if n)
    footer = 64 << 10  # pyarrow reads a shard's footer with one read of at most 64 KiB from its end
    bound = total / dp + max(max(g) for g in group_bytes.values()) + opened * footer + requests * 1024
    print(f"read {sum(got.values()):,} of {total:,} shard bytes in {requests} requests (bound {bound:,.0f})")
    assert sum(got.values()) <= bound, (f"read {sum(got.values()):,} bytes of {total:,} (bound {bound:,.0f} for "
                                        f"1/{dp} + one row group): {got}")


def test_each_rank_reads_only_its_row_groups(s3_endpoint, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/packed"
    table, group_bytes = _publish(uri, tmp_path)
    port = int(s3_endpoint.rsplit(":", 1)[1])
    shards = packed_shard_rows(uri)
    assert [s.row_groups for s in shards] == [(8, 8, 8, 6), (8, 8, 8, 8, 8), (8, 8, 8, 6)]
    dp, n = 2, sum(SHARD_ROWS)
    seen = []
    for rank in range(dp):
        proxy = CountingProxy(port)
        try:
            stream = lane_row_stream(shards, dp_rank=rank, data_parallel=dp, epochs=1, ledger=Ledger())
            rows = _through(proxy, lambda: stream.take(n // dp))
            assert stream.take(1) is None
            got = _shard_get_bytes(proxy)
            _check_rank_bytes(got, group_bytes, dp, sum(proxy.requests.values()))
        finally:
            proxy.close()
        start, stop = lane_bounds(n, dp, rank)
        ids = [r.row_id for _, r in rows]
        assert ids == list(range(start, stop))
        for _, r in rows[:3]:  # the rows themselves, not only their ids
            assert np.array_equal(r.input_ids, table.column("input_ids")[r.row_id].values.to_numpy())
        seen += ids
        if rank == 0:
            assert got["part-00002.parquet"] == 0, "rank 0 opened a shard that holds none of its rows"
        else:
            assert got["part-00000.parquet"] == 0, "rank 1 opened a shard that holds none of its rows"
    assert sorted(seen) == list(range(n))
    assert lane_step_rows(n, dp, 5, 2) == [[0, 1, 2, 3, 4, 50, 51, 52, 53, 54], [5, 6, 7, 8, 9, 55, 56, 57, 58, 59]]

    # negative control: a rank reading every shard (and keeping its own rows) fails the same check
    proxy = CountingProxy(port)
    try:
        _through(proxy, lambda: sum(t.num_rows for t in parquet_tables([s.uri for s in shards])))
        with pytest.raises(AssertionError, match="bound"):
            _check_rank_bytes(_shard_get_bytes(proxy), group_bytes, dp, sum(proxy.requests.values()))
    finally:
        proxy.close()


def test_resumed_rank_skips_consumed_row_groups(s3_endpoint, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/packed"
    _, group_bytes = _publish(uri, tmp_path)
    port = int(s3_endpoint.rsplit(":", 1)[1])
    shards = packed_shard_rows(uri)
    ledger = Ledger()
    for i in range(40):  # rank 0's first 40 rows were consumed before the restart
        ledger.add(0, i)
    proxy = CountingProxy(port)
    try:
        stream = lane_row_stream(shards, dp_rank=0, data_parallel=2, epochs=1, ledger=ledger)
        rows = _through(proxy, lambda: stream.take(10))
        got = _shard_get_bytes(proxy)
    finally:
        proxy.close()
    assert [r.row_id for _, r in rows] == list(range(40, 50)) and stream.take(1) is None
    # shard 0 (rows 0-29) was never opened past its row ids; shard 1's groups holding rows 40-49 were read
    whole = sum(group_bytes["part-00000.parquet"])
    assert got["part-00000.parquet"] < whole / 4, got
    assert got["part-00001.parquet"] >= group_bytes["part-00001.parquet"][1], got


def test_old_manifest_without_row_groups_reads_footers(s3_bucket, tmp_path):
    """A manifest written before `row_groups` existed still trains: the driver takes the sizes from the footers."""
    uri = f"{s3_bucket}/old"
    _publish(uri, tmp_path, with_row_groups=False)
    shards = packed_shard_rows(uri)
    assert [s.row_groups for s in shards] == [(8, 8, 8, 6), (8, 8, 8, 8, 8), (8, 8, 8, 6)]
    stream = lane_row_stream(shards, dp_rank=1, data_parallel=3, epochs=1, ledger=Ledger())
    assert [r.row_id for _, r in stream.take(33)] == list(range(33, 66)) and stream.take(1) is None


def test_changed_shard_is_refused(tmp_path):
    """A shard whose row groups differ from the manifest's is named, not silently misread."""
    folder = tmp_path / "data"
    table, _ = _publish(str(folder), tmp_path)
    shards = packed_shard_rows(str(folder))
    committed = storage.committed_root(str(folder)) if hasattr(storage, "committed_root") else str(folder)
    path = os.path.join(committed, "part-00001.parquet")
    pq.write_table(table.slice(30, 40), path, compression="zstd", row_group_size=10)
    stream = lane_row_stream(shards, dp_rank=0, data_parallel=1, epochs=1, ledger=Ledger())
    with pytest.raises(ValueError, match="part-00001.parquet: row groups"):
        stream.take(100)
