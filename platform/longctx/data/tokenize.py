"""Step 2 of the data path: tokenize validated records with a Hugging Face fast tokenizer in a Ray actor pool.

`TokenizeBatches` is a Ray Data callable class (one tokenizer per actor, loaded once from a local folder,
`builtin:` asset or s3:// prefix). It encodes a batch of documents with the Rust batch encoder, appends EOS to
every document, and returns the token ids as a `list<int32>` column plus `n_tokens`. Quarantine rows (non-null
`reason`) pass through with no tokens, so the driver can count them in order.

    ds.map_batches(TokenizeBatches, fn_constructor_kwargs={"tokenizer": "builtin:tiny-tokenizer"},
                   batch_format="pyarrow", concurrency=2, num_cpus=0.25)
"""

from __future__ import annotations

import itertools
import json
import os

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
    Ray actor saves importing transformers (10+ s of CPU on a busy 2-core machine)."""
    folder = local_tokenizer_dir(uri)
    tok_json = os.path.join(folder, "tokenizer.json")
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    tcfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    if os.path.exists(tok_json):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(tok_json)
        eos = _token_text(tcfg.get("eos_token"))
        pad = _token_text(tcfg.get("pad_token"))
        eos_id = backend.token_to_id(eos) if eos else None
        pad_id = backend.token_to_id(pad) if pad else None
    else:  # only a slow-tokenizer layout: let transformers convert it (needs a fast conversion to exist)
        from transformers import AutoTokenizer

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


class TokenizeBatches:
    """Ray Data actor: records (RECORD_SCHEMA) -> token rows (TOKEN_SCHEMA)."""

    def __init__(self, tokenizer: str, batch_docs: int = 256):
        self.backend, self.eos, self.pad = load_fast_tokenizer(tokenizer)
        self.batch_docs = batch_docs

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
        return pa.table(cols, schema=TOKEN_SCHEMA)
