"""What a packed dataset was made from, as fingerprints the manifest records and readers compare.

    from longctx.data.fingerprint import data_fingerprint, tokenizer_fingerprint
    data_fingerprint(cfg)                     # '9e1f0c2a7b3d': hash of the `data` settings that shape the rows
    tokenizer_fingerprint("builtin:tiny-tokenizer")   # sha256 of the tokenizer's full definition

The data engine records both in manifest.json (`data_fingerprint` with the settings themselves as `data_config`,
`tokenizer.fingerprint`); the run plumbing (`longctx.runs.handoff`, `longctx.runs.identity`) compares them with a job.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from longctx.data.budget import effective_data_config
from longctx.data.tokenize import load_fast_tokenizer

DATA_NON_RESULT_KEYS: tuple[str, ...] = ("output", "num_tokenize_actors", "tokenize_batch_size", "prepared")
"""Keys of the `data` section that do not shape the packed rows (`prepared` names data instead of making it)."""


def _digest(obj: Any, length: int) -> str:
    """The first `length` hex digits of the sha256 of `obj` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def data_tree(cfg) -> dict:
    """The `data` section without the keys that do not shape the packed rows; `token_budget` as the data engine
    uses it (train.token_budget when data.token_budget is unset)."""
    d = json.loads(effective_data_config(cfg).model_dump_json())
    for k in DATA_NON_RESULT_KEYS:
        d.pop(k, None)
    return d


def data_fingerprint(cfg, length: int = 12) -> str:
    """Hash of the `data` settings that shape the packed rows (recorded in the manifest as `data_fingerprint`)."""
    return _digest(data_tree(cfg), length)


@functools.lru_cache(maxsize=8)
def tokenizer_fingerprint(uri: str) -> str:
    """sha256 of a tokenizer's full definition (tokenizer.json as the Rust tokenizer serialises it)."""
    tok, _, _ = load_fast_tokenizer(uri)
    return fingerprint_of(tok)


def fingerprint_of(tok) -> str:
    """Fingerprint of a loaded tokenizer: a Rust `tokenizers.Tokenizer` or a transformers tokenizer (a slow one,
    which has no serialised definition, by its sorted vocabulary)."""
    backend = getattr(tok, "backend_tokenizer", tok)
    text = backend.to_str() if hasattr(backend, "to_str") else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()
