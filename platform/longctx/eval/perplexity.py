"""Perplexity by position: mean next-token NLL of long held-out documents, bucketed by token position.

    res = perplexity_by_position(model, tokenizer, texts, context_length=1024, bucket_edges=[0, 256, 512, 1024])
    res["mean_nll"]  # one value per bucket [0,256) [256,512) [512,1024)

A model that uses its context gets *lower* NLL at later positions; naive extrapolation past the training
length shows up as NLL climbing in the late buckets. Every document is cut to its first `context_length`
tokens; shorter documents are skipped and counted (mixing lengths would bias late buckets towards long
documents). The token at position p (0-based) is predicted from positions < p, so position 0 has no loss.

NOTE: computed with `use_cache=False` and no attention mask: every row is a full, unpadded document, so
plain causal attention is the correct mask. Logits are built `logits_chunk` positions at a time from the
decoder's last hidden state, so [context x vocab] float32 logits never exist in full.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from longctx.eval.generate import model_device


def bucket_ranges(bucket_edges: Sequence[int], context_length: int) -> list[tuple[int, int]]:
    """[lo, hi) position ranges from edges, clipped to the context and extended to cover all of it."""
    edges = sorted({int(e) for e in bucket_edges if 0 <= int(e) < context_length})
    if not edges or edges[0] != 0:
        edges = [0, *edges]
    edges.append(context_length)
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor, logits_chunk: int = 1024, from_position: int = 1) -> torch.Tensor:
    """Per-position next-token NLL [B, L] (float32; column 0 is 0 because nothing predicts position 0).

    Only positions >= `from_position` are scored (the others stay 0), so scoring an answer after a long
    prompt runs the LM head on the answer alone.
    """
    device = model_device(model)
    input_ids = input_ids.to(device)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    batch, length = input_ids.shape
    nll = torch.zeros(batch, length, dtype=torch.float32)
    if decoder is not None and head is not None and decoder is not model:
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        for start in range(max(0, from_position - 1), length - 1, logits_chunk):
            stop = min(length - 1, start + logits_chunk)
            logits = head(hidden[:, start:stop]).float()
            target = input_ids[:, start + 1 : stop + 1]
            loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll[:, start + 1 : stop + 1] = loss.cpu()
    else:  # models without a separable decoder/head: one full forward
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        nll[:, 1:] = loss.cpu()
        nll[:, : max(1, from_position)] = 0
    return nll


def select_documents(tokenizer, texts: Iterable[str], context_length: int, limit: int | None = None):
    """Token ids of the first `limit` texts with at least `context_length` tokens, each cut to that length.

    Returns (list of id lists, number of texts skipped as too short).
    """
    kept: list[list[int]] = []
    skipped = 0
    # Tokenizing a generous prefix is enough for the first context_length ids (BPE only differs near the
    # cut); long held-out documents are often 10-100x the context, so this saves most of the work.
    prefix_chars = 16 * context_length
    for text in texts:
        ids = tokenizer(text[:prefix_chars], add_special_tokens=False)["input_ids"]
        if len(ids) < context_length + 64 and len(text) > prefix_chars:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < context_length:
            skipped += 1
            continue
        kept.append(list(ids[:context_length]))
        if limit is not None and len(kept) >= limit:
            break
    return kept, skipped


def summarize_position_nll(
    nll_sum: np.ndarray,
    count: np.ndarray,
    bucket_edges: Sequence[int],
    base_context_length: int | None = None,
    curve_points: int = 64,
) -> dict:
    """Bucket means, perplexities, an overall mean, the mean beyond the base length and a plot curve.

    `nll_sum[p]` / `count[p]` are summed over documents for position p (count[0] is 0).
    """
    length = len(nll_sum)
    out: dict = {"buckets": [], "mean_nll": [], "perplexity": [], "tokens": []}
    for lo, hi in bucket_ranges(bucket_edges, length):
        s, c = float(nll_sum[lo:hi].sum()), int(count[lo:hi].sum())
        mean = s / c if c else float("nan")
        out["buckets"].append([lo, hi])
        out["mean_nll"].append(mean)
        out["perplexity"].append(math.exp(mean) if c else float("nan"))
        out["tokens"].append(c)
    total_c = int(count.sum())
    out["overall_nll"] = float(nll_sum.sum()) / total_c if total_c else float("nan")
    out["overall_perplexity"] = math.exp(out["overall_nll"]) if total_c else float("nan")
    if base_context_length is not None and 0 < base_context_length < length:
        s, c = float(nll_sum[base_context_length:].sum()), int(count[base_context_length:].sum())
        w, cw = float(nll_sum[:base_context_length].sum()), int(count[:base_context_length].sum())
        out["nll_within_base"] = w / cw if cw else float("nan")
        out["nll_beyond_base"] = s / c if c else float("nan")
    # a smooth curve for plots: equal-width bins of positions
    bins = max(1, min(curve_points, length - 1))
    edges = np.linspace(1, length, bins + 1).astype(int)
    centers, values = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        c = count[lo:hi].sum()
        if hi > lo and c:
            centers.append(float((lo + hi - 1) / 2))
            values.append(float(nll_sum[lo:hi].sum() / c))
    out["curve"] = {"position": centers, "nll": values}
    return out


def position_nll_sums(model, docs: Sequence[Sequence[int]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of next-token NLL, number of predicted tokens) per position over `docs` (token id lists of one length),
    in batches of `batch_size`: what `summarize_position_nll` takes."""
    length = len(docs[0])
    nll_sum = np.zeros(length, dtype=np.float64)
    count = np.zeros(length, dtype=np.int64)
    for start in range(0, len(docs), batch_size):
        batch = torch.tensor(docs[start : start + batch_size], dtype=torch.long)
        nll_sum += token_nll(model, batch).double().numpy().sum(axis=0)
        count[1:] += batch.shape[0]
    return nll_sum, count


def perplexity_by_position(
    model,
    tokenizer,
    texts: Iterable[str],
    context_length: int,
    bucket_edges: Sequence[int],
    batch_size: int = 4,
    *,
    limit: int | None = None,
    base_context_length: int | None = None,
) -> dict:
    """Mean NLL and perplexity per position bucket over documents cut to `context_length` tokens.

    Returns {"buckets", "mean_nll", "perplexity", "tokens", "overall_nll", "overall_perplexity",
    "nll_within_base"/"nll_beyond_base" (when base_context_length is given), "curve", "documents",
    "skipped_short", "context_length"}.
    """
    docs, skipped = select_documents(tokenizer, texts, context_length, limit)
    if not docs:
        raise ValueError(
            f"perplexity_by_position: no document has {context_length} tokens ({skipped} skipped as too short); "
            "use longer documents or a shorter eval.context_length"
        )
    model.eval()
    nll_sum, count = position_nll_sums(model, docs, batch_size)
    out = summarize_position_nll(nll_sum, count, bucket_edges, base_context_length)
    out.update(documents=len(docs), skipped_short=skipped, context_length=context_length)
    return out
