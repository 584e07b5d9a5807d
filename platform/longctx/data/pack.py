"""Step 8 of the data path: pack documents into rows of exactly `seq_len` tokens (docs/architecture.md section 5).

Best-fit decreasing over a bounded streaming buffer: documents longer than seq_len are first cut into seq_len
pieces (a full piece is a row by itself; the document counts as split). Other pieces wait in a buffer of about
`buffer_rows · seq_len` tokens; when it is full they are placed largest first, each into the open row whose
free space fits it most tightly, else into a new row. Open rows are carried across buffer windows; when more
than `buffer_rows` stay open, the fullest are closed (padded). A document that fits in a row is never split.

Packed row columns (schemas/packed_sequence.schema.json):
  row_id          int64, 0..N-1 in output order (the trainer's sample id for its exactly-once ledger)
  input_ids       list<int32>, len == seq_len
  position_ids    list<int32>: attention=document restarts at 0 on every segment (padding included);
                  attention=full is 0..seq_len-1
  labels          list<int32>: the token ids themselves, NOT shifted (the model shifts), -100 on padding
  seg_lengths     list<int32>, sums to seq_len; padding, if any, is the last segment
  seg_sources     list<string> (padding: "")
  seg_doc_ids     list<string> (padding: "")
  seg_doc_tokens  list<int32>: token length of the document the segment came from (padding: 0)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IGNORE_INDEX = -100
PACKED_KIND = "longctx.packed_sequences"
"""`kind` in the manifest.json of a packed dataset (an `--overwrite` replaces only a folder of this kind)."""

PACKED_SCHEMA = pa.schema([
    ("row_id", pa.int64()),
    ("input_ids", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("seg_lengths", pa.list_(pa.int32())),
    ("seg_sources", pa.list_(pa.string())),
    ("seg_doc_ids", pa.list_(pa.string())),
    ("seg_doc_tokens", pa.list_(pa.int32())),
])


ROW_GROUP_MAX_ROWS = 256
ROW_GROUP_TARGET_BYTES = 64 << 20
"""Shard row groups: at most 256 rows and about 64 MiB of decoded token columns (three int32 columns), at least
one row. A training rank reads whole row groups (train/batches.py), so this is also the most it reads beyond its
own rows at each end of its stretch."""


def shard_row_group_rows(n_rows: int, seq_len: int) -> int:
    """Rows per row group of a shard of `n_rows` rows of `seq_len` tokens."""
    return max(1, min(ROW_GROUP_MAX_ROWS, n_rows, ROW_GROUP_TARGET_BYTES // (12 * seq_len)))


def write_shard_file(table: pa.Table, path: str) -> list[int]:
    """Write packed rows as one zstd Parquet shard at a local `path`; returns its rows per row group.

    NOTE: dictionary encoding only for the string columns: on token ids, positions and labels it builds a
    dictionary per column chunk, overflows it and falls back to plain, costing a quarter more CPU and a third
    more bytes (bench/data_pipeline.py's pass 2)."""
    seq_len = len(table.column("input_ids")[0]) if table.num_rows else 1
    pq.write_table(table, path, compression="zstd", row_group_size=shard_row_group_rows(table.num_rows, seq_len),
                   use_dictionary=[f.name for f in table.schema if pa.types.is_list(f.type)
                                   and pa.types.is_string(f.type.value_type)])
    return row_group_sizes(path)


def row_group_sizes(path: str) -> list[int]:
    """Rows of each row group of a local Parquet file (the manifest's per-shard `row_groups`)."""
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


@dataclass
class Segment:
    tokens: np.ndarray  # int32
    source: str
    doc_id: str
    doc_tokens: int
    split: bool = False  # first piece of a document that was cut into seq_len pieces before packing (counted)
    piece: int = 0       # index of the piece within such a document (0: the whole document or its first piece)


@dataclass
class _OpenRow:
    free: int
    order: int  # creation order, breaks ties deterministically
    segments: list[Segment] = field(default_factory=list)


@dataclass
class PackStats:
    rows: int = 0
    tokens: int = 0         # non-padding tokens
    pad_tokens: int = 0
    split_docs: int = 0     # documents longer than seq_len, cut into pieces (concat: any document cut by a row end)
    pieces: int = 0
    tail_dropped: int = 0   # concat: tokens after the last full row, dropped

    def merge(self, other: "PackStats") -> None:
        """Add another packer's counts (e.g. one pass-2 partition's) to these."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class BestFitPacker:
    """Streaming best-fit-decreasing packer; `add()` and `finish()` yield finished rows as segment lists."""

    def __init__(self, seq_len: int, buffer_rows: int = 16):
        self.seq_len = seq_len
        self.buffer_rows = buffer_rows
        self.pending: list[tuple[int, int, Segment]] = []  # (length, arrival, segment)
        self.pending_tokens = 0
        self.open: list[_OpenRow] = []
        self.arrivals = 0
        self.opened = 0
        self.stats = PackStats()

    def add(self, seg: Segment) -> Iterator[list[Segment]]:
        n, L = len(seg.tokens), self.seq_len
        if n > L or seg.split:
            self.stats.split_docs += 1
        for start in range(0, n, L):
            piece = Segment(seg.tokens[start:start + L], seg.source, seg.doc_id, seg.doc_tokens)
            self.stats.pieces += 1
            if len(piece.tokens) == L:
                yield self._finish_row([piece])
                continue
            self.pending.append((len(piece.tokens), self.arrivals, piece))
            self.arrivals += 1
            self.pending_tokens += len(piece.tokens)
        if self.pending_tokens >= self.buffer_rows * L:
            yield from self._place()

    def finish(self) -> Iterator[list[Segment]]:
        yield from self._place()
        for row in sorted(self.open, key=lambda r: r.order):
            yield self._finish_row(row.segments)
        self.open = []

    def _place(self) -> Iterator[list[Segment]]:
        self.pending.sort(key=lambda t: (-t[0], t[1]))
        # open rows kept sorted by (free, order) so the tightest fit is a bisect away
        rows = sorted(self.open, key=lambda r: (r.free, r.order))
        keys = [(r.free, r.order) for r in rows]
        for n, _, seg in self.pending:
            i = bisect.bisect_left(keys, (n, -1))
            if i < len(rows):
                row = rows.pop(i)
                keys.pop(i)
            else:
                row = _OpenRow(free=self.seq_len, order=self.opened)
                self.opened += 1
            row.segments.append(seg)
            row.free -= n
            if row.free == 0:
                yield self._finish_row(row.segments)
                continue
            j = bisect.bisect_left(keys, (row.free, row.order))
            rows.insert(j, row)
            keys.insert(j, (row.free, row.order))
        self.pending, self.pending_tokens = [], 0
        # Too many open rows: close the fullest (least padding), keep the emptiest open for the next window.
        rows.sort(key=lambda r: (r.free, r.order))
        while len(rows) > self.buffer_rows:
            yield self._finish_row(rows.pop(0).segments)
        self.open = rows

    def _finish_row(self, segments: list[Segment]) -> list[Segment]:
        used = sum(len(s.tokens) for s in segments)
        self.stats.rows += 1
        self.stats.tokens += used
        self.stats.pad_tokens += self.seq_len - used
        return segments


class ConcatPacker:
    """Fu et al.'s packing ("regardless of the document boundary"): concatenate the documents in stream order
    and cut every `seq_len` tokens. No padding and no document boundaries kept for attention: rows are meant for
    `attention: full` (config validation refuses it with `document`). The tail after the last full row is
    dropped (counted in `stats.tail_dropped`). Segments still record which document each stretch came from."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.row: list[Segment] = []
        self.fill = 0
        self.stats = PackStats()

    def add(self, seg: Segment) -> Iterator[list[Segment]]:
        L, toks = self.seq_len, seg.tokens
        self.stats.pieces += 1
        cut = seg.split or len(toks) > L  # cut before packing: counted once, at its first piece
        o = 0
        while o < len(toks):
            take = min(L - self.fill, len(toks) - o)
            self.row.append(Segment(toks[o:o + take], seg.source, seg.doc_id, seg.doc_tokens))
            self.fill += take
            o += take
            if self.fill == L:
                if o < len(toks) and seg.piece == 0 and not cut:
                    cut = True  # a whole document crossing a row end
                    self.stats.split_docs += 1
                yield self._finish_row()
        if seg.split or (len(toks) > L and seg.piece == 0):
            self.stats.split_docs += 1

    def finish(self) -> Iterator[list[Segment]]:
        self.stats.tail_dropped += self.fill
        self.row, self.fill = [], 0
        return iter(())

    def _finish_row(self) -> list[Segment]:
        row, self.row, self.fill = self.row, [], 0
        self.stats.rows += 1
        self.stats.tokens += self.seq_len
        return row


class GreedyPacker:
    """Baseline for bench/packing.py: concatenate documents in arrival order and cut every seq_len tokens
    (what run_clm's group_texts does); splits every document that crosses a row boundary."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.fill = 0
        self.stats = PackStats()

    def add_length(self, n: int) -> None:
        L = self.seq_len
        start_row, end_row = self.fill // L, (self.fill + n - 1) // L
        self.stats.split_docs += int(end_row > start_row)
        self.fill += n
        self.stats.tokens += n

    def finish(self) -> None:
        L = self.seq_len
        self.stats.rows = -(-self.fill // L)
        self.stats.pad_tokens = self.stats.rows * L - self.fill


class RowBuilder:
    """Turns finished segment lists into packed-row columns and Arrow tables (PACKED_SCHEMA)."""

    def __init__(self, seq_len: int, pad_id: int, attention: str):
        self.seq_len, self.pad_id, self.attention = seq_len, pad_id, attention
        self._full_positions = np.arange(seq_len, dtype=np.int32)
        self.clear()

    def clear(self) -> None:
        self.ids: list[np.ndarray] = []
        self.seg_lengths: list[list[int]] = []
        self.seg_sources: list[list[str]] = []
        self.seg_doc_ids: list[list[str]] = []
        self.seg_doc_tokens: list[list[int]] = []
        self.row_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.row_ids)

    def add(self, row_id: int, segments: list[Segment]) -> None:
        lengths = [len(s.tokens) for s in segments]
        used = sum(lengths)
        parts = [s.tokens for s in segments]
        sources = [s.source for s in segments]
        doc_ids = [s.doc_id for s in segments]
        doc_tokens = [int(s.doc_tokens) for s in segments]
        if used < self.seq_len:
            pad = self.seq_len - used
            parts.append(np.full(pad, self.pad_id, np.int32))
            lengths.append(pad)
            sources.append("")
            doc_ids.append("")
            doc_tokens.append(0)
        self.ids.append(np.concatenate(parts).astype(np.int32, copy=False))
        self.seg_lengths.append(lengths)
        self.seg_sources.append(sources)
        self.seg_doc_ids.append(doc_ids)
        self.seg_doc_tokens.append(doc_tokens)
        self.row_ids.append(row_id)

    def positions(self, lengths: list[int]) -> np.ndarray:
        if self.attention == "full":
            return self._full_positions
        return np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])

    def table(self) -> pa.Table:
        n, L = len(self.row_ids), self.seq_len
        offsets = pa.array(np.arange(0, (n + 1) * L, L, dtype=np.int32))
        ids = np.concatenate(self.ids) if n else np.zeros(0, np.int32)
        pos = np.concatenate([self.positions(ls) for ls in self.seg_lengths]) if n else np.zeros(0, np.int32)
        labels = ids.copy()
        for r, ls in enumerate(self.seg_lengths):
            if self.seg_sources[r][-1] == "":  # padding segment
                labels[(r + 1) * L - ls[-1]:(r + 1) * L] = IGNORE_INDEX
        cols = {
            "row_id": pa.array(self.row_ids, pa.int64()),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
            "position_ids": pa.ListArray.from_arrays(offsets, pa.array(pos, pa.int32())),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels, pa.int32())),
            "seg_lengths": pa.array(self.seg_lengths, pa.list_(pa.int32())),
            "seg_sources": pa.array(self.seg_sources, pa.list_(pa.string())),
            "seg_doc_ids": pa.array(self.seg_doc_ids, pa.list_(pa.string())),
            "seg_doc_tokens": pa.array(self.seg_doc_tokens, pa.list_(pa.int32())),
        }
        return pa.table(cols, schema=PACKED_SCHEMA)
