"""CIP-k (chunk-interleaved pretraining): every chunk of every chosen document exactly once, in document order,
chunk rounds in order, full-attention positions, the requested share of rows, and the same rows whether CIP runs
inside the data engine's packing pass (`data.cip.fraction`) or as the Ray Data stage over committed shards."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from longctx import storage
from longctx.config import load_config
from longctx.data import prepare_data
from longctx.data.pack import PACKED_SCHEMA, RowBuilder, Segment
from longctx.data.cip import chunk_bounds, cip_row_count, cip_table, is_cip_row
from longctx.data.synthetic.cip import synth_cip
from longctx.model.attention import attention_inputs

SEQ = 128


def _rows(uri: str) -> list[dict]:
    manifest = json.loads(storage.read_text(storage.join(uri, "manifest.json")))
    rows = []
    for shard in manifest["shards"]:
        rows += pq.read_table(storage.join(uri, shard["path"])).to_pylist()
    return sorted(rows, key=lambda r: r["row_id"])


def _check_cip_row(plain: dict, cip: dict, k: int) -> None:
    """`cip` is the CIP-k rewrite of `plain`: each document's chunks, concatenated in emission order, are the
    document; chunk i of every document comes before chunk i+1 of any; nothing else moved."""
    L = len(plain["input_ids"])
    assert cip["position_ids"] == list(range(L))
    assert sum(cip["seg_lengths"]) == L
    bounds = np.cumsum([0] + plain["seg_lengths"])
    docs = [(d, plain["input_ids"][a:b], plain["labels"][a:b])
            for d, a, b in zip(plain["seg_doc_ids"], bounds[:-1], bounds[1:]) if d != ""]
    assert len({d for d, _, _ in docs}) == len(docs), "test corpus has unique documents per row"
    cb = np.cumsum([0] + cip["seg_lengths"])
    chunks = [(d, cip["input_ids"][a:b], cip["labels"][a:b], s)
              for d, a, b, s in zip(cip["seg_doc_ids"], cb[:-1], cb[1:], cip["seg_sources"])]
    pad = [c for c in chunks if c[0] == ""]
    real = [c for c in chunks if c[0] != ""]
    assert len(pad) == (1 if plain["seg_doc_ids"][-1] == "" else 0)
    if pad:
        assert chunks[-1][0] == "" and chunks[-1][1] == plain["input_ids"][-len(pad[0][1]):]
    seen_round: dict[str, int] = {}
    rounds = []
    for d, ids, labels, source in real:
        seen_round[d] = seen_round.get(d, -1) + 1
        rounds.append(seen_round[d])
    assert rounds == sorted(rounds), "all first chunks, then all second chunks, ..."
    for d, ids, labels in docs:
        mine = [c for c in real if c[0] == d]
        n = len(ids)
        assert len(mine) == min(k, n)
        assert [len(c[1]) for c in mine] == [b - a for a, b in chunk_bounds(n, k)]
        assert sum((c[1] for c in mine), []) == ids, f"{d}: chunks are not the document in order"
        assert sum((c[2] for c in mine), []) == labels
        src = plain["seg_sources"][plain["seg_doc_ids"].index(d)]
        assert {c[3] for c in mine} == {src}
        assert {t for t, dd in zip(cip["seg_doc_tokens"], cip["seg_doc_ids"]) if dd == d} == {
            plain["seg_doc_tokens"][plain["seg_doc_ids"].index(d)]}


def test_interleave_one_row_and_share_of_rows():
    rng = np.random.default_rng(0)
    builder = RowBuilder(SEQ, pad_id=0, attention="document")
    lengths = [[40, 33, 21, 1, 12], [SEQ], [5, 7]]
    for r, ls in enumerate(lengths):
        builder.add(r, [Segment(rng.integers(3, 2000, n).astype(np.int32), f"s{j % 2}", f"r{r}d{j}", n + j)
                        for j, n in enumerate(ls)])
    plain = builder.table()
    for k in (1, 2, 3):
        out = cip_table(plain, k=k, fraction=1.0)
        assert out.schema == PACKED_SCHEMA
        for p, c in zip(plain.to_pylist(), out.to_pylist()):
            _check_cip_row(p, c, k)
    # k=2 on row 0 by hand: a1 b1 c1 d1 e1 a2 b2 c2 e2 pad (d has one token: one chunk)
    row = cip_table(plain, 2, 1.0).to_pylist()[0]
    assert row["seg_doc_ids"] == ["r0d0", "r0d1", "r0d2", "r0d3", "r0d4", "r0d0", "r0d1", "r0d2", "r0d4", ""]
    assert row["seg_lengths"] == [20, 17, 11, 1, 6, 20, 16, 10, 6, SEQ - 107]
    # the share of rows: exactly floor(N f), evenly spread, a pure function of row_id
    for f in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0):
        picked = [r for r in range(1000) if is_cip_row(r, f)]
        assert len(picked) == cip_row_count(1000, f) == int(np.floor(1000 * f + 1e-9))
        if len(picked) > 2:
            assert max(np.diff(picked)) <= int(np.ceil(1 / f))
    half = cip_table(plain, 2, 0.5).to_pylist()
    assert [is_cip_row(r["row_id"], 0.5) for r in half] == [False, True, False]
    assert half[0] == plain.to_pylist()[0] and half[2] == plain.to_pylist()[2]


def test_cip_row_attends_across_documents():
    """A CIP row's position ids do not restart, so the mask derived from them is one causal block (the later
    chunk of a document can see its earlier chunk); a document row's mask stays block-diagonal."""
    rng = np.random.default_rng(1)
    builder = RowBuilder(16, pad_id=0, attention="document")
    builder.add(0, [Segment(rng.integers(3, 100, 6).astype(np.int32), "s", "a", 6),
                    Segment(rng.integers(3, 100, 10).astype(np.int32), "s", "b", 10)])
    plain = builder.table()
    cip = cip_table(plain, 2, 1.0)
    for table, blocks in ((plain, 2), (cip, 1)):
        pos = torch.tensor(table.column("position_ids").to_pylist())
        mask = attention_inputs(pos, attn_implementation="sdpa", attention="document")["attention_mask"][0, 0]
        causal = torch.ones(16, 16, dtype=torch.bool).tril()
        if blocks == 1:
            assert torch.equal(mask, causal)
        else:
            assert not mask[6:, :6].any() and mask[6:, 6:].equal(causal[:10, :10])


def _write_corpus(root, rng) -> dict:
    words = [f"w{i}" for i in range(400)]
    docs = {"alpha": [], "beta": []}
    for src, n, mean in (("alpha", 40, 30), ("beta", 25, 60)):
        for i in range(n):
            docs[src].append({"id": f"{src}-{i}", "text": " ".join(rng.choice(words, max(2, int(rng.exponential(mean)))))})
        with gzip.open(root / f"{src}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in docs[src])
    return {s: {"uri": str(root / f"{s}.jsonl.gz"), "id_field": "id"} for s in docs}


@pytest.mark.ray
@pytest.mark.slow
def test_cip_in_packing_pass_and_as_ray_data_stage(ray_cluster, tmp_path):
    sources = _write_corpus(tmp_path, np.random.default_rng(2))
    over = [f"data.seq_len={SEQ}", "data.long_threshold=64", "data.strategy=cut-seq", "data.rows_per_shard=16",
            "data.cip.k=2"]
    cfg = load_config(None, over)
    cfg.data.sources = sources
    plain = prepare_data(cfg, str(tmp_path / "plain"))
    cfg.data.cip.fraction = 0.5
    mixed = prepare_data(cfg, str(tmp_path / "mixed"))
    plain_rows, mixed_rows = _rows(plain["uri"]), _rows(mixed["uri"])
    n = len(plain_rows)
    assert n == len(mixed_rows) >= 8
    assert mixed["params"]["cip"] == {"k": 2, "fraction": 0.5, "rows": n // 2,
                                      "attention": "full (position ids 0..seq_len-1)"}
    cip_ids = [r["row_id"] for r in mixed_rows if is_cip_row(r["row_id"], 0.5)]
    assert len(cip_ids) == n // 2
    for p, m in zip(plain_rows, mixed_rows):
        if is_cip_row(p["row_id"], 0.5):
            _check_cip_row(p, m, 2)
        else:
            assert p == m
    # The Ray Data stage over the committed plain shards gives byte-identical rows and the same CIP params.
    staged = synth_cip(cfg, str(tmp_path / "staged"), packed=plain["uri"], fraction=0.5)
    assert _rows(staged["uri"]) == mixed_rows
    assert staged["params"]["cip"]["rows"] == n // 2
    assert sum(staged["params"]["cip"]["chunk_tokens"]["counts"]) == staged["params"]["cip"]["chunks"]


def test_trainer_collate_keeps_cip_rows_one_causal_block():
    """The trainer's batches take attention spans from position ids: a CIP row (one run of positions over
    several document chunks) stays one block; an ordinary packed row splits at every document; padding is
    excluded from the attention FLOPs either way."""
    from longctx.train.batches import PackedRow, collate

    seq = 10
    ids = np.arange(seq, dtype=np.int32)
    cip = PackedRow(row_id=0, input_ids=ids, position_ids=np.arange(seq, dtype=np.int32), labels=ids,
                    seg_lengths=[3, 3, 2, 2], seg_is_pad=[False, False, False, True])
    plain = PackedRow(row_id=1, input_ids=ids, position_ids=np.array([0, 1, 2, 0, 1, 2, 0, 1, 0, 1], np.int32),
                      labels=ids, seg_lengths=[3, 3, 2, 2], seg_is_pad=[False, False, False, True])
    mb = collate([cip, plain], attention="document")
    assert mb.doc_ids[0, :8].unique().numel() == 1  # CIP: chunks of different documents attend to each other
    assert mb.doc_ids[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert mb.non_pad_tokens == 16
    assert mb.sum_sq_doc_lengths == 8 * 8 + (3 * 3 + 3 * 3 + 2 * 2)
