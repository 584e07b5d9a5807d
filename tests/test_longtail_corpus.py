"""The long-tailed study corpus: per source, most documents shorter than the base length and a minority of long
ones kept whole; deterministic by seed; the text is the shipped corpus's own."""

from __future__ import annotations

import gzip
import json

from longctx.data.synthetic.longtail import build_long_tailed_corpus
from longctx.model.load import load_tokenizer


def _records(path):
    return [json.loads(line) for line in gzip.decompress(open(path, "rb").read()).decode().splitlines()]


def test_long_tailed_corpus_is_short_headed_long_tailed_and_reproducible(tmp_path):
    kw = dict(max_documents=25, long_doc_fraction={"code": 0.5, "c": 0.5, "records": 0.2})
    a = build_long_tailed_corpus(str(tmp_path / "a"), seed=3, **kw)
    b = build_long_tailed_corpus(str(tmp_path / "b"), seed=3, **kw)
    c = build_long_tailed_corpus(str(tmp_path / "c"), seed=4, **kw)
    tok = load_tokenizer("builtin:tiny-tokenizer")
    for name in ("code", "c", "records"):
        fa, fb = (tmp_path / d / f"{name}.jsonl.gz" for d in "ab")
        assert fa.read_bytes() == fb.read_bytes(), f"{name}: same seed, different bytes"
        assert fa.read_bytes() != (tmp_path / "c" / f"{name}.jsonl.gz").read_bytes(), f"{name}: seed ignored"
        s = a["sources"][name]
        assert s["share_docs_short"] > 0.7, (name, s)
        assert s["long_documents"] >= 1 and 0.0 < s["long_token_share"]["1024"] < 0.9, (name, s)
        recs = _records(fa)
        lengths = [len(x) for x in tok([r["text"] for r in recs], add_special_tokens=False)["input_ids"]]
        assert sum(lengths) == s["tokens"] and len(recs) == s["documents"]
        assert sum(n >= 1024 for n in lengths) == s["long_documents"]  # long = kept whole; pieces stay short
        assert all(n < 256 or n >= 1024 for n in lengths), "a piece is neither short nor a kept document"
        assert all(r["source"] == name and r["text"].strip() for r in recs)
    # a different long share per source: what per-source vs global upsampling disagree about
    shares = {n: a["sources"][n]["long_token_share"]["1024"] for n in a["sources"]}
    assert max(shares.values()) - min(shares.values()) > 0.1, shares
    assert json.loads((tmp_path / "a" / "stats.json").read_text()) == a
