"""Tokenization step: our Rust-tokenizer loader gives exactly the ids of transformers' AutoTokenizer, EOS closes
every document, and quarantine rows pass through with no tokens (longctx.data.tokenize; no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from longctx.data.sources import RECORD_SCHEMA
from longctx.data.tokenize import TokenizeBatches, load_fast_tokenizer
from longctx.model.load import load_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "Plain prose, with ümlauts and emoji 🙂.", "  leading spaces\t\ttabs",
         "<|endoftext|> inside text stays text? no: it is a special token", "x" * 5000]


def test_ids_match_transformers_autotokenizer():
    backend, eos, pad = load_fast_tokenizer("builtin:tiny-tokenizer")
    hf = load_tokenizer("builtin:tiny-tokenizer")
    assert (eos, pad) == (hf.eos_token_id, hf.pad_token_id)
    ours = [e.ids for e in backend.encode_batch_fast(TEXTS, add_special_tokens=False)]
    assert ours == hf(TEXTS, add_special_tokens=False)["input_ids"]


def test_batches_append_eos_and_pass_quarantine_rows_through():
    actor = TokenizeBatches("builtin:tiny-tokenizer")
    n = len(TEXTS) + 1
    batch = pa.table({
        "file_idx": [0] * n, "rec_idx": list(range(1, n + 1)), "source": ["s"] * n,
        "doc_id": [f"d{i}" for i in range(n)], "text": TEXTS[:2] + [""] + TEXTS[2:],
        "reason": [None, None, "bad_json", None, None, None], "detail": [None, None, "x", None, None, None],
        "records": [1] * n,
    }, schema=RECORD_SCHEMA)
    out = actor(batch)
    hf = load_tokenizer("builtin:tiny-tokenizer")
    expected = [ids + [hf.eos_token_id] for ids in hf(TEXTS, add_special_tokens=False)["input_ids"]]
    tokens = out.column("tokens").to_pylist()
    assert tokens[2] == [] and out.column("n_tokens")[2].as_py() == 0
    assert [t for i, t in enumerate(tokens) if i != 2] == expected
    assert np.array_equal(out.column("n_tokens").to_numpy(), [len(t) for t in tokens])
    assert out.column("reason").to_pylist()[2] == "bad_json"
