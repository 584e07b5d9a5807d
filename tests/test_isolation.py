"""Packing isolation proved at start (longctx.train.isolation) and the backend fixes it rests on: eager gets an
additive mask, flash_attention_2 micro-batches are flattened into one varlen row, the FlexAttention BlockMask is
built from document boundaries. Negative controls show the check fails, naming the backend and the deviation,
when documents do see each other."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from longctx.model.attention import (
    attention_inputs,
    document_block_mask,
    document_causal_mask,
    document_ids_from_position_ids,
    document_ids_from_seg_lengths,
)
from longctx.train.batches import PackedRow, collate, forward_inputs
from longctx.train.isolation import PackingLeakError, check_packing_isolation
from longctx.train.loss import shift_targets

VOCAB, SEQ = 211, 96
LAYOUTS = [[30, 41, 7, 18], [50, 46], [96], [10, 20, 30, 36]]


def _model(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=impl).train()


def _micro(n_rows: int):
    g = np.random.default_rng(1)
    rows = []
    for i in range(n_rows):
        lengths = LAYOUTS[i % len(LAYOUTS)]
        rows.append(PackedRow(row_id=i, input_ids=g.integers(0, VOCAB, SEQ),
                              position_ids=np.concatenate([np.arange(n) for n in lengths]),
                              labels=g.integers(0, VOCAB, SEQ), seg_lengths=lengths, seg_is_pad=[False] * len(lengths)))
    return collate(rows, "document")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mbs", [1, 3])
def test_isolation_check_passes_on_cpu_backends(impl, mbs):
    model = _model(impl)
    micro = _micro(mbs)
    result = check_packing_isolation(model, micro, attn_implementation=impl, attention="document", device="cpu")
    assert result.max_deviation < 1e-5 and result.tolerance == 1e-4
    assert result.documents == sum(len(LAYOUTS[i]) for i in range(mbs))
    assert model.training  # restored after the check
    assert f"on {impl}" in result.line() and "cost" in result.line()


@pytest.mark.slow
def test_isolation_check_passes_on_flex_attention():
    """FlexAttention runs on CPU too (compiled, ~25 s here): the packed forward with the BlockMask built from
    document boundaries, micro-batch of 2; the documents alone run on SDPA (a new length would recompile flex)."""
    model = _model("flex_attention")
    result = check_packing_isolation(model, _micro(2), attn_implementation="flex_attention", attention="document",
                                     device="cpu")
    assert result.max_deviation < 1e-5 and result.documents == 6
    assert model.config._attn_implementation == "flex_attention" and model.training


def test_eager_boolean_mask_leaks_and_is_caught():
    """Negative control, and the bug this module fixed: eager adds the mask to the scores, so a boolean mask
    (True/False -> +1/+0) masks nothing. The check refuses it, naming the backend and the deviation."""
    model = _model("eager")

    def boolean_mask_inputs(m, tgt, *, attn_implementation, attention, device, dtype):
        return m.input_ids, None, {"position_ids": m.position_ids, "use_cache": False,
                                   "attention_mask": document_causal_mask(m.doc_ids)}

    with pytest.raises(PackingLeakError, match=r"attn_implementation=eager.*differ .* by up to (\d|0\.[1-9])") as e:
        check_packing_isolation(model, _micro(2), attn_implementation="eager", attention="document", device="cpu",
                                inputs_fn=boolean_mask_inputs)
    assert "refusing to train" in str(e.value)
    kwargs = attention_inputs(torch.tensor([[0, 1, 0, 1]]), attn_implementation="eager")
    mask = kwargs["attention_mask"]
    assert mask.dtype == torch.float32 and mask[0, 0, 2].tolist() == [torch.finfo(torch.float32).min] * 2 + [0.0] + \
        [torch.finfo(torch.float32).min]


def test_causal_mask_over_packed_row_is_caught():
    """Negative control: plain causal attention over the whole packed row (what a backend that ignores document
    boundaries does) fails the check on SDPA."""
    model = _model("sdpa")

    def row_causal_inputs(m, tgt, *, attn_implementation, attention, device, dtype):
        b, s = m.input_ids.shape
        causal = torch.ones(b, 1, s, s, dtype=torch.bool).tril()
        return m.input_ids, None, {"position_ids": m.position_ids, "use_cache": False, "attention_mask": causal}

    with pytest.raises(PackingLeakError, match="attn_implementation=sdpa.*micro_batch_size=2") as e:
        check_packing_isolation(model, _micro(2), attn_implementation="sdpa", attention="document", device="cpu",
                                inputs_fn=row_causal_inputs)
    deviation = float(str(e.value).split("by up to ")[1].split()[0])
    assert deviation > 1e-2


def test_flash_micro_batch_is_flattened_into_one_varlen_row():
    """flash_attention_2 is GPU-only; what it is given is checked here with transformers' own varlen helpers:
    a batch of 3 rows is not recognised as packed, the flattened row is, with cu_seqlens at every document start
    of every row. Other backends keep [B, S] with a mask."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    micro = _micro(3)
    targets = shift_targets(micro.labels, micro.doc_ids)
    assert not _is_packed_sequence(micro.position_ids, batch_size=3)  # the bug: no mask, not detected as packed
    ids, tgt, kwargs = forward_inputs(micro, targets, attn_implementation="flash_attention_2", attention="document",
                                      device="cpu")
    assert ids.shape == (1, 3 * SEQ) and tgt.shape == (1, 3 * SEQ) and "attention_mask" not in kwargs
    assert torch.equal(ids[0], micro.input_ids.reshape(-1)) and torch.equal(tgt[0], targets.reshape(-1))
    pos = kwargs["position_ids"]
    assert _is_packed_sequence(pos, batch_size=1)
    (cu_q, _), _ = prepare_fa_kwargs_from_position_ids(pos)
    starts, offset = [], 0
    for lengths in LAYOUTS[:3]:
        for n in lengths:
            starts.append(offset)
            offset += n
    assert cu_q.tolist() == starts + [offset]
    # The flattened row's documents are exactly the batch's documents (no target crosses a row or a document).
    flat_docs = document_ids_from_position_ids(pos)
    assert int(flat_docs.max()) + 1 == sum(len(x) for x in LAYOUTS[:3])
    assert (tgt[0, SEQ - 1] == -100) and (tgt[0, 2 * SEQ - 1] == -100)

    # Semantics: a forward of the flattened row with its document mask equals the batched forward.
    model = _model("sdpa").eval()
    with torch.no_grad():
        batched = model(input_ids=micro.input_ids, **attention_inputs(micro.position_ids, attn_implementation="sdpa",
                                                                      doc_ids=micro.doc_ids)).logits
        flat = model(input_ids=ids, **attention_inputs(pos, attn_implementation="sdpa")).logits
    assert (flat.reshape(batched.shape) - batched).abs().max().item() < 1e-5

    for impl in ("sdpa", "eager", "flex_attention"):  # unchanged layout for mask-based backends
        ids2, _, kw = forward_inputs(micro, targets, attn_implementation=impl, attention="document", device="cpu")
        assert ids2.shape == (3, SEQ) and "attention_mask" in kw
    bad = _micro(2)
    bad.position_ids[1] += 1  # a row not starting at position 0 would merge into the row before
    with pytest.raises(ValueError, match="do not start at position 0"):
        forward_inputs(bad, None, attn_implementation="flash_attention_2", attention="document", device="cpu")


def test_block_mask_from_boundaries_equals_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    for trial in range(12):
        rnd = random.Random(trial)
        s, block = rnd.choice([64, 130, 256, 300]), rnd.choice([16, 32, 128])
        rows = []
        for _ in range(2):
            lengths, left = [], s
            while left:
                n = min(left, rnd.randint(1, 90))
                lengths.append(n)
                left -= n
            rows.append(lengths)
        docs = document_ids_from_seg_lengths(rows, s)
        ours = document_block_mask(docs, block)
        ref = create_block_mask(lambda b, h, q, k: (q >= k) & (docs[b, q] == docs[b, k]), B=2, H=None, Q_LEN=s,
                                KV_LEN=s, device="cpu", BLOCK_SIZE=block)
        assert torch.equal(ours.to_dense(), ref.to_dense()), trial
        assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks) and torch.equal(ours.full_kv_num_blocks,
                                                                                  ref.full_kv_num_blocks), trial
    # 64K tokens in 16 documents: (512 x 512 blocks), never the 64K x 64K pair mask.
    big = document_block_mask(document_ids_from_seg_lengths([[4096] * 16], 65536))
    assert big.kv_num_blocks.shape == (1, 1, 512)
    assert int(big.full_kv_num_blocks.sum()) == 16 * (32 * 31 // 2)  # below-diagonal blocks inside each document


@pytest.mark.ray
@pytest.mark.slow
def test_training_refuses_before_its_first_step(ray_cluster, tmp_path):
    """In a real Ray Train + DeepSpeed run the check runs on the first micro-batch and a failure stops the run
    before any optimizer step. Forced here with a tolerance below float32 rounding noise (every CPU backend now
    isolates documents; the negative controls above show real leaks being caught): these rows hold several
    documents per row, whose packed and alone forwards differ in the last bits (a row holding one document
    starting at 0 can match exactly, so the data here is chosen with 10-40 token documents in 64-token rows)."""
    from transformers import AutoConfig

    from longctx.config import load_config
    from longctx.train.trainer import run_training
    from train_helpers import make_tiny_model, packed_rows, write_packed_shards

    model_dir = make_tiny_model(str(tmp_path / "model"), hidden=32, max_pos=64)
    table = packed_rows(4, 64, AutoConfig.from_pretrained(model_dir).vocab_size, seed=3, min_doc=10, max_doc=40)
    data_uri = write_packed_shards(str(tmp_path / "data"), table, rows_per_shard=4)
    cfg = load_config(None, [f"model.path={model_dir}", "data.seq_len=64", "train.num_workers=1", "train.zero_stage=0",
                             "train.global_batch_tokens=128", "train.micro_batch_size=2", "train.max_steps=2",
                             "train.isolation_tolerance=1e-12"])
    with pytest.raises(Exception, match="refusing to train") as e:
        run_training(cfg, data_uri, str(tmp_path / "run" / "train"), run_id="run")
    msg = str(e.value)
    assert "attn_implementation=sdpa" in msg and "micro_batch_size=2" in msg and "differ from per-document" in msg
    metrics = tmp_path / "run" / "train" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # no step was taken
    assert not list((tmp_path / "run" / "train").glob("checkpoint_*"))
