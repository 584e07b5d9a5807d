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
  plan    `mixture.plan_mixture` turns the lengths into per-document repeat counts (no tokens touched).
  pass 2  stream the cache source by source in seeded row-group order, interleave sources by their remaining
          planned tokens, pack best-fit decreasing over a bounded buffer, and write shards of
          `rows_per_shard` rows. Memory stays bounded by one cache row group per source plus the pack buffer.
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
from longctx.data.pack import BestFitPacker, RowBuilder, Segment
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
def _source_segments(cache: TokenCache, source: str, plan: SourcePlan, seed: int,
                     chunk_len: int | None) -> Iterator[Segment]:
    """Documents of one source as the plan says: pass p emits every document with counts > p, row groups in a
    seeded order, documents shuffled inside each row group."""
    if not plan.counts.any():
        return
    pf = pq.ParquetFile(cache.path(source))
    sizes = cache.row_groups[source]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    sidx = sorted(cache.lengths).index(source)
    for p in range(int(plan.counts.max())):
        rng = np.random.default_rng([seed, sidx, p])
        for rg in rng.permutation(len(sizes)):
            lo, hi = int(offsets[rg]), int(offsets[rg + 1])
            sel = np.flatnonzero(plan.counts[lo:hi] > p)
            if not len(sel):
                continue
            table = pf.read_row_group(int(rg))
            tokens = table.column("tokens").combine_chunks()
            values = tokens.values.to_numpy()
            offs = tokens.offsets.to_numpy()
            ids = table.column("doc_id").to_pylist()
            for i in rng.permutation(sel):
                d = lo + int(i)
                toks = values[offs[i]:offs[i + 1]]
                if plan.counts[d] == p + 1:
                    toks = toks[: plan.last_take[d]]
                if chunk_len:
                    for c in range(0, len(toks), chunk_len):
                        piece = toks[c:c + chunk_len]
                        yield Segment(piece, source, ids[i], len(piece))
                else:
                    yield Segment(toks, source, ids[i], int(plan.lengths[d]))


def mixed_segments(cache: TokenCache, plan: MixturePlan, seed: int) -> Iterator[Segment]:
    """Interleave the sources' segment streams, picking the next source with probability proportional to the
    tokens it still has to emit (so every stretch of the output has about the target mix)."""
    names = sorted(plan.sources)
    streams = {s: _source_segments(cache, s, plan.sources[s], seed, plan.chunk_len) for s in names}
    remaining = np.array([plan.sources[s].planned_tokens for s in names], np.float64)
    alive = remaining > 0
    rng = np.random.default_rng([seed, 1_000_003])
    while alive.any():
        w = np.where(alive, np.maximum(remaining, 1.0), 0.0)
        k = int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right"))
        k = min(k, len(names) - 1)
        seg = next(streams[names[k]], None)
        if seg is None:
            alive[k] = False
            continue
        remaining[k] -= len(seg.tokens)
        yield seg


def packed_row_tables(cfg, cache: TokenCache, plan: MixturePlan, pad_id: int,
                      out_stats: dict[str, LengthAccumulator] | None = None,
                      packer: BestFitPacker | None = None, rows_per_table: int | None = None) -> Iterator[pa.Table]:
    """Pass 2: packed rows as Arrow tables of up to `rows_per_table` (default rows_per_shard) rows, row_id
    0..N-1 in order."""
    d = cfg.data
    rows_per_table = rows_per_table or d.rows_per_shard
    packer = packer or BestFitPacker(d.seq_len, d.pack_buffer_rows)
    builder = RowBuilder(d.seq_len, pad_id, d.attention)
    row_id = 0
    cip = _cip_hook(d.cip)

    def rows() -> Iterator[list[Segment]]:
        for seg in mixed_segments(cache, plan, d.seed):
            if out_stats is not None:
                out_stats.setdefault(seg.source, LengthAccumulator(d.long_threshold)).add(seg.doc_tokens,
                                                                                         len(seg.tokens))
            yield from packer.add(seg)
        yield from packer.finish()

    for segments in rows():
        builder.add(row_id, segments)
        row_id += 1
        if len(builder) == rows_per_table:
            yield cip(builder.table())
            builder.clear()
    if len(builder):
        yield cip(builder.table())
    if d.cip.fraction > 0:  # the manifest's params record the CIP share (build_manifest copies plan.params)
        from longctx.data.synthetic.cip import cip_params

        plan.params["cip"] = cip_params(d.cip.k, d.cip.fraction, row_id)


def _cip_hook(cip_cfg):
    """data.cip: rewrite a share of the packed rows as CIP-k rows (longctx.data.synthetic.cip); identity when off."""
    if cip_cfg.fraction <= 0:
        return lambda table: table
    from longctx.data.synthetic.cip import cip_table

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
    plan = plan_mixture(in_lengths, d)
    out_stats: dict[str, LengthAccumulator] = {}
    packer = BestFitPacker(d.seq_len, d.pack_buffer_rows)
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
        plot_length_histogram(in_stats, os.path.join(staging, "lengths.png"),
                              title=f"input tokens by document length (long >= {d.long_threshold})")
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
    plan = plan_mixture(cache.source_lengths(), d)
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
        stats = source_length_stats(cache.source_lengths(), cfg.data.long_threshold)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(format_length_table(stats, cfg.data.long_threshold))
    if plot:
        plot_length_histogram(stats, plot)
    return {"long_threshold": cfg.data.long_threshold, "sources": stats,
            "quarantine": {"records": cache.bad, "by_reason": dict(sorted(cache.bad_by_reason.items()))},
            "records": cache.good + cache.bad, "files": cache.files}
