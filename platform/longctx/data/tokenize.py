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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TOKEN_SCHEMA = pa.schema([
    ("file_idx", pa.int32()),
    ("rec_idx", pa.int64()),
    ("source", pa.string()),
    ("doc_id", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("tokens", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()),
])


def load_fast_tokenizer(uri: str):
    """(HF fast tokenizer, eos id, pad id) for a tokenizer folder / builtin: / s3:// prefix."""
    from longctx.model.load import load_tokenizer

    tok = load_tokenizer(uri)
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"{uri}: tokenizer has no eos_token; packing needs one to mark document ends")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return tok, int(eos), int(pad)


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

    def __init__(self, tokenizer: str):
        tok, self.eos, self.pad = load_fast_tokenizer(tokenizer)
        self.backend = tok.backend_tokenizer

    def __call__(self, batch: pa.Table) -> pa.Table:
        good = pc.is_null(batch.column("reason")).to_numpy(zero_copy_only=False)
        texts = batch.column("text").filter(pa.array(good)).to_pylist()
        flat, lengths = encode_documents(self.backend, texts, self.eos)
        n_tokens = np.zeros(batch.num_rows, np.int32)
        n_tokens[good] = lengths
        offsets = np.zeros(batch.num_rows + 1, np.int32)
        np.cumsum(n_tokens, out=offsets[1:])
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))
        cols = {n: batch.column(n) for n in TOKEN_SCHEMA.names if n in batch.column_names}
        cols["tokens"] = tokens
        cols["n_tokens"] = pa.array(n_tokens)
        return pa.table(cols, schema=TOKEN_SCHEMA)
