"""Packed-document attention: per-document causal masks for packed rows, for every attention backend.

A packed row holds several documents back to back. With `data.attention=document` no token may attend across a
document boundary and position ids restart at 0 in every document. How each backend is told:

- `sdpa` (CPU, and GPU without flash-attn): an explicit boolean 4D mask [B, 1, S, S] (True = attend), causal AND
  same document. transformers 5 passes a 4D mask through untouched (`_preprocess_mask_arguments` returns early),
  so the model sees exactly this mask.
- `eager`: the same mask as an *additive* float mask (0 = attend, dtype minimum = masked). NOTE: the eager kernels
  compute `scores + attention_mask`; a boolean mask added to the scores adds 1 or 0 and masks nothing (packed
  documents then attend to each other: 0.65 logit deviation measured on the tiny model).
- `flex_attention`: a `BlockMask` built from the document boundaries (`document_block_mask`; skips fully masked
  blocks, so cost grows with the sum of squared document lengths, not the squared row length).
- `flash_attention_2`: no mask; the varlen kernel reads document starts from the restarting position ids. It does
  so only for a batch of ONE row (transformers' `_is_packed_sequence`), so the trainer flattens a micro-batch of
  several rows into one varlen row (`longctx.train.batches.forward_inputs`).

`longctx.train.isolation` proves at the start of every training run, on the configured backend, that packed
logits equal per-document logits.

NOTE: in transformers 5, SDPA with packed position ids and *no* mask only separates documents when use_cache is
False and no 2D mask is passed (it infers boundaries from position ids). We never rely on that inference: the
mask is always explicit, and `use_cache=False` is always passed. tests/test_packed_attention.py proves packed
logits and loss equal per-document forwards for Llama and Qwen2.

This module is model-side: it imports torch only (no Ray, no DeepSpeed).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake


def document_ids_from_seg_lengths(seg_lengths: Sequence[Sequence[int]], seq_len: int) -> torch.Tensor:
    """[B, S] int32 document index of every token, from each row's segment lengths (padding is its own segment)."""
    rows = []
    for i, lengths in enumerate(seg_lengths):
        lengths = [int(n) for n in lengths]
        if sum(lengths) != seq_len:
            raise ValueError(f"row {i}: seg_lengths sum to {sum(lengths)}, expected seq_len={seq_len}")
        ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
        rows.append(ids)
    return torch.stack(rows)


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] document index inferred from position ids: a new document starts wherever the position does not
    increase by one (a restart at 0, or any jump)."""
    if position_ids.ndim == 1:
        position_ids = position_ids.unsqueeze(0)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return (torch.cumsum(starts.to(torch.int32), dim=1) - 1).to(torch.int32)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] boolean mask (True = may attend): causal within a document, nothing across documents."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril_()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal).unsqueeze(1)


def document_additive_mask(doc_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, S, S] additive mask for kernels that add the mask to the scores (eager): 0 where a token may attend,
    the dtype's minimum elsewhere."""
    allowed = document_causal_mask(doc_ids)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def document_block_mask(doc_ids: torch.Tensor, block_size: int = 128):
    """FlexAttention `BlockMask` for causal attention within documents (for attn_implementation=flex_attention).

    Built from the document boundaries, block by block: O((S/block)^2) work and memory. (`create_block_mask`
    without compilation evaluates the mask function on every one of the S x S pairs: 16 GiB at 128K tokens.) A
    block pair is *full* (no mask_mod call) when it lies strictly below the diagonal inside one document, *partial*
    when its document ranges overlap otherwise, skipped when they do not. Document ids must be non-decreasing
    along each row (as `document_ids_from_position_ids` makes them).
    """
    from torch.nn.attention.flex_attention import BlockMask  # deferred: heavy import, used only here

    b, s = doc_ids.shape
    docs = doc_ids.to(torch.int32)
    # NOTE: a fake tensor (longctx.plan traces on them) has no values to check
    if b and s > 1 and not is_fake(docs) and bool((docs[:, 1:] < docs[:, :-1]).any()):
        raise ValueError("document ids must be non-decreasing along each row")
    n = -(-s // block_size)
    starts = torch.arange(n, device=docs.device) * block_size
    ends = torch.clamp(starts + block_size, max=s) - 1
    first, last = docs[:, starts], docs[:, ends]  # [B, n] document range of each block
    q_first, q_last = first[:, :, None], last[:, :, None]
    k_first, k_last = first[:, None, :], last[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=docs.device).tril_()
    below = torch.ones(n, n, dtype=torch.bool, device=docs.device).tril_(-1)
    overlap = (k_first <= q_last) & (q_first <= k_last) & causal
    full = overlap & below & (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
    if s % block_size:  # a ragged last block is never full (as create_block_mask, which pads it with masked pairs)
        full[:, -1, :] = False
        full[:, :, -1] = False
    partial = overlap & ~full

    def kv_blocks(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = sel.sum(-1).to(torch.int32)[:, None]  # [B, 1, n]
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]  # selected first
        return counts, order

    def mask_mod(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[batch, q_idx] == docs[batch, kv_idx])

    kv_num, kv_idx = kv_blocks(partial)
    full_num, full_idx = kv_blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(s, s))


def attention_inputs(
    position_ids: torch.Tensor,
    *,
    attn_implementation: str,
    attention: str = "document",
    doc_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Keyword arguments for a packed forward: `position_ids` plus the mask this backend needs.

    `attention="full"` (Fu et al.): plain causal attention over the whole row, no mask argument. `dtype`: the
    model's compute dtype (eager's additive mask is built in it).
    """
    kwargs: dict = {"position_ids": position_ids, "use_cache": False}
    if attention == "full":
        return kwargs
    if attention != "document":
        raise ValueError(f"attention must be 'document' or 'full', got {attention!r}")
    if attn_implementation == "flash_attention_2":
        return kwargs  # varlen kernel reads document starts from the restarting position ids
    if doc_ids is None:
        doc_ids = document_ids_from_position_ids(position_ids)
    doc_ids = doc_ids.to(position_ids.device)
    if attn_implementation == "flex_attention":
        kwargs["attention_mask"] = document_block_mask(doc_ids)
    elif attn_implementation == "sdpa":
        kwargs["attention_mask"] = document_causal_mask(doc_ids)
    elif attn_implementation == "eager":
        kwargs["attention_mask"] = document_additive_mask(doc_ids, dtype)
    else:
        raise ValueError(f"no packed-document mask for attn_implementation={attn_implementation!r}")
    return kwargs


def sum_squared_document_lengths(seg_lengths: Sequence[int], pad_last: bool = False) -> int:
    """Sum of squared document lengths of one row (attention FLOPs scale with it); padding excluded when
    `pad_last` says the last segment is padding."""
    lengths = [int(n) for n in seg_lengths]
    if pad_last and lengths:
        lengths = lengths[:-1]
    return sum(n * n for n in lengths)
