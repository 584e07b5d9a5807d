"""Greedy decoding with a KV cache and chunked prefill, for evaluation prompts of any length.

    ids = greedy_generate(model, prompt_ids, max_new_tokens=8, eos_token_id=tok.eos_token_id)

Long prompts are prefilled `prefill_chunk` tokens at a time into a `DynamicCache`, so attention memory
stays [chunk x context] instead of [context x context]; only the last position's logits are ever built.
Prompts of equal length decode together as one batch (no padding, no attention mask needed).

NOTE: dynamic NTK RoPE (HF `rope_type="dynamic"`) recomputes its frequencies from the largest position in
each forward call, so a chunked prefill would rotate early keys with a different base than late ones. For
such models the prompt is prefilled in one call, which is what published dynamic-NTK numbers measure.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _rope_type(model) -> str:
    params = getattr(model.config, "rope_parameters", None) or {}
    return str(params.get("rope_type", "default")) if isinstance(params, dict) else "default"


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, prefill_chunk: int = 4096):
    """Run the prompt through the model chunk by chunk; returns (last-position logits [B, V], cache)."""
    from transformers import DynamicCache  # deferred: heavy import, used only here

    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"prefill needs a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    chunk = length if _rope_type(model) == "dynamic" else max(1, int(prefill_chunk))
    cache = DynamicCache(config=model.config)
    logits = None
    for start in range(0, length, chunk):
        piece = input_ids[:, start : start + chunk]
        out = model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
    return logits, cache


@torch.inference_mode()
def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    prefill_chunk: int = 4096,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Greedy continuation of equal-length prompts (a batch); returns the new token ids of each prompt.

    Generation of a row stops at its first stop token (`eos_token_id`, one id or several; not returned);
    the batch stops when every row has stopped or after `max_new_tokens`. Stop tokens cannot be chosen
    during the first `min_new_tokens` steps (LongBench's samsum rule: at least one token, then stop at "\n").
    """
    device = model_device(model)
    ids = prompts if isinstance(prompts, torch.Tensor) else torch.tensor([list(p) for p in prompts], dtype=torch.long)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    ids = ids.to(device)
    eos = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in (eos_token_id or ())}
    logits, cache = prefill(model, ids, prefill_chunk)
    batch = ids.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        if step < min_new_tokens and eos:
            logits = logits.clone()
            logits[:, sorted(eos)] = float("-inf")
        nxt = logits.argmax(dim=-1)
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if tok in eos:
                done[b] = True
            else:
                outputs[b].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
    return outputs
