"""CIP-k, chunk-interleaved pretraining (LongSkywork): packed rows whose documents are cut into k chunks each and
emitted chunk-round by chunk-round, so the model must reach far back to continue each document.

A row of the packed contract already holds documents whose total fits `seq_len`, in the source mix of the
length plan (`pack.py` chose them best-fit). CIP-k rewrites such a row:

    documents  A = a1 a2,  B = b1 b2,  C = c1 c2          (each cut into k=2 contiguous chunks, in order)
    CIP row    a1 b1 c1 a2 b2 c2 [pad]

- chunk sizes differ by at most one token (a document shorter than k tokens has fewer, non-empty chunks);
- position ids are 0..seq_len-1 and the row is meant for full causal attention: document masking would hide
  a1 from a2 and remove the very signal CIP is for (trainers derive the mask from position ids, which do not
  restart here);
- `seg_*` columns describe every chunk (its source, document id and the document's full token length), so
  `seg_doc_ids` read in order lists each document once per chunk round; padding stays the last segment;
- labels move with their tokens (-100 stays on padding and on anything that had no loss before).

Which rows: with `fraction` f, row r is rewritten when floor((r+1)·f) > floor(r·f), which spreads exactly
floor(N·f) CIP rows evenly over N rows, whatever the batching (a pure function of row_id).

Entry points:
    table = cip_table(table, k=2, fraction=0.5)        # pyarrow packed rows -> packed rows (list or tensor columns)
    ds = cip_dataset(read_packed(uri), k=2, fraction=1.0)   # the same as a Ray Data stage
    manifest = synth_cip(cfg, output, packed=uri)       # write a CIP version of packed data (atomic, manifest)
`data.cip.fraction` > 0 applies `cip_table` inside the data engine's packing pass (pipeline.packed_row_tables).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pyarrow as pa

from longctx import storage
from longctx.data.pack import PACKED_SCHEMA
from longctx.data.synthetic.common import histogram

FIXED = ("input_ids", "position_ids", "labels")


def is_cip_row(row_id: int, fraction: float) -> bool:
    """Whether row `row_id` is a CIP row at share `fraction` (exactly floor(N·fraction) of rows 0..N-1)."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    return math.floor((row_id + 1) * fraction) > math.floor(row_id * fraction)


def cip_row_count(rows: int, fraction: float) -> int:
    """CIP rows among rows 0..rows-1: the selections telescope to floor(rows·fraction)."""
    if fraction <= 0:
        return 0
    return rows if fraction >= 1 else math.floor(rows * fraction)


def chunk_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """k contiguous (start, end) chunks of n tokens, sizes differing by at most one; empty chunks dropped."""
    q, r = divmod(n, k)
    bounds, start = [], 0
    for i in range(k):
        size = q + (1 if i < r else 0)
        if size:
            bounds.append((start, start + size))
        start += size
    return bounds


def interleave_row(ids: np.ndarray, labels: np.ndarray, seg_lengths: list[int], seg_sources: list[str],
                   seg_doc_ids: list[str], seg_doc_tokens: list[int], k: int):
    """One row's CIP-k rewrite: (ids, labels, seg_lengths, seg_sources, seg_doc_ids, seg_doc_tokens)."""
    offsets = np.concatenate([[0], np.cumsum(seg_lengths)]).astype(np.int64)
    pad = seg_doc_ids[-1] == "" and seg_sources[-1] == "" if seg_lengths else False
    docs = range(len(seg_lengths) - 1 if pad else len(seg_lengths))
    chunks = [[(offsets[j] + a, offsets[j] + b) for a, b in chunk_bounds(int(seg_lengths[j]), k)] for j in docs]
    order: list[tuple[int, int, int]] = []  # (segment, start, end) in emission order
    for i in range(k):
        for j in docs:
            if i < len(chunks[j]):
                order.append((j, *chunks[j][i]))
    if pad:
        order.append((len(seg_lengths) - 1, int(offsets[-2]), int(offsets[-1])))
    index = np.concatenate([np.arange(a, b) for _, a, b in order]) if order else np.zeros(0, np.int64)
    return (ids[index], labels[index], [b - a for _, a, b in order], [seg_sources[j] for j, _, _ in order],
            [seg_doc_ids[j] for j, _, _ in order], [int(seg_doc_tokens[j]) for j, _, _ in order])


def _matrix(col, rows: int) -> tuple[np.ndarray, bool]:
    """[rows, seq_len] numpy of a list<int32> or Ray tensor column; True when it was a tensor column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col.type, (pa.ListType, pa.LargeListType)):
        return col.flatten().to_numpy().reshape(rows, -1), False
    return np.asarray(col.to_numpy(zero_copy_only=False)).reshape(rows, -1), True


def cip_table(table: pa.Table, k: int = 2, fraction: float = 1.0) -> pa.Table:
    """Packed rows -> the same rows with the CIP-selected ones rewritten (see module docstring). Works on the
    Parquet form (list<int32> columns) and on `read_packed`'s tensor form, and returns the same form."""
    n = table.num_rows
    row_ids = table.column("row_id").to_numpy()
    chosen = [r for r in range(n) if is_cip_row(int(row_ids[r]), fraction)]
    if not chosen or k < 1:
        return table
    mats, tensor = {}, False
    for c in FIXED:
        mats[c], tensor = _matrix(table.column(c), n)
        mats[c] = mats[c].copy()
    seg = {c: table.column(c).to_pylist() for c in ("seg_lengths", "seg_sources", "seg_doc_ids", "seg_doc_tokens")}
    seq_len = mats["input_ids"].shape[1]
    for r in chosen:
        ids, labels, lengths, sources, doc_ids, doc_tokens = interleave_row(
            mats["input_ids"][r], mats["labels"][r], seg["seg_lengths"][r], seg["seg_sources"][r],
            seg["seg_doc_ids"][r], seg["seg_doc_tokens"][r], k)
        mats["input_ids"][r], mats["labels"][r] = ids, labels
        mats["position_ids"][r] = np.arange(seq_len, dtype=mats["position_ids"].dtype)
        seg["seg_lengths"][r], seg["seg_sources"][r] = lengths, sources
        seg["seg_doc_ids"][r], seg["seg_doc_tokens"][r] = doc_ids, doc_tokens
    out = table
    for c in FIXED:
        if tensor:
            from ray.data.extensions import ArrowTensorArray

            arr = ArrowTensorArray.from_numpy(mats[c].astype(np.int32, copy=False))
        else:
            offs = pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32))
            arr = pa.ListArray.from_arrays(offs, pa.array(mats[c].reshape(-1).astype(np.int32, copy=False)))
        out = out.set_column(out.schema.get_field_index(c), c, arr)
    for c, values in seg.items():
        out = out.set_column(out.schema.get_field_index(c), c, pa.array(values, PACKED_SCHEMA.field(c).type))
    return out


def cip_dataset(ds, k: int = 2, fraction: float = 1.0, num_cpus: float = 0.25):
    """Ray Data stage: packed rows (e.g. `read_packed(uri)` or `packed_dataset(cfg)`) -> CIP-k rows."""
    return ds.map_batches(cip_table, batch_format="pyarrow", fn_kwargs={"k": k, "fraction": fraction},
                          num_cpus=num_cpus)


def cip_params(k: int, fraction: float, rows: int) -> dict:
    """What the packed manifest records under params.cip."""
    return {"k": k, "fraction": fraction, "rows": cip_row_count(rows, fraction),
            "attention": "full (position ids 0..seq_len-1)"}


def synth_cip(cfg, output: str, packed: str | None = None, fraction: float | None = None,
              overwrite: bool = False) -> dict:
    """Write CIP-k packed Long-PT data at `output` (Parquet shards + manifest.json, published atomically).

    With `packed` (a committed packed folder): its rows go through the Ray Data stage `cip_dataset` and the
    manifest is the input's with `params.cip` added. Without: the configured corpus is prepared by the data
    engine with `data.cip.fraction` set (`prepare_data`, CIP applied in its packing pass). `fraction` defaults
    to data.cip.fraction, or 1.0 (every row) when that is 0. Returns the manifest plus `uri` and `timings`."""
    from longctx.data.pipeline import ensure_ray, prepare_data

    storage.configure(cfg.storage)
    fraction = fraction if fraction is not None else (cfg.data.cip.fraction or 1.0)
    if not packed:
        cip_cfg = cfg.model_copy(deep=True)
        cip_cfg.data.cip.fraction = fraction
        ensure_ray(cip_cfg)
        return prepare_data(cip_cfg, output, overwrite=overwrite)
    ensure_ray(cfg)
    return _rewrite_packed(cfg, packed, output, cfg.data.cip.k, fraction, overwrite)


def _rewrite_packed(cfg, packed: str, output: str, k: int, fraction: float, overwrite: bool) -> dict:
    import pyarrow.parquet as pq
    import ray.data

    from longctx.data.pipeline import MANIFEST, load_manifest, read_packed

    t0 = time.time()
    manifest = load_manifest(packed)
    seq_len = manifest["seq_len"]
    ds = cip_dataset(read_packed(packed), k, fraction, num_cpus=cfg.ray.data_cpus_per_task)
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # shards keep row_id order: the output is deterministic
    chunks: list[int] = []
    shards, rows, cip_rows = [], 0, 0
    try:
        with storage.publish_dir(output, overwrite=overwrite) as staging:
            for batch in ds.iter_batches(batch_size=cfg.data.rows_per_shard, batch_format="pyarrow"):
                table = _to_parquet_form(batch)
                for rid, ls, ids in zip(table.column("row_id").to_pylist(), table.column("seg_lengths").to_pylist(),
                                        table.column("seg_doc_ids").to_pylist()):
                    if is_cip_row(rid, fraction):
                        cip_rows += 1
                        chunks.extend(n for n, d in zip(ls, ids) if d != "")
                name = f"part-{len(shards):05d}.parquet"
                path = os.path.join(staging, name)
                pq.write_table(table, path, compression="zstd", row_group_size=min(256, table.num_rows))
                shards.append({"path": name, "rows": table.num_rows,
                               "row_id_start": int(table.column("row_id")[0].as_py()),
                               "bytes": os.path.getsize(path), "sha256": storage.sha256_file(path)})
                rows += table.num_rows
            manifest["shards"] = shards
            manifest["params"]["cip"] = {**cip_params(k, fraction, rows), "input": storage.normalize(packed),
                                         "chunks": len(chunks), "chunk_tokens": histogram(chunks, 0, seq_len)}
            with open(os.path.join(staging, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=2)
    finally:
        ctx.execution_options.preserve_order = old_order
    if cip_rows != manifest["params"]["cip"]["rows"]:
        raise RuntimeError(f"CIP rewrote {cip_rows} rows, expected {manifest['params']['cip']['rows']}")
    secs = time.time() - t0
    return {**manifest, "uri": storage.normalize(output), "rows": rows,
            "timings": {"seconds": round(secs, 3), "rows_per_s": round(rows / secs, 2),
                        "tokens_per_s": round(rows * seq_len / secs, 1)}}


def _to_parquet_form(batch: pa.Table) -> pa.Table:
    """Tensor columns back to list<int32>, columns in PACKED_SCHEMA order."""
    n = batch.num_rows
    cols = {}
    for f in PACKED_SCHEMA:
        col = batch.column(f.name)
        if f.name in FIXED:
            m, _ = _matrix(col, n)
            offs = pa.array(np.arange(0, (n + 1) * m.shape[1], m.shape[1], dtype=np.int32))
            col = pa.ListArray.from_arrays(offs, pa.array(m.reshape(-1).astype(np.int32, copy=False)))
        cols[f.name] = col
    return pa.table(cols, schema=PACKED_SCHEMA)
