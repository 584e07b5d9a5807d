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
import os
import time

import numpy as np
import pyarrow as pa

from longctx import storage
from longctx.data.cip import FIXED, cip_dataset, cip_params, column_matrix, is_cip_row
from longctx.data.pack import PACKED_KIND, PACKED_SCHEMA, write_shard_file
from longctx.data.pipeline import MANIFEST, load_manifest, prepare_data, read_packed
from longctx.data.synthetic.common import histogram
from longctx.raycluster import connect as ensure_ray


def synth_cip(cfg, output: str, packed: str | None = None, fraction: float | None = None,
              overwrite: bool = False) -> dict:
    """Write CIP-k packed Long-PT data at `output` (Parquet shards + manifest.json, published atomically).

    With `packed` (a committed packed folder): its rows go through the Ray Data stage `cip_dataset` and the
    manifest is the input's with `params.cip` added. Without: the configured corpus is prepared by the data
    engine with `data.cip.fraction` set (`prepare_data`, CIP applied in its packing pass). `fraction` defaults
    to data.cip.fraction, or 1.0 (every row) when that is 0. Returns the manifest plus `uri` and `timings`."""
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
    import ray.data  # deferred: heavy import, used only here

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
        with storage.publish_dir(output, overwrite=overwrite, kind=PACKED_KIND) as staging:
            for batch in ds.iter_batches(batch_size=cfg.data.rows_per_shard, batch_format="pyarrow"):
                table = _to_parquet_form(batch)
                for rid, ls, ids in zip(table.column("row_id").to_pylist(), table.column("seg_lengths").to_pylist(),
                                        table.column("seg_doc_ids").to_pylist()):
                    if is_cip_row(rid, fraction):
                        cip_rows += 1
                        chunks.extend(n for n, d in zip(ls, ids) if d != "")
                name = f"part-{len(shards):05d}.parquet"
                path = os.path.join(staging, name)
                groups = write_shard_file(table, path)
                shards.append({"path": name, "rows": table.num_rows,
                               "row_id_start": int(table.column("row_id")[0].as_py()),
                               "bytes": os.path.getsize(path), "sha256": storage.sha256_file(path),
                               "row_groups": groups})
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
            m, _ = column_matrix(col, n)
            offs = pa.array(np.arange(0, (n + 1) * m.shape[1], m.shape[1], dtype=np.int32))
            col = pa.ListArray.from_arrays(offs, pa.array(m.reshape(-1).astype(np.int32, copy=False)))
        cols[f.name] = col
    return pa.table(cols, schema=PACKED_SCHEMA)
