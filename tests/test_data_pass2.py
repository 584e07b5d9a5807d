"""Pass 2 across the cluster (pipeline.run_pass2): the planned stream cut into `data.pack_partitions`
partitions, each packed and written by one Ray task. Same bytes whatever runs it (in this process, one task at a
time, many at once); rows numbered 0..N-1 and shards part-00000.. in order; every token of every document once,
also when a partition cut falls inside a long document."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from longctx.config import load_config
from longctx.data.mixture import plan_mixture
from longctx.data.pipeline import TokenCache, pack_and_publish, run_pass2
from train_helpers import tokens_by_document

SEQ = 256


def _cache(tmp_path, seed=0, scale=1.0) -> tuple[TokenCache, dict]:
    rng = np.random.default_rng(seed)
    docs, tok = {}, 1
    for src, median, n in [("web", 60, 1500), ("book", 1500, 60), ("code", 300, 300)]:
        lengths = np.clip(rng.lognormal(np.log(median), 0.8, int(n * scale)).astype(int), 2, 30 * SEQ)
        docs[src] = [(f"{src}-{i}", (np.arange(tok, tok + k) % 30_000).astype(np.int32))
                     for i, k in enumerate(lengths)]
        tok += int(lengths.sum())
    return TokenCache.from_documents(str(tmp_path / "cache"), docs), docs


def _cfg(*sets):
    return load_config(None, [f"data.seq_len={SEQ}", "data.long_threshold=512", "data.rows_per_shard=64",
                              "data.long_share=0.5", "data.seed=5", *sets])


def _pass2(cfg, cache, out, use_ray):
    os.makedirs(out)
    plan = plan_mixture(cache.source_lengths(), cfg.data)
    return run_pass2(cfg, cache, plan, 0, str(out), use_ray=use_ray)


@pytest.mark.parametrize("packing", ["best-fit", "concat"])
def test_partitions_number_rows_and_shards_in_order_and_keep_every_token(tmp_path, packing):
    cache, docs = _cache(tmp_path)
    sets = ["data.pack_partitions=5", "data.strategy=cut-seq"] + (["data.packing=concat", "data.attention=full"] if packing == "concat" else [])
    res = _pass2(_cfg(*sets), cache, tmp_path / "out", use_ray=False)
    assert res["partitions"] == 5 and len(res["rows_per_partition"]) == 5
    shards = res["shards"]
    assert [s["path"] for s in shards] == [f"part-{i:05d}.parquet" for i in range(len(shards))]
    table = pq.read_table([str(tmp_path / "out" / s["path"]) for s in shards])
    assert table.column("row_id").to_pylist() == list(range(table.num_rows)) == list(range(res["stats"].rows))
    assert [s["row_id_start"] for s in shards] == np.cumsum([0] + [s["rows"] for s in shards])[:-1].tolist()
    got = tokens_by_document([table])
    whole = {d: t.tolist() for rows in docs.values() for d, t in rows}
    if packing == "best-fit":  # cut-seq default budget: every token of every document exactly once
        assert sorted(got) == sorted(whole)
        for d, toks in whole.items():
            assert sorted(got[d]) == sorted(toks), d
        assert res["stats"].tokens == sum(len(t) for t in whole.values())
        assert res["stats"].split_docs == sum(len(t) > SEQ for t in whole.values())  # a cut doc counts once
    else:  # concat: each partition drops its own tail (< seq_len tokens), counted
        emitted = sum(len(v) for v in got.values())
        assert emitted + res["stats"].tail_dropped == sum(len(t) for t in whole.values())
        assert 0 <= res["stats"].tail_dropped < 5 * SEQ
        for d, toks in got.items():
            assert set(toks) <= set(whole[d])
    out_docs = sum(a.result()["docs"] for a in res["out_stats"].values())
    assert out_docs == sum(len(v) for v in docs.values())  # a document split across partitions counts once


@pytest.mark.ray
def test_same_bytes_in_one_process_one_task_at_a_time_and_many_at_once(ray_cluster, tmp_path):
    cache, _ = _cache(tmp_path, scale=0.4)
    runs = {
        "inline": (_cfg("data.pack_partitions=4"), False),
        "one_at_a_time": (_cfg("data.pack_partitions=4", "ray.data_cpus_per_task=4"), True),  # the cluster has 4
        "many": (_cfg("data.pack_partitions=4", "ray.data_cpus_per_task=0.25"), True),
    }
    digests = {}
    for name, (cfg, use_ray) in runs.items():
        res = _pass2(cfg, cache, tmp_path / name, use_ray)
        digests[name] = [(s["path"], s["sha256"]) for s in res["shards"]]
        if use_ray:
            assert all(res["nodes"]), res["nodes"]  # the tasks ran on Ray and said where
    assert len(digests["inline"]) > 4
    assert digests["inline"] == digests["one_at_a_time"] == digests["many"]
    other = _pass2(_cfg("data.pack_partitions=3"), cache, tmp_path / "three", False)  # negative control
    assert [s["sha256"] for s in other["shards"]] != [s for _, s in digests["inline"]][: len(other["shards"])]


def test_default_partitions_follow_the_planned_tokens_not_the_machine(tmp_path):
    from longctx.data.pipeline import PARTITION_ROWS, pack_partition_count

    cache, _ = _cache(tmp_path)
    cfg = _cfg()
    plan = plan_mixture(cache.source_lengths(), cfg.data)
    planned = sum(plan.planned_tokens().values())
    assert pack_partition_count(cfg.data, plan) == max(1, planned // (PARTITION_ROWS * SEQ))
    assert pack_partition_count(_cfg("data.seq_len=16").data, plan) == planned // (PARTITION_ROWS * 16)
    assert pack_partition_count(_cfg("data.pack_partitions=9").data, plan) == 9
    manifest = pack_and_publish(_cfg("data.pack_partitions=4"), cache, str(tmp_path / "pub"), quiet=True)
    assert manifest["pass2"]["partitions"] == 4 and sum(manifest["pass2"]["rows"]) == manifest["totals"]["rows"]
