"""Step 3 of the data path: tokenize validated records with a Hugging Face fast tokenizer in Ray tasks.

`TokenizeBatches` is pass 1's transform (`data/pass1.py`: one instance per Ray worker process, so the tokenizer
is loaded once per process from a local folder, `builtin:` asset or s3:// prefix). It encodes a batch of documents with the Rust batch encoder, appends EOS to
every document, and returns the token ids as a `list<int32>` column plus `n_tokens`. Quarantine rows (non-null
`reason`) pass through with no tokens, so the driver can count them in order.

    rows = TokenizeBatches("builtin:tiny-tokenizer")(records)   # records: sources.RECORD_SCHEMA table
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from longctx import storage

TOKEN_SCHEMA = pa.schema([
    ("file_idx", pa.int32()),
    ("rec_idx", pa.int64()),
    ("source", pa.string()),
    ("doc_id", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("records", pa.int64()),  # input records a row stands for (a file's lost tail: many)
    ("tokens", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()),
])


def local_tokenizer_dir(uri: str) -> str:
    """A local folder with the tokenizer files (s3:// prefixes downloaded once per machine into a cache)."""
    return storage.local_dir(uri)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_fast_tokenizer(uri: str):
    """(Rust `tokenizers.Tokenizer`, eos id, pad id) for a Hugging Face tokenizer folder / builtin: / s3://.

    NOTE: reads tokenizer.json with the `tokenizers` library directly instead of transformers' AutoTokenizer:
    the ids are the same (AutoTokenizer wraps this very object; tests/test_data_tokenize.py checks), and every
    Ray worker saves importing transformers (10+ s of CPU on a busy 2-core machine)."""
    folder = local_tokenizer_dir(uri)
    tok_json = os.path.join(folder, "tokenizer.json")
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    tcfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    if os.path.exists(tok_json):
        from tokenizers import Tokenizer  # deferred: heavy import, used only here

        backend = Tokenizer.from_file(tok_json)
        eos = _token_text(tcfg.get("eos_token"))
        pad = _token_text(tcfg.get("pad_token"))
        eos_id = backend.token_to_id(eos) if eos else None
        pad_id = backend.token_to_id(pad) if pad else None
    else:  # only a slow-tokenizer layout: let transformers convert it (needs a fast conversion to exist)
        from transformers import AutoTokenizer  # deferred: heavy import, used only here

        hf = AutoTokenizer.from_pretrained(folder, use_fast=True)
        if not hf.is_fast:
            raise ValueError(f"{uri}: no tokenizer.json and no fast tokenizer; longctx needs a Rust tokenizer")
        backend, eos_id, pad_id = hf.backend_tokenizer, hf.eos_token_id, hf.pad_token_id
    if eos_id is None:
        raise ValueError(f"{uri}: tokenizer has no eos_token; packing needs one to mark document ends")
    return backend, int(eos_id), int(pad_id if pad_id is not None else eos_id)


def encode_documents(backend, texts: list[str], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 ids with EOS after each document, per-document lengths incl. EOS) via the Rust batch encoder."""
    if not texts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    # encode_batch_fast skips offsets (not needed here) and is the fastest batch call tokenizers offers.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids), dtype=np.int32, count=int(lengths.sum())
    )
    return flat, lengths


CACHE_SCHEMA = pa.schema([("doc_id", pa.string()), ("tokens", pa.list_(pa.int32()))])  # the token cache's files
CACHE_SUFFIX = ".arrow"
CACHE_ROW_GROUP_DOCS = 1024
CACHE_ROW_GROUP_TOKENS = 8 << 20


def cache_group(part: pa.Table) -> pa.RecordBatch:
    """One cache row group (CACHE_SCHEMA rows) as the single record batch an IPC cache file holds for it."""
    return pa.RecordBatch.from_arrays([c.combine_chunks() for c in part.columns], schema=CACHE_SCHEMA)


def write_cache_groups(sink, table: pa.Table, bounds: list[tuple[int, int]]) -> None:
    """Write `table` (CACHE_SCHEMA) to `sink` (a path or an output stream) as an Arrow IPC file, one record batch
    per (lo, hi) of `bounds`: cache row group i is batch i.

    NOTE: the token cache is scratch, written once and read once: Arrow's IPC file format stores the token lists as
    they are in memory, where Parquet encodes a repetition level per token on write and decodes it on read (about
    5x the CPU of both on the shipped corpus, 1-3% of the whole preparation)."""
    with pa.ipc.new_file(sink, CACHE_SCHEMA) as w:
        for lo, hi in bounds:
            w.write_batch(cache_group(table.slice(lo, hi - lo)))


def read_cache_group(source, i: int) -> pa.Table:
    """Cache row group `i` of an IPC cache file (`source`: a path or a random-access file)."""
    return pa.Table.from_batches([pa.ipc.open_file(source).get_batch(i)])


def row_group_bounds(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Slices of at most CACHE_ROW_GROUP_DOCS documents and (unless one document is bigger) TOKENS tokens:
    pass 2 holds one cache row group per source in memory, so this bounds its memory."""
    bounds, lo, acc = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if i > lo and (i - lo >= CACHE_ROW_GROUP_DOCS or acc + n > CACHE_ROW_GROUP_TOKENS):
            bounds.append((lo, i))
            lo, acc = i, 0
        acc += n
    if len(lengths) > lo:
        bounds.append((lo, len(lengths)))
    return bounds



CACHED_SCHEMA = pa.schema([f for f in TOKEN_SCHEMA if f.name != "tokens"] + [
    ("cache_file", pa.string()),   # good records: the cache file under the cache root holding their tokens
    ("cache_rg", pa.int32()),      # its row group
    ("cache_row", pa.int32()),     # the record's row in that row group
    ("node", pa.string()),         # the Ray node that tokenized and wrote it
])


class TokenizeBatches:
    """Pass-1 transform: records (RECORD_SCHEMA) -> token rows (TOKEN_SCHEMA).

    With `cache_root` (a folder every node can read, or an s3:// prefix) it writes the good records'
    tokens there itself, one Parquet file per (batch, source label), and returns CACHED_SCHEMA rows: the
    metadata without the tokens, so no token passes through the driver."""

    def __init__(self, tokenizer: str, batch_docs: int = 256, cache_root: str | None = None,
                 storage_cfg: dict | None = None):
        if storage_cfg is not None:
            storage.configure(SimpleNamespace(**storage_cfg))
        self.backend, self.eos, self.pad = load_fast_tokenizer(tokenizer)
        self.batch_docs = batch_docs
        self.cache_root = cache_root
        self.node = ""
        if cache_root:
            import ray  # deferred: heavy import, used only here

            self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        good = pc.is_null(batch.column("reason")).to_numpy(zero_copy_only=False)
        texts = batch.column("text").filter(pa.array(good)).to_pylist()
        parts = [encode_documents(self.backend, texts[i:i + self.batch_docs], self.eos)
                 for i in range(0, len(texts), self.batch_docs)] or [encode_documents(self.backend, [], self.eos)]
        flat = np.concatenate([f for f, _ in parts])
        lengths = np.concatenate([n for _, n in parts])
        n_tokens = np.zeros(batch.num_rows, np.int32)
        n_tokens[good] = lengths
        offsets = np.zeros(batch.num_rows + 1, np.int32)
        np.cumsum(n_tokens, out=offsets[1:])
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))
        cols = {n: batch.column(n) for n in TOKEN_SCHEMA.names if n in batch.column_names}
        cols["tokens"] = tokens
        cols["n_tokens"] = pa.array(n_tokens)
        table = pa.table(cols, schema=TOKEN_SCHEMA)
        return self._write_cache(table, good) if self.cache_root else table

    def _write_cache(self, table: pa.Table, good: np.ndarray) -> pa.Table:
        """Write the good rows' tokens under cache_root, one file per source label (row groups as the driver's
        cache had them: row_group_bounds); return the rows without tokens, with where they went."""
        n = table.num_rows
        files = np.full(n, None, object)
        rgs = np.full(n, -1, np.int32)
        rows = np.full(n, -1, np.int32)
        labels = table.column("source").to_numpy(zero_copy_only=False)
        n_tok = table.column("n_tokens").to_numpy(zero_copy_only=False)
        for label in sorted({labels[i] for i in np.flatnonzero(good)}):
            idx = np.flatnonzero(good & (labels == label))
            part = table.take(pa.array(idx)).select(["doc_id", "tokens"]).cast(CACHE_SCHEMA)
            name = f"{uuid.uuid4().hex}{CACHE_SUFFIX}"
            uri = storage.join(self.cache_root, name)
            fs, path = storage.pyarrow_fs(uri)
            bounds = row_group_bounds(n_tok[idx])

            def write(part=part, fs=fs, path=path, bounds=bounds):
                with fs.open_output_stream(path) as out:
                    write_cache_groups(out, part, bounds)

            storage.retry_io(write, f"write token cache {uri}")
            files[idx] = name
            for g, (lo, hi) in enumerate(bounds):
                rgs[idx[lo:hi]] = g
                rows[idx[lo:hi]] = np.arange(hi - lo)
        cols = {f.name: table.column(f.name) for f in TOKEN_SCHEMA if f.name != "tokens"}
        cols["cache_file"] = pa.array(files.tolist(), pa.string())
        cols["cache_rg"] = pa.array(rgs)
        cols["cache_row"] = pa.array(rows)
        cols["node"] = pa.array([self.node] * n, pa.string())
        return pa.table(cols, schema=CACHED_SCHEMA)
