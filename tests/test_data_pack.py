"""Best-fit packing and packed-row columns (longctx.data.pack), checked as numbers; no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from longctx.data.pack import IGNORE_INDEX, BestFitPacker, ConcatPacker, GreedyPacker, RowBuilder, Segment


def _docs(n, seed=0, median=600, sigma=1.0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), 2, None)
    docs, next_id = [], 0
    for i, n_tok in enumerate(lengths):
        docs.append(Segment(np.arange(next_id, next_id + n_tok, dtype=np.int32), f"s{i % 3}", f"doc{i}", int(n_tok)))
        next_id += n_tok
    return docs


def _pack(docs, seq_len, buffer_rows=16):
    packer = BestFitPacker(seq_len, buffer_rows)
    rows = []
    for d in docs:
        rows.extend(packer.add(d))
    rows.extend(packer.finish())
    return rows, packer.stats


@pytest.mark.parametrize("seq_len", [1024, 4096])
def test_every_token_lands_once_rows_are_exact_and_fitting_documents_stay_whole(seq_len):
    docs = _docs(3000, median=seq_len // 3)
    rows, stats = _pack(docs, seq_len)
    assert all(sum(len(s.tokens) for s in r) <= seq_len for r in rows)
    pieces: dict[str, list[np.ndarray]] = {}
    for r in rows:
        for s in r:
            pieces.setdefault(s.doc_id, []).append(s.tokens)
    for d in docs:  # pieces of a document come out in order and rebuild it exactly
        got = np.concatenate(pieces[d.doc_id])
        assert np.array_equal(got, d.tokens), d.doc_id
        if len(d.tokens) <= seq_len:
            assert len(pieces[d.doc_id]) == 1
    n_long = sum(len(d.tokens) > seq_len for d in docs)
    assert stats.split_docs == n_long
    assert stats.tokens == sum(len(d.tokens) for d in docs)
    assert stats.rows == len(rows) and stats.rows * seq_len == stats.tokens + stats.pad_tokens
    pad_fraction = stats.pad_tokens / (stats.rows * seq_len)
    assert pad_fraction < 0.01, pad_fraction


def test_best_fit_pads_less_and_splits_fewer_documents_than_greedy():
    seq_len = 8192
    docs = _docs(4000, seed=1, median=1500, sigma=1.3)
    rows, best = _pack(docs, seq_len, buffer_rows=16)
    greedy = GreedyPacker(seq_len)
    for d in docs:
        greedy.add_length(len(d.tokens))
    greedy.finish()
    assert greedy.stats.tokens == best.tokens
    assert best.split_docs < greedy.stats.split_docs / 3
    assert best.pad_tokens / (best.rows * seq_len) < 0.005


def test_packing_is_deterministic():
    docs = _docs(500, seed=4)
    a, _ = _pack(docs, 2048)
    b, _ = _pack(docs, 2048)
    assert [[s.doc_id for s in r] for r in a] == [[s.doc_id for s in r] for r in b]


@pytest.mark.parametrize("attention", ["document", "full"])
def test_row_columns_positions_labels_and_padding_segment(attention):
    L = 16
    b = RowBuilder(L, pad_id=0, attention=attention)
    b.add(0, [Segment(np.arange(1, 6, dtype=np.int32), "web", "a", 5), Segment(np.arange(7, 14, dtype=np.int32), "code", "b", 40)])
    b.add(1, [Segment(np.arange(100, 116, dtype=np.int32), "book", "c", 16)])
    rows = b.table().to_pylist()
    r0, r1 = rows
    assert [r["row_id"] for r in rows] == [0, 1]
    assert r0["seg_lengths"] == [5, 7, 4] and sum(r1["seg_lengths"]) == L
    assert r0["seg_sources"] == ["web", "code", ""] and r0["seg_doc_ids"] == ["a", "b", ""]
    assert r0["seg_doc_tokens"] == [5, 40, 0]
    assert r0["input_ids"] == list(range(1, 6)) + list(range(7, 14)) + [0] * 4
    assert r0["labels"] == r0["input_ids"][:12] + [IGNORE_INDEX] * 4  # unshifted; -100 on padding only
    assert r1["labels"] == r1["input_ids"]
    if attention == "document":
        assert r0["position_ids"] == list(range(5)) + list(range(7)) + list(range(4))
    else:
        assert r0["position_ids"] == list(range(L))
    assert all(len(r[c]) == L for r in rows for c in ("input_ids", "position_ids", "labels"))


def test_concat_packer_cuts_every_seq_len_with_no_padding_and_every_token_in_order():
    seq_len = 1024
    docs = _docs(2000, seed=2, median=700, sigma=1.2)
    packer = ConcatPacker(seq_len)
    rows = []
    for d in docs:
        rows.extend(packer.add(d))
    rows.extend(packer.finish())
    stream = np.concatenate([d.tokens for d in docs])
    assert all(sum(len(s.tokens) for s in r) == seq_len for r in rows)  # no padding anywhere
    out = np.concatenate([s.tokens for r in rows for s in r])
    assert len(out) == len(rows) * seq_len == len(stream) - packer.stats.tail_dropped
    assert 0 <= packer.stats.tail_dropped < seq_len
    assert np.array_equal(out, stream[: len(out)])  # every token, in stream order
    assert packer.stats.pad_tokens == 0 and packer.stats.tokens == len(out)
    # a document is split when a row end falls inside it (GreedyPacker counts the same rule)
    greedy = GreedyPacker(seq_len)
    for d in docs:
        greedy.add_length(len(d.tokens))
    assert packer.stats.split_docs == greedy.stats.split_docs
    b = RowBuilder(seq_len, 0, "full")
    for i, r in enumerate(rows[:5]):
        b.add(i, r)
    t = b.table()
    assert all(s != "" for srcs in t.column("seg_sources").to_pylist() for s in srcs)
    assert t.column("labels").to_pylist() == t.column("input_ids").to_pylist()


def test_concat_packing_with_document_attention_is_refused_by_config_validation():
    from longctx.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.packing=concat .* set data.attention=full"):
        load_config(None, ["data.packing=concat"])
    assert load_config(None, ["data.packing=concat", "data.attention=full"]).data.packing == "concat"
