"""Step 4 of the data path (pass 1 of the data engine): read, validate, tokenize every source into a token cache.

With `shared_root` (prepare_data: a folder or s3:// prefix next to the output) the tokenize tasks write the
tokens there themselves and the driver consumes only metadata in input order: lengths (4
bytes each, kept) and where each cache row group is. Without it the driver appends each document's tokens to
one Arrow IPC file per source label on local disk (packed_dataset). Quarantine rows are counted by reason and
written to a JSONL file as they arrive. `pipeline.py` plans the mixture from the lengths and reads the cache in
pass 2, from any node when it is shared.

    cache = tokenize_corpus(cfg, "/tmp/work", shared_root="s3://b/run/tokens")  # lengths, row groups, quarantine
    check_bad_fraction(cache, cfg.data.max_bad_fraction)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from longctx import storage
from longctx.data import sources as src
from longctx.data.budget import BudgetReader, data_budget
from longctx.data.pass1 import record_stream
from longctx.data.tokenize import (CACHE_SCHEMA, CACHE_SUFFIX, TokenizeBatches, cache_group, row_group_bounds,
                                   write_cache_groups)
from longctx.progress import Progress



class DataQualityError(RuntimeError):
    """Too much of the input was quarantined (data.max_bad_fraction); the message has the counts."""


# ------------------------------------------------------------------------------------------------- pass 1
@dataclass
class TokenCache:
    """Result of pass 1: per-source token caches on local disk, lengths in memory, quarantine counts."""

    root: str
    files: int = 0
    good: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, list[np.ndarray]] = field(default_factory=dict)
    row_groups: dict[str, list[int]] = field(default_factory=dict)  # docs per cache row group
    quarantine_path: str = ""
    seconds: float = 0.0
    read: dict = field(default_factory=dict)  # budget-aware reading (data/budget.py): per-source report
    estimated_tokens: dict[str, int] = field(default_factory=dict)  # whole-corpus tokens per label (read_margin)
    chunks: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # per row group: (file, index)
    nodes: list[str] = field(default_factory=list)  # Ray nodes whose tokenize tasks wrote the cache
    _files: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def bad(self) -> int:
        return sum(self.bad_by_reason.values())

    def source_lengths(self) -> dict[str, np.ndarray]:
        return {s: np.concatenate(v) if v else np.zeros(0, np.int32) for s, v in self.lengths.items()}

    def path(self, source: str) -> str:
        return os.path.join(self.root, f"{sorted(self.lengths).index(source):04d}{CACHE_SUFFIX}")

    def chunk(self, source: str, rg: int) -> tuple[str, int]:
        """(file under `root`, row group in it) of the source's `rg`-th cache row group."""
        if source in self.chunks:
            return self.chunks[source][rg]
        return os.path.basename(self.path(source)), rg

    def read_row_group(self, source: str, rg: int) -> pa.Table:
        """The source's `rg`-th cache row group (`row_groups[source][rg]` documents: doc_id, tokens), read from
        wherever the cache is (local folder or s3://); files stay open in this process."""
        name, i = self.chunk(source, rg)
        reader = self._files.get(name)
        if reader is None:
            uri = storage.join(self.root, name)
            fs, path = storage.pyarrow_fs(uri)
            reader = self._files[name] = pa.ipc.open_file(fs.open_input_file(path))
            if len(self._files) > 64:  # a bounded number of open files
                self._files.pop(next(iter(self._files)))
        table = pa.Table.from_batches([reader.get_batch(i)])
        n = self.row_groups[source][rg]
        return table if table.num_rows == n else table.slice(0, n)

    def read_source(self, source: str) -> pa.Table:
        """Every cached document of `source` (doc_id, tokens), in order (tests, small caches)."""
        return pa.concat_tables([self.read_row_group(source, rg) for rg in range(len(self.row_groups[source]))])

    def __getstate__(self):  # open files stay behind when the cache is sent to a Ray task
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    @classmethod
    def from_documents(cls, root: str, docs: dict[str, list[tuple[str, np.ndarray]]]) -> "TokenCache":
        """A cache written directly from {source: [(doc_id, tokens incl. EOS), ...]} (tests, benchmarks)."""
        os.makedirs(root, exist_ok=True)
        cache = cls(root=root, files=len(docs))
        for label in sorted(docs):
            rows = docs[label]
            lengths = np.array([len(t) for _, t in rows], np.int32)
            cache.lengths[label] = [lengths]
            cache.good += len(rows)
        for label in sorted(docs):
            rows = docs[label]
            table = pa.table({"doc_id": [i for i, _ in rows],
                              "tokens": pa.array([np.asarray(t, np.int32) for _, t in rows], pa.list_(pa.int32()))},
                             schema=CACHE_SCHEMA)
            bounds = row_group_bounds(cache.lengths[label][0])
            cache.row_groups[label] = [hi - lo for lo, hi in bounds]
            write_cache_groups(cache.path(label), table, bounds)
        return cache


def _tokenized_batches(cfg, tasks: list[src.FileTask], with_tokens: bool = True,
                       cache_root: str | None = None) -> Iterator[pa.Table]:
    """Pass 1 on Ray, in input order: read + validate files, then tokenize each record block in a task (whose
    `TokenizeBatches` writes the tokens under `cache_root` itself when given, and sends only metadata on)."""
    kwargs = {"tokenizer": cfg.data.tokenizer, "batch_docs": cfg.data.tokenize_batch_size,
              "cache_root": cache_root if with_tokens else None, "storage_cfg": cfg.storage.model_dump()}
    yield from record_stream(cfg, tasks, TokenizeBatches, kwargs, src.read_options(cfg),
                             drop=() if with_tokens else ("tokens",))


def _cache_batch(batch: pa.Table, cache: TokenCache, writers: dict, staged: dict, cache_root, with_tokens: bool):
    """Append a batch of good tokenized records to the per-source caches; lengths stay in memory."""
    cache.good += batch.num_rows
    labels = batch.column("source")
    for label in pc.unique(labels).to_pylist():
        part = batch if len(labels.unique()) == 1 else batch.filter(pc.equal(labels, label))
        lengths = part.column("n_tokens").to_numpy()
        cache.lengths.setdefault(label, []).append(lengths)
        for lo, hi in row_group_bounds(lengths):
            cache.row_groups.setdefault(label, []).append(hi - lo)
            if with_tokens:
                if label not in writers:
                    staged[label] = os.path.join(cache_root, f"staged-{len(writers):04d}{CACHE_SUFFIX}")
                    sink = pa.OSFile(staged[label], "wb")
                    writers[label] = (sink, pa.ipc.new_file(sink, CACHE_SCHEMA))
                writers[label][1].write_batch(
                    cache_group(part.slice(lo, hi - lo).select(["doc_id", "tokens"]).cast(CACHE_SCHEMA)))


def _index_batch(batch: pa.Table, cache: TokenCache) -> None:
    """A batch of good records whose tokens the tokenize tasks wrote (CACHED_SCHEMA): keep their lengths and
    where their row groups are; the records of one cache row group kept here are always its first ones (the
    budget gate only drops a source's later records), so a row group is (file, index, how many)."""
    cache.good += batch.num_rows
    labels = batch.column("source")
    for label in pc.unique(labels).to_pylist():
        part = batch if len(labels.unique()) == 1 else batch.filter(pc.equal(labels, label))
        cache.lengths.setdefault(label, []).append(part.column("n_tokens").to_numpy())
        files = part.column("cache_file").to_numpy(zero_copy_only=False)
        rgs = part.column("cache_rg").to_numpy()
        rows = part.column("cache_row").to_numpy()
        change = np.flatnonzero((files[1:] != files[:-1]) | (rgs[1:] != rgs[:-1])) + 1
        chunks, sizes = cache.chunks.setdefault(label, []), cache.row_groups.setdefault(label, [])
        for lo, hi in zip([0, *change.tolist()], [*change.tolist(), len(files)]):
            key = (str(files[lo]), int(rgs[lo]))
            first = sizes[-1] if chunks and chunks[-1] == key else 0
            if not np.array_equal(rows[lo:hi], np.arange(first, first + hi - lo)):
                raise RuntimeError(f"token cache {key}: records arrived out of order (rows {rows[lo:hi][:5]}...)")
            if first:
                sizes[-1] += hi - lo
            else:
                chunks.append(key)
                sizes.append(hi - lo)
    for node in pc.unique(batch.column("node")).to_pylist():
        if node not in cache.nodes:
            cache.nodes.append(node)


def tokenize_corpus(cfg, cache_root: str | None, with_tokens: bool = True,
                    shared_root: str | None = None) -> TokenCache:
    """Pass 1: tokenize every source into `cache_root` (tokens) and return lengths + quarantine counts.

    With `with_tokens=False` (length statistics only) nothing is cached. With a token budget (data.token_budget,
    else train.token_budget) sources are read only as far as the budget's mixture needs (data/budget.py) unless
    data.budget_read is off. `shared_root`: the
    tokenize tasks write the cache there (a folder every node can read, or an s3:// prefix) and the driver
    only reads their metadata (lengths, where each row group is; `cache_root` then holds only the quarantine
    list); else the driver writes it under `cache_root` (one local file per source)."""
    t0 = time.time()
    d = cfg.data
    tasks = src.list_files(d.source_specs())
    gate = None
    budget, _ = data_budget(cfg)
    if with_tokens and d.budget_read and budget is not None:
        gate = BudgetReader(tasks, budget, d.read_margin, d.seed, data_cfg=d)
        tasks = gate.order
    in_workers = with_tokens and bool(shared_root)
    cache = TokenCache(root=(shared_root if in_workers else cache_root) or "", files=len(tasks))
    writers: dict[str, tuple] = {}  # source label -> (its file, its IPC writer)
    staged: dict[str, str] = {}
    qfile = open(os.path.join(cache_root, "quarantine.jsonl"), "w") if cache_root else None
    cache.quarantine_path = qfile.name if qfile else ""

    bar = Progress("tokenize", total=len(tasks), unit="files")  # files started; a line every 10 s
    files_seen: set[int] = set()
    tokens_seen = 0
    stream = _tokenized_batches(cfg, tasks, with_tokens, shared_root if in_workers else None)
    try:
        for batch in stream:
            files_seen.update(batch.column("file_idx").to_pylist())
            tokens_seen += int(pc.sum(batch.column("n_tokens")).as_py() or 0)
            bar.note = f"{cache.good + batch.num_rows:,} records read, {tokens_seen:,} tokens"
            bar.update(len(files_seen))
            if gate is not None:
                batch = gate.admit(batch)
            reason = batch.column("reason")
            bad_mask = pc.is_valid(reason)
            if pc.any(bad_mask).as_py():
                bad = batch.filter(bad_mask).select(["doc_id", "reason", "detail", "records"]).to_pylist()
                for r in bad:  # `records`: a damaged file's lost tail counts as the records it held
                    n = r["records"] if r["reason"] not in src.NOT_RECORDS else 1
                    cache.bad_by_reason[r["reason"]] = cache.bad_by_reason.get(r["reason"], 0) + n
                    if qfile:
                        qfile.write(json.dumps({"location": r["doc_id"], "reason": r["reason"],
                                                "detail": r["detail"], "records": n}) + "\n")
                batch = batch.filter(pc.invert(bad_mask))
            if batch.num_rows and in_workers:
                _index_batch(batch, cache)
            elif batch.num_rows:
                _cache_batch(batch, cache, writers, staged, cache_root, with_tokens)
            if gate is not None and gate.done:  # every source has its share of the budget: stop reading
                break
        else:
            if gate is not None:
                gate.exhausted = True
    finally:
        stream.close()  # cancels pass 1's tasks when budget-aware reading broke off early
        for sink, w in writers.values():
            w.close()
            sink.close()
        if qfile:
            qfile.close()
    if gate is not None:
        cache.estimated_tokens = gate.estimate()
        cache.read = gate.report()
    for label, path in staged.items():  # final names follow sorted labels, whatever order they appeared in
        os.replace(path, cache.path(label))
    cache.seconds = time.time() - t0
    if tokens_seen:
        bar.note = f"{cache.good:,} documents, {tokens_seen:,} tokens"
        bar.update(len(files_seen), force=True)
    return cache


def check_bad_fraction(cache: TokenCache, limit: float) -> float:
    """Fraction of input records quarantined; DataQualityError above `limit`. A damaged file counts the records
    it lost (estimated, see data/sources.py); skipped files (not corpus formats) are listed but not records."""
    bad = sum(n for r, n in cache.bad_by_reason.items() if r not in src.NOT_RECORDS)
    total = cache.good + bad
    frac = bad / total if total else 0.0
    if total == 0:
        raise DataQualityError(f"the sources hold no records ({cache.files} files read): nothing to pack")
    if frac > limit or cache.good == 0:
        examples = ""
        if cache.quarantine_path and os.path.exists(cache.quarantine_path):
            with open(cache.quarantine_path) as f:
                examples = "".join(f"\n    {json.loads(l)['location']}: {json.loads(l)['reason']}"
                                   for _, l in zip(range(5), f))
        raise DataQualityError(
            f"{bad} of {total} input records ({100 * frac:.2f}%) were quarantined, above "
            f"data.max_bad_fraction={limit} ({100 * limit:.2f}%); by reason: {dict(sorted(cache.bad_by_reason.items()))}."
            f"{' First ones:' + examples if examples else ''}\n  Fix the input, or raise data.max_bad_fraction "
            f"if these records may be dropped.")
    return frac


