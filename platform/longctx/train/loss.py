"""Chunked logits + cross-entropy for packed rows: the full [seq, vocab] logits never exist.

The hidden states of the last layer are cut into chunks of `chunk_tokens` positions; each chunk's logits are
computed, reduced to a summed loss and dropped, and recomputed in backward (activation checkpointing per chunk),
so peak logits memory is chunk_tokens x vocab instead of seq_len x vocab.

Labels arrive unshifted (label[t] is the token at t, -100 where no loss). `shift_targets` builds next-token
targets and, for document attention, drops the target at the last token of every document: that token cannot see
the next document, so predicting its first token is noise (a per-document forward has no such target either).

The loss returned is a *sum* with its token count: the trainer divides by the number of valid tokens in the whole
global batch (all micro-batches, all data-parallel ranks), so short documents are not over-weighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shift_targets(labels: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets [B, S]: target[t] = labels[t+1], IGNORE where t+1 starts a new document or t is last."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if doc_ids is not None:
        crosses = doc_ids[:, 1:] != doc_ids[:, :-1]
        targets[:, :-1][crosses] = IGNORE_INDEX
    return targets


def _chunk_loss_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of target tokens) over positions whose target is not IGNORE_INDEX.

    NOTE: the chunks cover every position, valid or not, so every rank calls the LM head the same number of times:
    under ZeRO-3 each call all-gathers the head's weight, and ranks with different chunk counts would deadlock.
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    n_tokens = (flat_t != IGNORE_INDEX).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_h.shape[0], chunk_tokens):
        hc, tc = flat_h[start : start + chunk_tokens], flat_t[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, lm_head, hc, tc, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, hc, tc)
    return total, n_tokens


class CausalLMWithChunkedLoss(nn.Module):
    """Wraps a Hugging Face causal LM so forward returns (loss_sum, n_tokens) without full logits.

    DeepSpeed wraps this module; `self.lm` is the HF model that gets exported.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = int(chunk_tokens)

    def forward(self, input_ids, targets, **attn_kwargs):
        base = getattr(self.lm, self.lm.base_model_prefix)
        out = base(input_ids=input_ids, **attn_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return chunked_lm_loss(self.lm.get_output_embeddings(), hidden, targets, self.chunk_tokens)


def reference_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and count from full logits (for tests and evaluation of short rows)."""
    flat_t = targets.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_t, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (flat_t != IGNORE_INDEX).sum()
