"""The data engine: sources -> validated records -> tokens -> length mixture -> packed rows -> Parquet shards.

Public entry points (the CLI and jobs call these):

    manifest = prepare_data(cfg)              # writes shards + manifest.json under cfg.data.output, atomically
    ds = read_packed(manifest_uri_or_dir)     # ray.data.Dataset of packed rows (checks the commit marker)
    ds = packed_dataset(cfg)                  # same rows, streamed straight to training without writing
    stats = length_stats(cfg)                 # per-source length table only (`longctx data stats`)

Two passes (why: per-source upsampling needs each source's length distribution before it can choose):
  pass 1  Ray Data: one read task per file (our own parser, quarantine rows instead of errors) -> tokenizer
          actor pool. The driver consumes the stream in a fixed order (preserve_order) and appends tokens to a
          per-source Parquet cache on local disk, keeping only the lengths in memory (4 bytes per document).
          With data.token_budget + data.read_margin, sources are read only as far as the budget needs
          (data/budget.py) and the stream stops there.
  plan    `mixture.plan_mixture` turns the lengths into per-document repeat counts (no tokens touched).
  pass 2  stream the cache source by source in seeded row-group order, interleave the (source, long) streams by
          deficit against their planned shares, pack best-fit decreasing over a bounded buffer, emit rows through
          a pool that keeps every stretch of rows on the target mix, and write shards of `rows_per_shard` rows.
          Memory stays bounded by two cache row groups per source plus the pack buffer and the row pool.
Same input + config + seed -> byte-identical shards (order is fixed everywhere; the sha256 of every shard is in
the manifest). See data/README.md for the numbered walk-through.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longctx import cleanup, storage
from longctx.data.mixture import MixturePlan, SourcePlan, plan_mixture
from longctx.data.pack import BestFitPacker, ConcatPacker, RowBuilder, Segment
from longctx.data.stats import LengthAccumulator, format_length_table, plot_length_histogram, source_length_stats
from longctx.data.token_cache import (  # noqa: F401 - re-exported: callers import these from the pipeline
    DataQualityError,
    TokenCache,
    check_bad_fraction,
    ensure_ray,
    tokenize_corpus,
)
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


def _source_segments(cache: TokenCache, source: str, plan: SourcePlan, seed: int, chunk_len: int | None,
                     piece_len: int | None, docs: np.ndarray | None) -> Iterator[Segment]:
    """Documents of one source as the plan says: pass p emits every document with counts > p, row groups in a
    seeded order, documents shuffled inside each row group. `docs` (bool per document) keeps only those
    documents (the long or the short ones); `piece_len` cuts longer documents into pieces of that many tokens
    (the first piece marked `split`), so that one long document cannot fill a stretch of rows by itself."""
    counts = plan.counts if docs is None else np.where(docs, plan.counts, 0)
    if not counts.any():
        return
    pf = pq.ParquetFile(cache.path(source))
    sizes = cache.row_groups[source]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    sidx = sorted(cache.lengths).index(source)
    for p in range(int(counts.max())):
        rng = np.random.default_rng([seed, sidx, p])
        for rg in rng.permutation(len(sizes)):
            lo, hi = int(offsets[rg]), int(offsets[rg + 1])
            sel = np.flatnonzero(plan.counts[lo:hi] > p)
            # NOTE: the permutation is drawn over every eligible document, then filtered: the long and the short
            # stream of a source see the same seeded order as one stream would.
            order = rng.permutation(sel)
            if docs is not None:
                order = order[docs[lo + order]]
            if not len(order):
                continue
            table = pf.read_row_group(int(rg))
            tokens = table.column("tokens").combine_chunks()
            values = tokens.values.to_numpy()
            offs = tokens.offsets.to_numpy()
            ids = table.column("doc_id").to_pylist()
            for i in order:
                d = lo + int(i)
                toks = values[offs[i]:offs[i + 1]]
                if plan.counts[d] == p + 1:
                    toks = toks[: plan.last_take[d]]
                if chunk_len:
                    parts = [(toks[c:c + chunk_len], None) for c in range(0, len(toks), chunk_len)]
                else:
                    parts = [(toks, int(plan.lengths[d]))]
                for part, doc_tokens in parts:
                    n = len(part) if doc_tokens is None else doc_tokens
                    if piece_len and len(part) > piece_len:
                        for j, c in enumerate(range(0, len(part), piece_len)):
                            yield Segment(part[c:c + piece_len], source, ids[i], n, split=j == 0, piece=j)
                    else:
                        yield Segment(part, source, ids[i], n)


def mixed_segments(cache: TokenCache, plan: MixturePlan, seed: int,
                   piece_len: int | None = None) -> Iterator[Segment]:
    """Interleave the sources' segment streams so that every stretch of the output has the target mix.

    Deficit interleaving, deterministic: the streams are the (source, long) buckets of `mix_buckets`; the next
    segment comes from the bucket furthest behind its planned share, measured as (emitted + half the next
    segment) / planned tokens (ties: a seeded bucket order). Source shares and the long share therefore stay on
    target at every prefix, up to one segment; `piece_len` (seq_len) bounds a segment."""
    targets = mix_buckets(plan)
    keys = list(targets)
    thr = int(plan.params.get("long_threshold", 0) or 0)
    streams = []
    for s, long in keys:
        sp = plan.sources[s]
        docs = None if (plan.chunk_len or not thr) else (sp.lengths >= thr) == long
        streams.append(_source_segments(cache, s, sp, seed, plan.chunk_len, piece_len, docs))
    want = np.array([targets[k] for k in keys], np.float64)
    emitted = np.zeros(len(keys), np.float64)
    rank = np.random.default_rng([seed, 1_000_003]).permutation(len(keys)).astype(np.float64)
    heads = [next(st, None) for st in streams]
    alive = np.array([h is not None for h in heads])
    while alive.any():
        nxt = np.array([len(h.tokens) if h is not None else 0 for h in heads], np.float64)
        score = np.where(alive, (emitted + nxt / 2) / want, np.inf)
        best = np.flatnonzero(score == score.min())
        k = int(best[np.argmin(rank[best])])
        seg = heads[k]
        emitted[k] += len(seg.tokens)
        heads[k] = next(streams[k], None)
        alive[k] = heads[k] is not None
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


def packed_row_tables(cfg, cache: TokenCache, plan: MixturePlan, pad_id: int,
                      out_stats: dict[str, LengthAccumulator] | None = None,
                      packer: BestFitPacker | None = None, rows_per_table: int | None = None) -> Iterator[pa.Table]:
    """Pass 2: packed rows as Arrow tables of up to `rows_per_table` (default rows_per_shard) rows, row_id
    0..N-1 in order."""
    d = cfg.data
    rows_per_table = rows_per_table or d.rows_per_shard
    packer = packer or make_packer(d)
    builder = RowBuilder(d.seq_len, pad_id, d.attention)
    row_id = 0
    cip = _cip_hook(d.cip)

    def packed() -> Iterator[list[Segment]]:
        for seg in mixed_segments(cache, plan, d.seed, piece_len=d.seq_len):
            if out_stats is not None:
                out_stats.setdefault(seg.source, LengthAccumulator(d.long_threshold)).add(
                    seg.doc_tokens, len(seg.tokens), docs=int(seg.piece == 0))
            yield from packer.add(seg)
        yield from packer.finish()

    def rows() -> Iterator[list[Segment]]:
        if not isinstance(packer, BestFitPacker):  # concat rows are already in stream order
            yield from packed()
            return
        order = MixedRowOrder(mix_buckets(plan), _bucket_key(plan), mix_pool_rows(d.pack_buffer_rows))
        for row in packed():
            yield from order.add(row)
        yield from order.finish()

    for segments in rows():
        builder.add(row_id, segments)
        row_id += 1
        if len(builder) == rows_per_table:
            yield cip(builder.table())
            builder.clear()
    if len(builder):
        yield cip(builder.table())
    if d.cip.fraction > 0:  # the manifest's params record the CIP share (build_manifest copies plan.params)
        from longctx.data.cip import cip_params

        plan.params["cip"] = cip_params(d.cip.k, d.cip.fraction, row_id)


def _cip_hook(cip_cfg):
    """data.cip: rewrite a share of the packed rows as CIP-k rows (longctx.data.cip); identity when off."""
    if cip_cfg.fraction <= 0:
        return lambda table: table
    from longctx.data.cip import cip_table

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
    t0 = time.time()
    load_fast_tokenizer(d.tokenizer)  # fail fast on a bad tokenizer, before any Ray work
    work = cleanup.work_dir("tokens")  # removes those of dead runs
    try:
        cache = tokenize_corpus(cfg, work)
        result = pack_and_publish(cfg, cache, dest, overwrite=overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["timings"]["total_s"] = round(time.time() - t0, 3)
    print(f"packed {result['rows']} rows x {d.seq_len} tokens ({result['tokens']:,} tokens, pad "
          f"{100 * result['pad_fraction']:.3f}%), {cache.bad} records quarantined, "
          f"{result['timings']['total_s']:.1f}s -> {result['uri']}")
    return result


def pack_and_publish(cfg, cache: TokenCache, dest: str, overwrite: bool = False, quiet: bool = False) -> dict:
    """Quarantine check, mixture plan, pass 2 and atomic publish for a finished pass 1 (no Ray needed)."""
    from longctx.data.manifest import build_manifest

    d = cfg.data
    t_pack = time.time()
    tok, eos, pad = load_fast_tokenizer(d.tokenizer)
    bad_fraction = check_bad_fraction(cache, d.max_bad_fraction)
    in_lengths = cache.source_lengths()
    in_stats = source_length_stats(in_lengths, d.long_threshold)
    if not quiet:
        print(format_length_table(in_stats, d.long_threshold), flush=True)
    plan = plan_mixture(in_lengths, d, cache.estimated_tokens or None)
    out_stats: dict[str, LengthAccumulator] = {}
    packer = make_packer(d)
    with storage.publish_dir(dest, overwrite=overwrite) as staging:
        shards = []
        for i, table in enumerate(packed_row_tables(cfg, cache, plan, pad, out_stats, packer)):
            name = f"part-{i:05d}.parquet"
            path = os.path.join(staging, name)
            pq.write_table(table, path, compression="zstd", row_group_size=min(256, table.num_rows))
            shards.append({"path": name, "rows": table.num_rows,
                           "row_id_start": int(table.column("row_id")[0].as_py()),
                           "bytes": os.path.getsize(path), "sha256": storage.sha256_file(path)})
        os.makedirs(os.path.join(staging, "_quarantine"))
        qpath = os.path.join(staging, QUARANTINE_FILE)
        if cache.quarantine_path and os.path.exists(cache.quarantine_path):
            shutil.copyfile(cache.quarantine_path, qpath)
        else:
            open(qpath, "w").close()
        plot_length_histogram(in_lengths, os.path.join(staging, "lengths.png"), seq_len=d.seq_len,
                              long_threshold=d.long_threshold, title="input tokens by document length, per source")
        manifest = build_manifest(cfg, tok, eos, pad, cache, plan, in_stats, out_stats, packer.stats, shards,
                                  bad_fraction)
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    timings = {"tokenize_s": round(cache.seconds, 3), "pack_write_s": round(time.time() - t_pack, 3)}
    # Convenience keys for callers (not in manifest.json, which stays deterministic).
    return {**manifest, "uri": storage.normalize(dest), "rows": packer.stats.rows, "tokens": packer.stats.tokens,
            "pad_fraction": manifest["totals"]["pad_fraction"], "timings": timings}


def load_manifest(uri: str) -> dict:
    """The manifest of a committed packed-data folder (raises StorageError when it is not committed)."""
    storage.require_committed(uri)
    return json.loads(storage.read_text(storage.join(uri, MANIFEST)))


def read_packed(uri: str):
    """Packed rows of a committed folder as a ray.data.Dataset (row order = row_id order per shard).

    Columns as in schemas/packed_sequence.schema.json; `input_ids`, `position_ids`, `labels` convert to numpy
    int32 arrays of shape [seq_len] (batch_format="numpy" gives [batch, seq_len])."""
    import ray.data

    manifest = load_manifest(uri)
    paths = [storage.join(uri, s["path"]) for s in manifest["shards"]]
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
    from ray.data.extensions import ArrowTensorArray

    for name in FIXED_COLUMNS:
        col = batch.column(name).combine_chunks()
        values = col.flatten().to_numpy().reshape(-1, seq_len)
        batch = batch.set_column(batch.schema.get_field_index(name), name, ArrowTensorArray.from_numpy(values))
    return batch


def _pack_in_task(batch: dict, cfg_json: str, cache: TokenCache, plan: MixturePlan, pad_id: int,
                  rows_per_block: int) -> Iterator[pa.Table]:
    """Ray Data function for `packed_dataset`: runs pass 2 where the cache is and yields row tables."""
    from longctx.config import JobConfig

    cfg = JobConfig.model_validate_json(cfg_json)
    for table in packed_row_tables(cfg, cache, plan, pad_id, rows_per_table=rows_per_block):
        yield fixed_length_columns(table, cfg.data.seq_len)


def packed_dataset(cfg):
    """Packed rows for `cfg` as a streaming ray.data.Dataset, without writing shards (same rows, same order
    and row_ids as `prepare_data` writes).

    Pass 1 (tokenize, quarantine checks, plan) runs now; pass 2 (mix + pack) runs lazily in one Ray task pinned
    to this node, where the token cache lives (a temp folder removed when this process exits). Iterating the
    dataset again replays the same rows."""
    import atexit

    import ray
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    d = cfg.data
    storage.configure(cfg.storage)
    _, _, pad = load_fast_tokenizer(d.tokenizer)
    work = cleanup.work_dir("stream")  # removes those of dead runs
    atexit.register(shutil.rmtree, work, True)
    cache = tokenize_corpus(cfg, work)
    check_bad_fraction(cache, d.max_bad_fraction)
    plan = plan_mixture(cache.source_lengths(), d, cache.estimated_tokens or None)
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
