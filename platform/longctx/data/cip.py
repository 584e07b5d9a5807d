"""The CIP-k row rewrite itself (LongSkywork's chunk-interleaved pretraining), a pure function of the packed rows:
what `data.cip.fraction` applies inside the data engine's packing pass and what `longctx.data.synthetic.cip`
(the `longctx data synth cip` job) runs over a committed packed folder. Described in
`longctx.data.synthetic.cip`; kept here, below the data engine, so the engine imports no job code.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from longctx.data.pack import PACKED_SCHEMA

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


def column_matrix(col, rows: int) -> tuple[np.ndarray, bool]:
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
        mats[c], tensor = column_matrix(table.column(c), n)
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
            from ray.data.extensions import ArrowTensorArray  # deferred: heavy import, used only here

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
