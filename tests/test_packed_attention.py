"""Packed rows with document attention equal per-document forwards: logits, loss and gradients, in train and eval
mode, for Llama and Qwen2 (and Mistral's logits), on CPU SDPA with our explicit mask; FlexAttention's BlockMask
gives the same logits. A negative control shows the check can fail: HF's packed-position-id inference with a
cache (eval-mode default) leaks attention across documents.
"""

from __future__ import annotations

import pytest
import torch

from longctx.model.attention import (
    attention_inputs,
    document_causal_mask,
    document_ids_from_position_ids,
    document_ids_from_seg_lengths,
)
from longctx.train.loss import chunked_lm_loss, reference_lm_loss, shift_targets

VOCAB, SEQ = 211, 96
LENGTHS = [30, 41, 7, 11]  # last segment plays the padding role in the loss checks


def _model(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return model_cls._from_config(cfg, attn_implementation="sdpa")


def _packed_row():
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return docs, ids, pos


def test_document_ids_and_mask():
    doc = document_ids_from_seg_lengths([[2, 3], [5]], 5)
    assert doc.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert document_ids_from_position_ids(torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])).tolist() == doc.tolist()
    mask = document_causal_mask(doc)[0, 0]
    assert mask[3].tolist() == [False, False, True, True, False]  # token 3 sees its own document up to itself
    with pytest.raises(ValueError, match="sum to 4"):
        document_ids_from_seg_lengths([[2, 2]], 5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_logits_equal_per_document(arch, mode):
    model = _model(arch)
    model.train(mode == "train")
    docs, ids, pos = _packed_row()
    packed = model(input_ids=ids, **attention_inputs(pos, attn_implementation="sdpa")).logits
    offset = 0
    for doc in docs:
        alone = model(input_ids=doc[None], use_cache=False).logits
        diff = (packed[0, offset : offset + len(doc)] - alone[0]).abs().max().item()
        assert diff < 1e-4, f"{arch}/{mode}: document at {offset} differs by {diff}"
        offset += len(doc)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_and_gradients_equal_per_document(arch):
    model = _model(arch).train()
    docs, ids, pos = _packed_row()
    doc_ids = document_ids_from_position_ids(pos)
    labels = ids.clone()
    labels[0, -LENGTHS[-1]:] = -100  # the last segment is padding: no loss
    base, head = model.model, model.get_output_embeddings()

    # Packed: our chunked loss (chunks smaller than the row) over the packed forward.
    hidden = base(input_ids=ids, **attention_inputs(pos, attn_implementation="sdpa", doc_ids=doc_ids)).last_hidden_state
    packed_sum, packed_n = chunked_lm_loss(head, hidden, shift_targets(labels, doc_ids), chunk_tokens=17)
    (packed_sum / packed_n).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # Per document: full logits, HF-style shift inside each document, summed over documents.
    ref_sum, ref_n = 0.0, 0
    for doc in docs[:-1]:
        logits = model(input_ids=doc[None], use_cache=False).logits
        s, n = reference_lm_loss(logits, shift_targets(doc[None]))
        ref_sum, ref_n = ref_sum + s, ref_n + int(n)
    (ref_sum / ref_n).backward()

    assert int(packed_n) == ref_n == sum(LENGTHS[:-1]) - (len(LENGTHS) - 1)
    assert float(packed_sum.detach()) == pytest.approx(float(ref_sum.detach()), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(packed_grads[name], p.grad, atol=1e-6, rtol=1e-4), name


def test_without_explicit_mask_documents_leak_in_eval_mode():
    """Negative control: HF infers documents from position ids only without a cache; with the eval-mode default
    (use_cache=True) the second document attends to the first. Our path always passes the mask."""
    model = _model("llama").eval()
    docs, ids, pos = _packed_row()
    leaky = model(input_ids=ids, position_ids=pos).logits
    alone = model(input_ids=docs[1][None], use_cache=False).logits
    assert (leaky[0, LENGTHS[0] : LENGTHS[0] + LENGTHS[1]] - alone[0]).abs().max().item() > 1e-2


def test_full_attention_mode_passes_no_mask():
    pos = torch.arange(8)[None]
    kwargs = attention_inputs(pos, attn_implementation="sdpa", attention="full")
    assert "attention_mask" not in kwargs and kwargs["use_cache"] is False
    assert "attention_mask" not in attention_inputs(pos, attn_implementation="flash_attention_2")


@pytest.mark.slow
def test_flex_attention_block_mask_matches_sdpa_mask():
    """FlexAttention (the GPU path without flash-attn) with a document BlockMask; runs on CPU too (compiles)."""
    model = _model("llama").eval()
    _, ids, pos = _packed_row()
    with torch.no_grad():
        sdpa = model(input_ids=ids, **attention_inputs(pos, attn_implementation="sdpa")).logits
        model.set_attn_implementation("flex_attention")
        flex = model(input_ids=ids, **attention_inputs(pos, attn_implementation="flex_attention")).logits
    assert (sdpa - flex).abs().max().item() < 1e-4
