"""Packed rows -> micro-batches on each training worker, in a deterministic order, with a ledger of what was used.

Two sources of rows:

- Committed Parquet shards (the usual case): the shards, concatenated in manifest order, hold rows 0..N-1; data-
  parallel rank r owns the contiguous stretch [r N / dp, (r + 1) N / dp) (its *lane*, `lane_bounds`) and reads
  only the row groups that hold it (`lane_tables`, row-group sizes from the manifest, else from the footers):
  a rank reads about 1/dp of the bytes, plus the rest of at most one row group at each end of its stretch. Every
  lane is a stretch of the engine's mixed row order, so every lane carries the configured mix. A rank's stream is
  a fixed sequence, the ledger records the row ids consumed per epoch, and after a restart the stream skips
  exactly those (a row group whose rows were all consumed is skipped after reading its row_id column alone):
  every row is used once per epoch across failures and resubmits, and the batches after a resume are the ones an
  uninterrupted run would have seen. Step s of rank r uses lane positions [s k, (s + 1) k), k = micro x
  grad_accum rows (`lane_step_rows` gives the whole run's order).
- A `ray.data.Dataset` (streamed from the data engine): Ray Train's streaming split gives each worker its own
  rows; the ledger still makes a resume skip what was consumed (no row lost or doubled), but Ray Data's split
  makes no ordering promise, so the batches after a resume may differ from an uninterrupted run's.

Within each global batch, rows may then move between ranks to even out attention cost (train/balance.py).

NOTE: Ray Data with `DataConfig(datasets_to_split=[])` (each worker executing the whole dataset) hangs after a
worker-group restart in Ray 2.60: the killed executions keep their CPU reservations and the new ones get a budget
of 0 CPUs. Reading Parquet directly avoids Ray Data in the workers altogether (and its ~40 s start-up on 2 cores).

Sequence-parallel ranks of one group share a dp_rank and therefore read the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from longctx import storage
from longctx.model.attention import attention_inputs, document_ids_from_position_ids
from longctx.train.sequence_parallel import shard_for_rank

REQUIRED_COLUMNS = ("input_ids", "position_ids", "labels", "seg_lengths", "row_id")


@dataclass
class PackedRow:
    row_id: int
    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    seg_lengths: list[int]
    seg_is_pad: list[bool]


@dataclass
class Ledger:
    """Row ids consumed so far by this run, per epoch (what makes resume exact), and those passed over without
    training on them (a step skipped for a non-finite loss, `train.nonfinite=skip`): a resume skips both."""

    consumed: dict[int, set[int]] = field(default_factory=dict)
    skipped: dict[int, set[int]] = field(default_factory=dict)

    def add(self, epoch: int, row_id: int) -> None:
        self.consumed.setdefault(epoch, set()).add(int(row_id))

    def skip(self, epoch: int, row_id: int) -> None:
        self.skipped.setdefault(epoch, set()).add(int(row_id))

    def contains(self, epoch: int, row_id: int) -> bool:
        return int(row_id) in self.consumed.get(epoch, ()) or int(row_id) in self.skipped.get(epoch, ())

    def to_json(self) -> dict:
        out = {"consumed": {str(e): sorted(ids) for e, ids in sorted(self.consumed.items())}}
        if self.skipped:
            out["skipped"] = {str(e): sorted(ids) for e, ids in sorted(self.skipped.items())}
        return out

    @classmethod
    def from_json(cls, data: dict | None) -> "Ledger":
        if not data:
            return cls()
        return cls({int(e): set(int(i) for i in ids) for e, ids in data.get("consumed", {}).items()},
                   {int(e): set(int(i) for i in ids) for e, ids in data.get("skipped", {}).items()})

    @classmethod
    def merge(cls, parts: list["Ledger"]) -> "Ledger":
        out = cls()
        for part in parts:
            for e, ids in part.consumed.items():
                out.consumed.setdefault(e, set()).update(ids)
            for e, ids in part.skipped.items():
                out.skipped.setdefault(e, set()).update(ids)
        return out

    def total(self) -> int:
        return sum(len(v) for v in self.consumed.values())


def rows_from_table(table: pa.Table, where: str) -> Iterator[PackedRow]:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{where}: packed rows lack column(s) {missing}; have {table.column_names}")
    cols = {c: table.column(c).to_pylist() if c in ("seg_lengths", "seg_doc_ids", "row_id") else table.column(c)
            for c in table.column_names if c in (*REQUIRED_COLUMNS, "seg_doc_ids")}
    arrays = {}
    for c in ("input_ids", "position_ids", "labels"):
        chunked = cols[c].combine_chunks() if isinstance(cols[c], pa.ChunkedArray) else cols[c]
        arrays[c] = chunked
    for i in range(table.num_rows):
        seg_doc_ids = cols["seg_doc_ids"][i] if "seg_doc_ids" in cols else None
        lengths = [int(n) for n in cols["seg_lengths"][i]]
        yield PackedRow(
            row_id=int(cols["row_id"][i]),
            input_ids=np.asarray(arrays["input_ids"][i].values, dtype=np.int64),
            position_ids=np.asarray(arrays["position_ids"][i].values, dtype=np.int64),
            labels=np.asarray(arrays["labels"][i].values, dtype=np.int64),
            seg_lengths=lengths,
            seg_is_pad=[d == "" for d in seg_doc_ids] if seg_doc_ids is not None else [False] * len(lengths),
        )


def parquet_tables(files: list[str], read_batch_rows: int = 64) -> Iterator[pa.Table]:
    """Record batches of committed Parquet shards (local or s3://) in a fixed order, as small tables."""
    for uri in files:
        fs, path = storage.pyarrow_fs(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            columns = [c for c in (*REQUIRED_COLUMNS, "seg_doc_ids") if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=read_batch_rows, columns=columns):
                yield pa.Table.from_batches([batch])


@dataclass(frozen=True)
class ShardRows:
    """One committed shard and the rows of each of its row groups, in file order (the manifest's `row_groups`,
    else the Parquet footer's)."""

    uri: str
    row_groups: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


def lane_bounds(total_rows: int, data_parallel: int, dp_rank: int) -> tuple[int, int]:
    """[start, stop) positions (in manifest row order) of data-parallel rank `dp_rank`'s rows: contiguous stretches
    whose sizes differ by at most one row."""
    return total_rows * dp_rank // data_parallel, total_rows * (dp_rank + 1) // data_parallel


def lane_step_rows(total_rows: int, data_parallel: int, rows_per_rank_step: int, steps: int) -> list[list[int]]:
    """Row positions each optimizer step uses (all ranks, one epoch, nothing skipped): step s takes positions
    [s k, (s + 1) k) of every rank's lane. With the data engine's shards a position is the row_id."""
    lanes = [lane_bounds(total_rows, data_parallel, r) for r in range(data_parallel)]
    k = rows_per_rank_step
    return [[p for start, stop in lanes for p in range(start + s * k, min(start + (s + 1) * k, stop))]
            for s in range(steps)]


def lane_tables(shards: list[ShardRows], start: int, stop: int, read_batch_rows: int = 64,
                columns: Iterable[str] = (*REQUIRED_COLUMNS, "seg_doc_ids"),
                skip_group: Callable[[np.ndarray], bool] | None = None) -> Iterator[pa.Table]:
    """Rows at positions [start, stop) of the shards taken in order, as small tables, opening only the shards and
    reading only the row groups that hold them. `skip_group(row_ids)`: read a row group's row_id column first and
    skip the group when it returns True (a resume skipping what was consumed)."""
    pos = 0
    for shard in shards:
        n = shard.rows
        if pos + n <= start:
            pos += n
            continue
        if pos >= stop:
            return
        fs, path = storage.pyarrow_fs(shard.uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            sizes = tuple(pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups))
            if sizes != tuple(shard.row_groups):
                raise ValueError(f"{shard.uri}: row groups {list(sizes)[:8]} differ from the manifest's "
                                 f"{list(shard.row_groups)[:8]} (the shard changed after it was published)")
            cols = [c for c in columns if c in pf.schema_arrow.names]
            for g, size in enumerate(sizes):
                lo, hi = max(start, pos), min(stop, pos + size)  # our part of this group, in positions
                if lo < hi:
                    off = lo - pos
                    if skip_group is not None:
                        ids = pf.read_row_group(g, columns=["row_id"]).column("row_id").to_numpy()
                        if skip_group(ids[off:off + hi - lo]):
                            pos += size
                            continue
                    seen = 0
                    for batch in pf.iter_batches(batch_size=read_batch_rows, row_groups=[g], columns=cols):
                        a, b = max(off - seen, 0), min(hi - pos - seen, batch.num_rows)
                        if a < b:
                            yield pa.Table.from_batches([batch.slice(a, b - a)])
                        seen += batch.num_rows
                        if pos + seen >= hi:
                            break
                pos += size
                if pos >= stop:
                    return


def ray_data_tables(data_iterator, read_batch_rows: int = 64) -> Iterator[pa.Table]:
    yield from data_iterator.iter_batches(batch_size=read_batch_rows, batch_format="pyarrow", prefetch_batches=1)


class RowStream:
    """This rank's rows, epoch after epoch, skipping rows the ledger already holds.

    `tables(epoch)` returns one epoch's tables of this rank's rows (`lane_tables` over the shards, or Ray Train's
    dataset shard).
    """

    def __init__(self, tables: Callable[[int], Iterable[pa.Table]], *, epochs: int, ledger: Ledger):
        self.tables = tables
        self.epochs = epochs
        self.ledger = ledger
        self._gen = self._rows()

    def _rows(self) -> Iterator[tuple[int, PackedRow]]:
        for epoch in range(self.epochs):
            for table in self.tables(epoch):
                if "row_id" not in table.column_names:
                    raise ValueError("packed rows lack the row_id column (needed for exact resume)")
                for row in rows_from_table(table, "training data"):
                    if not self.ledger.contains(epoch, row.row_id):
                        yield epoch, row

    def take(self, n: int) -> list[tuple[int, PackedRow]] | None:
        """The next n rows (with their epoch), or None when the data ran out first."""
        out = []
        for _ in range(n):
            nxt = next(self._gen, None)
            if nxt is None:
                return None
            out.append(nxt)
        return out


def lane_row_stream(shards: list[ShardRows], *, dp_rank: int, data_parallel: int, epochs: int,
                    ledger: Ledger) -> RowStream:
    """Data-parallel rank `dp_rank`'s row stream over committed shards: its lane, epoch after epoch, minus the
    ledger (row groups wholly consumed are skipped after reading their row ids)."""
    start, stop = lane_bounds(sum(s.rows for s in shards), data_parallel, dp_rank)

    def tables(epoch: int) -> Iterator[pa.Table]:
        done = ledger.consumed.get(epoch)
        skip = (lambda ids: all(int(i) in done for i in ids)) if done else None
        return lane_tables(shards, start, stop, skip_group=skip)

    return RowStream(tables, epochs=epochs, ledger=ledger)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    row_ids: list[int]
    tokens: int
    """Tokens in the rows (seq_len x rows, padding included)."""
    non_pad_tokens: int
    sum_sq_doc_lengths: int
    """Sum over documents of length^2, padding excluded (attention FLOPs)."""


def collate(rows: list[PackedRow], attention: str, seq_len: int | None = None) -> MicroBatch:
    """One micro-batch of packed rows. `seq_len`: the run's row length (the training loop passes its one
    `LoopSpec.seq_len`); a row of another length fails loudly with both numbers."""
    expected = seq_len
    seq_len = len(rows[0].input_ids) if seq_len is None else seq_len
    for r in rows:
        if len(r.input_ids) != seq_len or len(r.labels) != seq_len or len(r.position_ids) != seq_len:
            raise ValueError(f"row {r.row_id}: {len(r.input_ids)} tokens (labels {len(r.labels)}, position ids "
                             f"{len(r.position_ids)}), but "
                             + (f"the run's rows are data.seq_len={expected} tokens: the data was packed for another "
                                f"row length" if expected is not None else f"the micro-batch's rows are {seq_len}"))
    position_ids = torch.from_numpy(np.stack([r.position_ids for r in rows]))
    # NOTE: attention spans follow the position ids, not seg_lengths: a CIP row (chunk-interleaved
    # pretraining) holds several document segments under one run of positions and must stay one causal
    # block, or the cross-chunk signal CIP exists for is masked away. For ordinary packed rows the two agree
    # (positions restart at every segment, padding included).
    doc_ids = document_ids_from_position_ids(position_ids)
    sum_sq = 0
    non_pad = 0
    for i, r in enumerate(rows):
        pad = sum(n for n, is_pad in zip(r.seg_lengths, r.seg_is_pad) if is_pad)
        real = seq_len - pad  # padding is the last segment
        non_pad += real
        if attention == "document":
            sum_sq += int((np.bincount(doc_ids[i, :real].numpy()) ** 2).sum()) if real else 0
        else:
            sum_sq += real * real
    return MicroBatch(
        input_ids=torch.from_numpy(np.stack([r.input_ids for r in rows])),
        position_ids=position_ids,
        labels=torch.from_numpy(np.stack([r.labels for r in rows])),
        doc_ids=doc_ids,
        row_ids=[r.row_id for r in rows],
        tokens=seq_len * len(rows),
        non_pad_tokens=non_pad,
        sum_sq_doc_lengths=sum_sq,
    )


def forward_inputs(m: MicroBatch, targets: torch.Tensor | None, *, attn_implementation: str, attention: str,
                   device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(input_ids, targets, keyword arguments) of one micro-batch's forward on this backend.

    flash_attention_2 with document attention and more than one row: the rows are flattened into ONE varlen row
    [1, B x S]. transformers' flash path finds document starts in the position ids only for a batch of one row
    (`_is_packed_sequence`); with two rows and no mask it would run plain causal attention over each row and
    packed documents would attend to each other. Every row starts at position 0, so each row boundary is also a
    document boundary of the flattened row. Targets are shifted per row before, so they flatten the same way.
    Other backends keep [B, S] with their per-row document mask.
    """
    input_ids, pos, tgt, doc_ids = m.input_ids, m.position_ids, targets, m.doc_ids
    if attention == "document" and attn_implementation == "flash_attention_2" and input_ids.shape[0] > 1:
        if bool((pos[:, 0] != 0).any()):
            raise ValueError(f"rows {[r for r, p in zip(m.row_ids, pos[:, 0].tolist()) if p != 0]} do not start at "
                             "position 0: flattening the micro-batch would join their first document to the row "
                             "before")
        input_ids, pos = input_ids.reshape(1, -1), pos.reshape(1, -1)
        tgt = tgt.reshape(1, -1) if tgt is not None else None
        doc_ids = None
    kwargs = attention_inputs(pos.to(device), attn_implementation=attn_implementation, attention=attention,
                              doc_ids=doc_ids, dtype=dtype)
    return input_ids.to(device), (tgt.to(device) if tgt is not None else None), kwargs


def rank_forward_inputs(m: MicroBatch, targets: torch.Tensor, *, sequence_parallel: int, sp_rank: int,
                        attn_implementation: str, attention: str, device,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input_ids, targets, keyword arguments) of THIS rank's forward of one micro-batch: with sequence
    parallelism its contiguous shard of every row (the attention layers all-to-all the rest and rebuild the
    document mask from the gathered position ids), else `forward_inputs`."""
    if sequence_parallel > 1:
        input_ids, pos, tgt = (shard_for_rank(t, sp_rank, sequence_parallel)
                               for t in (m.input_ids, m.position_ids, targets))
        return input_ids.to(device), tgt.to(device), {"position_ids": pos.to(device), "use_cache": False}
    return forward_inputs(m, targets, attn_implementation=attn_implementation, attention=attention, device=device,
                          dtype=dtype)
