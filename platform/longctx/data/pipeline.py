"""The data engine: sources -> validated records -> tokens -> length mixture -> packed rows -> Parquet shards.

Public entry points (the CLI and jobs call these):

    manifest = prepare_data(cfg)              # writes shards + manifest.json under cfg.data.output, atomically
    ds = read_packed(manifest_uri_or_dir)     # ray.data.Dataset of packed rows (checks the commit marker)
    ds = packed_dataset(cfg)                  # same rows, streamed straight to training without writing
    stats = length_stats(cfg)                 # per-source length table only (`longctx data stats`)

Two passes (why: per-source upsampling needs each source's length distribution before it can choose):
  pass 1  Ray tasks (`data/pass1.py`): one read task per file (our own parser, quarantine rows instead of
          errors) -> one tokenize task per record block, which writes the token cache next to the output (every
          node can read it). The driver consumes only the metadata, in input order: lengths (4 bytes per
          document) and where each cache row group is.
          With a token budget (data.token_budget, else train.token_budget), sources are read only as far as the
          budget's length mixture needs (data/budget.py) and the stream stops there.
  plan    `mixture.plan_mixture` turns the lengths into per-document repeat counts (no tokens touched).
  pass 2  stream the cache source by source in seeded row-group order, interleave the (source, long) streams by
          deficit against their planned shares, pack best-fit decreasing over a bounded buffer, emit rows through
          a pool that keeps every stretch of rows on the target mix, and write shards of `rows_per_shard` rows.
          Runs as Ray tasks over `data.pack_partitions` partitions of the planned stream (`run_pass2`; each
          partition 1/P of every bucket, so each carries the mix); the driver only plans and numbers.
          Memory per task stays bounded by two cache row groups per bucket plus the pack buffer and the row pool.
Same input + config + seed -> byte-identical shards whatever the cluster size (order is fixed everywhere; the
partitions depend on the config and the plan only; the sha256 of every shard is in the manifest). See data/README.md for the numbered walk-through.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from longctx import cleanup, storage
from longctx.config import JobConfig
from longctx.data.budget import effective_data_config
from longctx.data.cip import cip_params, cip_table
from longctx.data.manifest import build_manifest
from longctx.data.mixture import MixturePlan, SourcePlan, plan_mixture
from longctx.data.pack import PACKED_KIND, BestFitPacker, ConcatPacker, PackStats, RowBuilder, Segment, write_shard_file
from longctx.data.stats import LengthAccumulator, format_length_table, plot_length_histogram, source_length_stats
from longctx.data.token_cache import TokenCache, check_bad_fraction, tokenize_corpus
from longctx.data.tokenize import load_fast_tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
QUARANTINE_FILE = "_quarantine/records.jsonl"


# ------------------------------------------------------------------------------------------------- pass 2
def _bucket_key(plan: MixturePlan):
    """Mix buckets: (source, long) pairs; under cut-4k (chunks are never long documents) sources alone."""
    thr = int(plan.params.get("long_threshold", 0) or 0)
    if plan.chunk_len or not thr:
        return lambda source, doc_tokens: (source, False)
    return lambda source, doc_tokens: (source, bool(doc_tokens >= thr))


def mix_buckets(plan: MixturePlan) -> dict[tuple[str, bool], int]:
    """Planned tokens of every (source, long) bucket that has tokens, in a fixed order: the targets the row
    order keeps in every stretch of the output (under cut-4k, sources alone: (source, False))."""
    thr = int(plan.params.get("long_threshold", 0) or 0)
    out: dict[tuple[str, bool], int] = {}
    for s in sorted(plan.sources):
        p = plan.sources[s]
        tokens = (np.maximum(p.counts - 1, 0).astype(np.int64) * p.lengths
                  + np.where(p.counts > 0, p.last_take, 0).astype(np.int64))
        if plan.chunk_len or not thr:
            parts = [(False, np.ones(len(tokens), bool))]
        else:
            long = p.lengths >= thr
            parts = [(False, ~long), (True, long)]
        for flag, sel in parts:
            n = int(tokens[sel].sum())
            if n:
                out[(s, flag)] = n
    return out


def _emissions(cache: TokenCache, source: str, plan: SourcePlan, seed: int,
               docs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The order in which one source's documents are emitted, from the plan alone (no tokens read): pass p emits
    every document with counts > p, row groups in a seeded order, documents shuffled inside each row group.
    `docs` (bool per document) keeps only those documents (the long or the short ones). Returns (document index,
    tokens emitted) per emission: the last occurrence of a document keeps `last_take` tokens."""
    counts = plan.counts if docs is None else np.where(docs, plan.counts, 0)
    out_doc: list[np.ndarray] = []
    if counts.any():
        sizes = cache.row_groups[source]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        sidx = sorted(cache.lengths).index(source)
        for p in range(int(counts.max())):
            rng = np.random.default_rng([seed, sidx, p])
            for rg in rng.permutation(len(sizes)):
                lo, hi = int(offsets[rg]), int(offsets[rg + 1])
                sel = np.flatnonzero(plan.counts[lo:hi] > p)
                # NOTE: the permutation is drawn over every eligible document, then filtered: the long and the
                # short stream of a source see the same seeded order as one stream would.
                order = rng.permutation(sel)
                if docs is not None:
                    order = order[docs[lo + order]]
                if len(order):
                    out_doc.append(np.stack([lo + order, np.full(len(order), p)]))
    if not out_doc:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    both = np.concatenate(out_doc, axis=1).astype(np.int64)
    doc, p = both[0], both[1]
    take = np.where(plan.counts[doc] == p + 1, plan.last_take[doc], plan.lengths[doc]).astype(np.int64)
    return doc, take


class _CacheReader:
    """Reads a source's cached documents row group by row group (the newest one kept), wherever the cache is."""

    def __init__(self, cache: TokenCache, source: str):
        self.cache, self.source = cache, source
        self.offsets = np.concatenate([[0], np.cumsum(cache.row_groups[source])]).astype(np.int64)
        self.rg = -1
        self.values = self.offs = self.ids = None

    def document(self, d: int) -> tuple[np.ndarray, str]:
        rg = int(np.searchsorted(self.offsets, d, side="right")) - 1
        if rg != self.rg:
            table = self.cache.read_row_group(self.source, rg)
            tokens = table.column("tokens").combine_chunks()
            self.values, self.offs = tokens.values.to_numpy(), tokens.offsets.to_numpy()
            self.ids = table.column("doc_id").to_pylist()
            self.rg = rg
        i = d - int(self.offsets[rg])
        return self.values[self.offs[i]:self.offs[i + 1]], self.ids[i]


def _emitted_segments(cache: TokenCache, source: str, plan: SourcePlan, doc: np.ndarray, take: np.ndarray,
                      chunk_len: int | None, piece_len: int | None, tokens: bool = True,
                      start: np.ndarray | None = None, stop: np.ndarray | None = None) -> Iterator[Segment]:
    """The segments of the emissions (doc, take) of one source, in order. `piece_len` cuts longer documents into
    pieces of that many tokens (the first piece marked `split`), so that one long document cannot fill a stretch
    of rows by itself. `start`/`stop` (token offsets inside each emission, at piece or chunk boundaries) keep only
    the segments in that range: a pass-2 partition may hold part of a long document. With `tokens=False` nothing
    is read: segments carry zeros of the right lengths (what the row layout needs: pass 2 counts each
    partition's rows before any partition writes)."""
    reader = _CacheReader(cache, source) if tokens else None
    zeros = np.zeros(int(take.max()) if len(take) else 0, np.int32)
    bounds = zip(start.tolist(), stop.tolist()) if start is not None else ((0, t) for t in take.tolist())
    for d, t, (lo, hi) in zip(doc.tolist(), take.tolist(), bounds):
        if reader is not None:
            toks, doc_id = reader.document(d)
            toks = toks[:t]
        else:
            toks, doc_id = zeros[:t], ""
        if chunk_len:
            parts = [(c, toks[c:c + chunk_len], None) for c in range(0, len(toks), chunk_len)]
        else:
            parts = [(0, toks, int(plan.lengths[d]))]
        for at, part, doc_tokens in parts:
            n = len(part) if doc_tokens is None else doc_tokens
            if piece_len and len(part) > piece_len:
                for j, c in enumerate(range(0, len(part), piece_len)):
                    if lo <= at + c < hi:
                        yield Segment(part[c:c + piece_len], source, doc_id, n, split=j == 0, piece=j)
            elif lo <= at < hi:
                yield Segment(part, source, doc_id, n)


def _source_segments(cache: TokenCache, source: str, plan: SourcePlan, seed: int, chunk_len: int | None,
                     piece_len: int | None, docs: np.ndarray | None) -> Iterator[Segment]:
    """Documents of one source as the plan says (`_emissions` order, `_emitted_segments` pieces)."""
    doc, take = _emissions(cache, source, plan, seed, docs)
    yield from _emitted_segments(cache, source, plan, doc, take, chunk_len, piece_len)


def bucket_emissions(cache: TokenCache, plan: MixturePlan, seed: int) -> dict[tuple[str, bool], tuple]:
    """(document index, tokens, start, stop) of every emission of every (source, long) bucket of `mix_buckets`,
    in order (start, stop: the token range of the emission a stream holds; here the whole of it)."""
    thr = int(plan.params.get("long_threshold", 0) or 0)
    out = {}
    for s, long in mix_buckets(plan):
        sp = plan.sources[s]
        docs = None if (plan.chunk_len or not thr) else (sp.lengths >= thr) == long
        doc, take = _emissions(cache, s, sp, seed, docs)
        out[(s, long)] = (doc, take, np.zeros(len(doc), np.int64), take.copy())
    return out


def mixed_segments(cache: TokenCache, plan: MixturePlan, seed: int, piece_len: int | None = None,
                   emissions: dict[tuple[str, bool], tuple] | None = None, tokens: bool = True) -> Iterator[Segment]:
    """Interleave the sources' segment streams so that every stretch of the output has the target mix.

    Deficit interleaving, deterministic: the streams are the (source, long) buckets of `mix_buckets`; the next
    segment comes from the bucket furthest behind its planned share, measured as (emitted + half the next
    segment) / planned tokens (ties: a seeded bucket order). Source shares and the long share therefore stay on
    target at every prefix, up to one segment; `piece_len` (seq_len) bounds a segment. `emissions` (one pass-2
    partition: a stretch of every bucket's `bucket_emissions`) interleaves only those; `tokens=False`: lengths
    only (`_emitted_segments`)."""
    targets = mix_buckets(plan)
    keys = list(targets)
    if emissions is None:
        emissions = bucket_emissions(cache, plan, seed)
    streams = []
    for s, long in keys:
        doc, take, start, stop = emissions[(s, long)]
        streams.append(_emitted_segments(cache, s, plan.sources[s], doc, take, plan.chunk_len, piece_len, tokens,
                                         start, stop))
    # NOTE: Python floats (IEEE doubles, as numpy's float64) over a handful of buckets: numpy's per-call overhead on
    # arrays this small cost more than the packing itself; only the bucket that moved gets a new score.
    want = [float(targets[k]) for k in keys]
    emitted = [0.0] * len(keys)
    rank = np.random.default_rng([seed, 1_000_003]).permutation(len(keys)).tolist()
    heads = [next(st, None) for st in streams]

    def score(k: int) -> tuple[float, int]:  # ties: the lower seeded rank
        h = heads[k]
        return ((emitted[k] + len(h.tokens) / 2) / want[k] if h is not None else math.inf), rank[k]

    scores = [score(k) for k in range(len(keys))]
    while True:
        best = min(scores)
        if best[0] == math.inf:
            return
        k = scores.index(best)
        seg = heads[k]
        emitted[k] += len(seg.tokens)
        heads[k] = next(streams[k], None)
        scores[k] = score(k)
        yield seg


class MixedRowOrder:
    """Emits packed rows in an order that keeps every stretch of rows on the target mix.

    The best-fit packer reorders what it is fed (full pieces leave at once, short documents wait in its buffer),
    so rows go through a pool of `pool_rows` rows; whenever it is full, the row whose tokens bring the emitted
    (source, long) bucket totals closest to their target shares leaves (squared deviation, ties: oldest).
    Deterministic; memory: `pool_rows` rows."""

    def __init__(self, targets: dict[tuple[str, bool], int], key, pool_rows: int):
        self.keys = {k: i for i, k in enumerate(targets)}
        total = float(sum(targets.values())) or 1.0
        self.share = np.array([targets[k] / total for k in targets], np.float64)
        self.key, self.pool_rows = key, pool_rows
        self.pool: list[list[Segment]] = []
        self.comp = np.zeros((0, len(self.keys)), np.float64)
        self.emitted = np.zeros(len(self.keys), np.float64)

    def add(self, row: list[Segment]) -> Iterator[list[Segment]]:
        c = np.zeros(len(self.keys), np.float64)
        for seg in row:
            c[self.keys[self.key(seg.source, seg.doc_tokens)]] += len(seg.tokens)
        self.pool.append(row)
        self.comp = np.vstack([self.comp, c[None]])
        if len(self.pool) > self.pool_rows:
            yield self._pop()

    def finish(self) -> Iterator[list[Segment]]:
        while self.pool:
            yield self._pop()

    def _pop(self) -> list[Segment]:
        total = self.emitted.sum()
        after = self.emitted[None] + self.comp  # bucket totals if row r left now
        dev = after - (total + self.comp.sum(1, keepdims=True)) * self.share[None]
        r = int(np.argmin((dev * dev).sum(1)))
        self.emitted += self.comp[r]
        self.comp = np.delete(self.comp, r, axis=0)
        return self.pool.pop(r)


def mix_pool_rows(pack_buffer_rows: int) -> int:
    """Rows the mix-order pool holds. The best-fit packer keeps up to 2 x pack_buffer_rows rows' worth of
    documents back; a pool of 4x that (128 rows at the default 16) keeps every 1% stretch of rows within about
    1.5 points of the target mix in tests/test_data_mix_order.py (64 rows: 2.7 points on three sources).
    Memory: this many rows of seq_len tokens."""
    return 8 * pack_buffer_rows


def make_packer(data_cfg):
    """The packer `data.packing` names: BestFitPacker (`best-fit`) or ConcatPacker (`concat`)."""
    if data_cfg.packing == "concat":
        return ConcatPacker(data_cfg.seq_len)
    return BestFitPacker(data_cfg.seq_len, data_cfg.pack_buffer_rows)


def _packed_rows(cfg, cache: TokenCache, plan: MixturePlan, packer, out_stats: dict | None = None,
                 emissions: dict | None = None, tokens: bool = True) -> Iterator[list[Segment]]:
    """Finished rows (segment lists) in output order: the mixed stream packed, best-fit rows through the
    mix-order pool (concat rows are already in stream order)."""
    d = cfg.data

    def packed() -> Iterator[list[Segment]]:
        for seg in mixed_segments(cache, plan, d.seed, piece_len=d.seq_len, emissions=emissions, tokens=tokens):
            if out_stats is not None:
                out_stats.setdefault(seg.source, LengthAccumulator(d.long_threshold)).add(
                    seg.doc_tokens, len(seg.tokens), docs=int(seg.piece == 0))
            yield from packer.add(seg)
        yield from packer.finish()

    if not isinstance(packer, BestFitPacker):
        yield from packed()
        return
    order = MixedRowOrder(mix_buckets(plan), _bucket_key(plan), mix_pool_rows(d.pack_buffer_rows))
    for row in packed():
        yield from order.add(row)
    yield from order.finish()


def packed_row_tables(cfg, cache: TokenCache, plan: MixturePlan, pad_id: int,
                      out_stats: dict[str, LengthAccumulator] | None = None,
                      packer: BestFitPacker | None = None, rows_per_table: int | None = None,
                      emissions: dict | None = None, row_offset: int = 0) -> Iterator[pa.Table]:
    """Pass 2 (of the whole stream, or of one partition: `emissions`, its rows numbered from `row_offset`):
    packed rows as Arrow tables of up to `rows_per_table` (default rows_per_shard) rows, row_id in order."""
    d = cfg.data
    rows_per_table = rows_per_table or d.rows_per_shard
    packer = packer or make_packer(d)
    builder = RowBuilder(d.seq_len, pad_id, d.attention)
    row_id = row_offset
    cip = _cip_hook(d.cip)
    for segments in _packed_rows(cfg, cache, plan, packer, out_stats, emissions):
        builder.add(row_id, segments)
        row_id += 1
        if len(builder) == rows_per_table:
            yield cip(builder.table())
            builder.clear()
    if len(builder):
        yield cip(builder.table())
    if d.cip.fraction > 0 and emissions is None:  # the manifest's params record the CIP share
        plan.params["cip"] = cip_params(d.cip.k, d.cip.fraction, row_id)


# ------------------------------------------------------------------------------- pass 2 across the cluster
PARTITION_ROWS = 4096  # default partition size in rows of seq_len tokens (data.pack_partitions unset)


def pack_partition_count(data_cfg, plan: MixturePlan) -> int:
    """Pass-2 partitions: `data.pack_partitions`, else one per PARTITION_ROWS rows' worth of planned tokens (at
    least one). A function of the config and the plan only, never of the cluster: the output does not depend
    on how many nodes or CPUs run it. Each partition ends with its own packer flush (at most pack_buffer_rows
    part-filled rows), hence partitions of thousands of rows."""
    if data_cfg.pack_partitions:
        return int(data_cfg.pack_partitions)
    planned = sum(plan.planned_tokens().values())
    return max(1, planned // (PARTITION_ROWS * data_cfg.seq_len))


def partition_emissions(emissions: dict[tuple[str, bool], tuple], parts: int, unit: int) -> list[dict]:
    """Cut every bucket's emission stream into `parts` consecutive stretches of equal tokens, up to `unit`
    tokens (seq_len, or the cut-4k chunk length): a cut that falls inside a long document splits it at a multiple
    of `unit` from its start (its pieces are rows of their own anyway). Partition k holds 1/parts of every
    bucket, so each carries the target mix and their concatenation is the whole plan. Integer arithmetic."""
    out: list[dict] = [{} for _ in range(parts)]
    for key, (doc, take, start, stop) in emissions.items():
        ends = np.cumsum(stop - start)
        total = int(ends[-1]) if len(ends) else 0
        cuts = []  # (emission index, token offset inside it) where each partition after the first begins
        for k in range(1, parts):
            t = (total * k) // parts
            e = int(np.searchsorted(ends, t, side="right"))  # the emission holding token t
            if e >= len(doc):
                cuts.append((len(doc), 0))
                continue
            before = int(ends[e - 1]) if e else 0
            off = int(start[e]) + ((t - before + unit // 2) // unit) * unit
            if off <= start[e]:
                cuts.append((e, int(start[e])))
            elif off >= stop[e]:
                cuts.append((e + 1, int(start[e + 1]) if e + 1 < len(doc) else 0))
            else:
                cuts.append((e, off))
        edges = [(0, int(start[0]) if len(doc) else 0), *cuts, (len(doc), 0)]
        for k in range(parts):
            (e0, o0), (e1, o1) = edges[k], edges[k + 1]
            hi_e = e1 + 1 if o1 > (start[e1] if e1 < len(doc) else 0) else e1  # e1 partly ours
            sl = slice(e0, hi_e)
            st, sp = start[sl].copy(), stop[sl].copy()
            if len(st):
                st[0] = max(st[0], o0) if e0 < len(doc) else st[0]
                if hi_e > e1:
                    sp[-1] = o1
            keep = sp > st
            out[k][key] = (doc[sl][keep], take[sl][keep], st[keep], sp[keep])
    return out


def plan_partitions(data_cfg, cache: TokenCache, plan: MixturePlan) -> list[dict]:
    """Pass 2's partitions of the planned stream (each a stretch of every bucket's emissions), as
    `prepare_data`'s tasks and `packed_dataset` both run them."""
    return partition_emissions(bucket_emissions(cache, plan, data_cfg.seed), pack_partition_count(data_cfg, plan),
                               plan.chunk_len or data_cfg.seq_len)


def partition_row_count(cfg_json: str, cache: TokenCache, plan: MixturePlan, emissions: dict) -> dict:
    """Rows partition `emissions` packs into (`rows`), from the lengths alone (no token read): the driver
    numbers rows and shards from these before any partition writes. `cpu_s`: the CPU time it took."""
    cfg = JobConfig.model_validate_json(cfg_json)
    storage.configure(cfg.storage)
    c0 = time.process_time()
    rows = sum(1 for _ in _packed_rows(cfg, cache, plan, make_packer(cfg.data), None, emissions, tokens=False))
    return {"rows": rows, "cpu_s": time.process_time() - c0}


def write_partition(cfg_json: str, cache: TokenCache, plan: MixturePlan, pad_id: int, emissions: dict,
                    row_offset: int, shard_offset: int, staging: str) -> dict:
    """One pass-2 partition: pack its rows (row ids from `row_offset`) and write them as shards
    `part-{shard_offset + i:05d}.parquet` of rows_per_shard rows under `staging` (local folder or s3:// prefix).
    Returns the shard entries, the packer's stats, per-source output statistics and the node it ran on."""
    cfg = JobConfig.model_validate_json(cfg_json)
    storage.configure(cfg.storage)
    c0 = time.process_time()
    out_stats: dict[str, LengthAccumulator] = {}
    packer = make_packer(cfg.data)
    shards = []
    for i, table in enumerate(packed_row_tables(cfg, cache, plan, pad_id, out_stats, packer,
                                                emissions=emissions, row_offset=row_offset)):
        name = f"part-{shard_offset + i:05d}.parquet"
        shards.append({"path": name, "rows": table.num_rows, "row_id_start": int(table.column("row_id")[0].as_py()),
                       **write_shard(table, staging, name)})
    return {"shards": shards, "stats": packer.stats, "out_stats": out_stats, "node": _node_id(),
            "cpu_s": time.process_time() - c0}


def write_shard(table: pa.Table, staging: str, name: str) -> dict:
    """Write one shard (zstd Parquet) under a local folder or an s3:// prefix; its bytes and sha256."""
    remote = storage.is_s3(staging)
    with (tempfile.TemporaryDirectory(prefix="longctx-shard-") if remote else contextlib.nullcontext(staging)) as folder:
        path = os.path.join(folder, name)
        groups = write_shard_file(table, path)
        if remote:
            fs, key = storage.fsspec_fs(storage.join(staging, name))
            storage.retry_io(lambda: fs.put_file(path, key), f"upload {name}")
        return {"bytes": os.path.getsize(path), "sha256": storage.sha256_file(path), "row_groups": groups}


def _node_id() -> str:
    try:
        import ray  # deferred: heavy import, used only here

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - only a label for the record
        return ""


def run_pass2(cfg, cache: TokenCache, plan: MixturePlan, pad_id: int, staging: str,
              use_ray: bool | None = None) -> dict:
    """Pass 2 over deterministic partitions: the driver plans (emission order, partition cuts), one Ray task per
    partition counts its rows from the lengths, the driver numbers rows and shards, one Ray task per partition
    packs and writes its shards. Without Ray (not initialised) the same functions run here, one after the other:
    the bytes are the same (`use_ray=False` forces that). Returns shards (in order), summed pack stats, merged
    output stats and the nodes the write tasks ran on."""
    d = cfg.data
    emissions = plan_partitions(d, cache, plan)
    parts = len(emissions)
    cfg_json = cfg.model_dump_json()
    import ray  # deferred: heavy import, used only here

    use_ray = ray.is_initialized() if use_ray is None else use_ray
    if use_ray:
        opts = {"num_cpus": cfg.ray.data_cpus_per_task, "max_retries": 3}
        if cfg.ray.data_resources:
            opts["resources"] = dict(cfg.ray.data_resources)
        if not cache.chunks:
            # NOTE: a cache the driver wrote (one local file per source) is on this node only: run the tasks here
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # deferred: heavy import, used only here

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=False)
        cache_ref, plan_ref = ray.put(cache), ray.put(plan)
    if parts == 1:  # nothing to number: one partition starts at row 0, shard 0
        counts = [{"rows": None, "cpu_s": 0.0}]
    elif use_ray:
        count = ray.remote(partition_row_count).options(**opts)
        counts = ray.get([count.remote(cfg_json, cache_ref, plan_ref, em) for em in emissions])
    else:
        counts = [partition_row_count(cfg_json, cache, plan, em) for em in emissions]
    rows = [c["rows"] or 0 for c in counts]
    row_offsets = np.concatenate([[0], np.cumsum(rows)]).astype(int).tolist()
    shard_counts = [-(-r // d.rows_per_shard) for r in rows]
    shard_offsets = np.concatenate([[0], np.cumsum(shard_counts)]).astype(int).tolist()
    args = [(em, row_offsets[k], shard_offsets[k], staging) for k, em in enumerate(emissions)]
    if use_ray:
        write = ray.remote(write_partition).options(**opts)
        results = ray.get([write.remote(cfg_json, cache_ref, plan_ref, pad_id, *a) for a in args])
    else:
        results = [write_partition(cfg_json, cache, plan, pad_id, *a) for a in args]
    stats = PackStats()
    out_stats: dict[str, LengthAccumulator] = {}
    shards = []
    rows = [r["stats"].rows for r in results] if parts == 1 else rows
    for r, n in zip(results, rows):
        if r["stats"].rows != n:
            raise RuntimeError(f"pass 2: a partition packed {r['stats'].rows} rows, its layout said {n}")
        shards += r["shards"]
        stats.merge(r["stats"])
        for s, acc in r["out_stats"].items():
            out_stats.setdefault(s, LengthAccumulator(d.long_threshold)).merge(acc)
    if d.cip.fraction > 0:  # the manifest's params record the CIP share
        plan.params["cip"] = cip_params(d.cip.k, d.cip.fraction, stats.rows)
    return {"shards": shards, "stats": stats, "out_stats": dict(sorted(out_stats.items())), "partitions": parts,
            "rows_per_partition": rows, "nodes": [r["node"] for r in results],
            "task_cpu_s": sum(c["cpu_s"] for c in counts) + sum(r["cpu_s"] for r in results)}


def _cip_hook(cip_cfg):
    """data.cip: rewrite a share of the packed rows as CIP-k rows (longctx.data.cip); identity when off."""
    if cip_cfg.fraction <= 0:
        return lambda table: table
    return lambda table: cip_table(table, cip_cfg.k, cip_cfg.fraction)


# ------------------------------------------------------------------------------------------- entry points
def prepare_data(cfg, output: str | None = None, overwrite: bool = False) -> dict:
    """Prepare packed training data for `cfg` (a JobConfig) and publish it atomically; returns the manifest
    (as written to manifest.json) plus `uri`, `rows`, `tokens`, `pad_fraction` and `timings` for convenience.

    Output (local or s3://): `part-NNNNN.parquet` shards, `manifest.json`, `lengths.png`,
    `_quarantine/records.jsonl`, and the `_COMMITTED` marker written last."""
    d = cfg.data
    dest = output or d.output
    if not dest:
        raise ValueError("no output location: set data.output (local folder or s3:// prefix) or pass output=")
    storage.configure(cfg.storage)
    if not overwrite and storage.is_committed(dest):  # found before pass 1 reads a single corpus file
        raise storage.StorageError(f"{storage.normalize(dest)}: already published (pass overwrite=True, choose a "
                                   f"fresh location, or name it as data.prepared to train on it)")
    storage.check_destination(dest, overwrite, kind=PACKED_KIND)  # a foreign folder: refused before pass 1 too
    t0 = time.time()
    load_fast_tokenizer(d.tokenizer)  # fail fast on a bad tokenizer, before any Ray work
    work = cleanup.work_dir("tokens")  # removes those of dead runs; holds only the quarantine list
    shared = shared_cache_root(dest)
    try:
        cache = tokenize_corpus(cfg, work, shared_root=shared)
        result = pack_and_publish(cfg, cache, dest, overwrite=overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        storage.remove_tree(shared)
    result["pass1"] = {"nodes": list(cache.nodes)}
    result["timings"]["total_s"] = round(time.time() - t0, 3)
    print(f"packed {result['rows']} rows x {d.seq_len} tokens ({result['tokens']:,} tokens, pad "
          f"{100 * result['pad_fraction']:.3f}%), {cache.bad} records quarantined, "
          f"{result['timings']['total_s']:.1f}s -> {result['uri']}")
    return result


def shared_cache_root(dest: str) -> str:
    """Where pass 1's tokenize tasks write the token cache: a fresh folder or s3:// prefix next to the output
    (`longctx-tokens-<owner>`), which every node can read when the output is shared storage (s3://, or a shared
    folder on a cluster). Removed when the preparation ends; a local one of a killed run goes with the next."""
    dest = storage.normalize(dest)
    if storage.is_s3(dest):
        parent = dest.rstrip("/").rsplit("/", 1)[0]
        return f"{parent}/{cleanup.owned_name('longctx-tokens-')}"
    parent = os.path.dirname(dest.rstrip("/")) or "."
    os.makedirs(parent, exist_ok=True)
    return cleanup.work_dir("tokens", parent=parent)


def pack_and_publish(cfg, cache: TokenCache, dest: str, overwrite: bool = False, quiet: bool = False) -> dict:
    """Quarantine check, mixture plan, pass 2 and atomic publish for a finished pass 1 (no Ray needed)."""
    d = cfg.data
    t_pack = time.time()
    tok, eos, pad = load_fast_tokenizer(d.tokenizer)
    bad_fraction = check_bad_fraction(cache, d.max_bad_fraction)
    in_lengths = cache.source_lengths()
    in_stats = source_length_stats(in_lengths, d.long_threshold)
    if not quiet:
        print(format_length_table(in_stats, d.long_threshold), flush=True)
    plan = plan_mixture(in_lengths, effective_data_config(cfg), cache.estimated_tokens or None)
    with storage.publish_dir(dest, overwrite=overwrite, shared=True, kind=PACKED_KIND) as staging:
        p2 = run_pass2(cfg, cache, plan, pad, staging)
        shards, pack_stats, out_stats = p2["shards"], p2["stats"], p2["out_stats"]
        small = cleanup.work_dir("publish-small")  # the driver's own files, copied into the staging location
        try:
            os.makedirs(os.path.join(small, "_quarantine"))
            qpath = os.path.join(small, QUARANTINE_FILE)
            if cache.quarantine_path and os.path.exists(cache.quarantine_path):
                shutil.copyfile(cache.quarantine_path, qpath)
            else:
                open(qpath, "w").close()
            plot_length_histogram(in_lengths, os.path.join(small, "lengths.png"), seq_len=d.seq_len,
                                  long_threshold=d.long_threshold,
                                  title="input tokens by document length, per source")
            manifest = build_manifest(cfg, tok, eos, pad, cache, plan, in_stats, out_stats, pack_stats, shards,
                                      bad_fraction)
            with open(os.path.join(small, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=2)
            storage.upload_dir(small, staging)
        finally:
            shutil.rmtree(small, ignore_errors=True)
    timings = {"tokenize_s": round(cache.seconds, 3), "pack_write_s": round(time.time() - t_pack, 3)}
    # Convenience keys for callers (not in manifest.json, which stays deterministic).
    return {**manifest, "uri": storage.normalize(dest), "rows": pack_stats.rows, "tokens": pack_stats.tokens,
            "pad_fraction": manifest["totals"]["pad_fraction"], "timings": timings,
            "pass2": {"partitions": p2["partitions"], "rows": p2["rows_per_partition"], "nodes": p2["nodes"],
                      "task_cpu_s": round(p2["task_cpu_s"], 3)}}


def load_manifest(uri: str) -> dict:
    """The manifest of a committed packed-data folder (raises StorageError when it is not committed)."""
    return _manifest_and_root(uri)[0]


def _manifest_and_root(uri: str) -> tuple[dict, str]:
    """(manifest, folder of the committed files): the shards' `path`s are relative to that folder, which is a
    generation folder after an S3 overwrite (storage.committed_root)."""
    return storage.read_committed(uri, lambda root: (json.loads(storage.read_text(storage.join(root, MANIFEST))), root))


def read_packed(uri: str):
    """Packed rows of a committed folder as a ray.data.Dataset (row order = row_id order per shard).

    Columns as in schemas/packed_sequence.schema.json; `input_ids`, `position_ids`, `labels` convert to numpy
    int32 arrays of shape [seq_len] (batch_format="numpy" gives [batch, seq_len])."""
    import ray.data  # deferred: heavy import, used only here

    manifest, root = _manifest_and_root(uri)
    paths = [storage.join(root, s["path"]) for s in manifest["shards"]]
    if not paths:
        raise storage.StorageError(f"{uri}: manifest lists no shards (the corpus produced no rows)")
    fs, _ = storage.pyarrow_fs(paths[0])
    local = [p[len("s3://"):] if storage.is_s3(p) else p for p in paths]
    ds = ray.data.read_parquet(local, filesystem=fs, shuffle=None)
    return ds.map_batches(fixed_length_columns, batch_format="pyarrow", fn_kwargs={"seq_len": manifest["seq_len"]},
                          num_cpus=0.05)


FIXED_COLUMNS = ("input_ids", "position_ids", "labels")


def fixed_length_columns(batch: pa.Table, seq_len: int) -> pa.Table:
    """list<int32> columns of length seq_len -> Ray tensor columns, so numpy batches are [rows, seq_len] int32."""
    from ray.data.extensions import ArrowTensorArray  # deferred: heavy import, used only here

    for name in FIXED_COLUMNS:
        col = batch.column(name).combine_chunks()
        values = col.flatten().to_numpy().reshape(-1, seq_len)
        batch = batch.set_column(batch.schema.get_field_index(name), name, ArrowTensorArray.from_numpy(values))
    return batch


def _pack_in_task(batch: dict, cfg_json: str, cache: TokenCache, plan: MixturePlan, pad_id: int,
                  rows_per_block: int) -> Iterator[pa.Table]:
    """Ray Data function for `packed_dataset`: runs pass 2 where the cache is and yields row tables."""
    cfg = JobConfig.model_validate_json(cfg_json)
    d = cfg.data
    row = 0
    for em in plan_partitions(d, cache, plan):  # the partitions prepare_data's tasks write, one after the other: the same rows and ids
        for table in packed_row_tables(cfg, cache, plan, pad_id, rows_per_table=rows_per_block, emissions=em,
                                       row_offset=row):
            row += table.num_rows
            yield fixed_length_columns(table, d.seq_len)


def packed_dataset(cfg):
    """Packed rows for `cfg` as a streaming ray.data.Dataset, without writing shards (same rows, same order
    and row_ids as `prepare_data` writes).

    Pass 1 (tokenize, quarantine checks, plan) runs now; pass 2 (mix + pack) runs lazily in one Ray task pinned
    to this node, where the token cache lives (a temp folder removed when this process exits). Iterating the
    dataset again replays the same rows."""
    import ray  # deferred: heavy import, used only here
    import ray.data  # deferred: heavy import, used only here
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # deferred: heavy import, used only here

    d = cfg.data
    storage.configure(cfg.storage)
    _, _, pad = load_fast_tokenizer(d.tokenizer)
    work = cleanup.work_dir("stream")  # removes those of dead runs
    atexit.register(shutil.rmtree, work, True)
    cache = tokenize_corpus(cfg, work)
    check_bad_fraction(cache, d.max_bad_fraction)
    plan = plan_mixture(cache.source_lengths(), effective_data_config(cfg), cache.estimated_tokens or None)
    rows_per_block = max(1, min(d.rows_per_shard, (64 << 20) // (12 * d.seq_len)))
    node = ray.get_runtime_context().get_node_id()
    ds = ray.data.from_items([{"stream": 0}])
    return ds.map_batches(
        _pack_in_task, batch_size=1, batch_format="numpy",
        fn_kwargs={"cfg_json": cfg.model_dump_json(), "cache": cache, "plan": plan, "pad_id": pad,
                   "rows_per_block": rows_per_block},
        num_cpus=cfg.ray.data_cpus_per_task,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    )


def length_stats(cfg, plot: str | None = None, quiet: bool = False) -> dict:
    """Per-source length statistics of the configured sources (no packing, nothing cached).

    Returns {"sources": {name: {...}, "__all__": {...}}, "quarantine": {...}, "long_threshold": N}; prints the
    table; writes a PNG histogram to `plot` (local path) when given."""
    storage.configure(cfg.storage)
    work = cleanup.work_dir("stats")  # removes those of dead runs
    try:
        cache = tokenize_corpus(cfg, work, with_tokens=False)
        lengths = cache.source_lengths()
        stats = source_length_stats(lengths, cfg.data.long_threshold)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(format_length_table(stats, cfg.data.long_threshold))
    if plot:
        plot_length_histogram(lengths, plot, seq_len=cfg.data.seq_len, long_threshold=cfg.data.long_threshold)
    return {"long_threshold": cfg.data.long_threshold, "sources": stats,
            "quarantine": {"records": cache.bad, "by_reason": dict(sorted(cache.bad_by_reason.items()))},
            "records": cache.good + cache.bad, "files": cache.files}
