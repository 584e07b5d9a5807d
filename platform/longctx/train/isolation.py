"""Packing isolation, proved at the start of every training run on the real backend.

Before the first optimizer step the trainer runs its first real micro-batch twice: packed, exactly as training
will run it (configured attention backend, micro-batch size, sequence-parallel degree, the flattening of
`forward_inputs`), and per document (each document alone, positions from 0). With document attention the final
hidden states (the LM head's input, so the logits) of every document must agree; if they do not, documents see
each other and the run refuses to train, naming the backend and the largest deviation.

    result = check_packing_isolation(lm, micro, attn_implementation="sdpa", attention="document", device=dev)
    # raises PackingLeakError beyond tolerance; result.max_deviation, result.seconds, result.documents

Deviation = max |packed - alone| over the compared positions, divided by max(1, max |alone|) (scale-aware);
tolerance 1e-4 in float32, 3e-2 in bfloat16/float16 (`train.isolation_tolerance` overrides). Hidden states
rather than full logits are compared because logits are a fixed linear map of them and a [seq_len, vocab] logits
tensor is what the chunked loss exists to avoid (and, under ZeRO-3, the LM head is partitioned).

The per-document reference runs on the configured backend too, except flex_attention without sequence
parallelism: there each new sequence length compiles a new kernel (tens of seconds each), so the documents alone
run on SDPA (exact causal attention) and the packed forward, the thing under test, on FlexAttention.

Cost: one packed forward plus forwards of the compared documents (at most `max_documents`; together about the
tokens of a micro-batch), without gradients: about two forwards, i.e. < 1 micro-step of a run. Every rank
runs the same number of forwards of the same lengths (padded with repeats), since ZeRO-3 gathers parameters
collectively; the ranks of a sequence-parallel group run each forward together (each its shard) and all-gather
the hidden states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.model.attention import attention_inputs
from longctx.train.sequence_parallel import shard_for_rank

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


class PackingLeakError(RuntimeError):
    """Packed documents attend to each other on this backend/layout: training would learn across documents."""


@dataclass
class IsolationResult:
    backend: str
    documents: int
    """Documents compared."""
    max_deviation: float
    """Largest scale-relative |packed - alone| of the final hidden states."""
    tolerance: float
    seconds: float
    forwards: int
    """Forward passes this rank ran (packed + per document + padding)."""
    worst: str
    """Where the largest deviation is (row, document, tokens)."""

    def line(self) -> str:
        return (f"packing isolation on {self.backend}: {self.documents} documents of the first micro-batch, packed == "
                f"alone within {self.max_deviation:.2e} (tolerance {self.tolerance:.0e}); cost {self.seconds:.2f}s "
                f"({self.forwards} forwards, no backward)")


def _hidden(lm, input_ids: torch.Tensor, kwargs: dict, sp: int, sp_rank: int, sp_group) -> torch.Tensor:
    """Final hidden states [B, S, H] of the base model; with sequence parallelism each rank of the group runs its
    shard and the shards are all-gathered."""
    base = getattr(lm, lm.base_model_prefix)
    if sp > 1:
        pos = kwargs["position_ids"]
        out = base(input_ids=shard_for_rank(input_ids, sp_rank, sp),
                   position_ids=shard_for_rank(pos, sp_rank, sp), use_cache=False).last_hidden_state.contiguous()
        parts = [torch.empty_like(out) for _ in range(sp)]
        dist.all_gather(parts, out, group=sp_group)
        return torch.cat(parts, dim=1)
    return base(input_ids=input_ids, **kwargs).last_hidden_state


def _spans(doc_ids: torch.Tensor, max_documents: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of the documents to compare: up to max_documents, spread over the rows (a row's first
    document matters too: flattened micro-batches join rows)."""
    per_row = []
    for r in range(doc_ids.shape[0]):
        ids = doc_ids[r]
        starts = [0] + (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
        ends = starts[1:] + [ids.numel()]
        per_row.append([(r, s, e) for s, e in zip(starts, ends)])
    out, i = [], 0
    while len(out) < max_documents and any(i < len(row) for row in per_row):
        out += [row[i] for row in per_row if i < len(row)]
        i += 1
    return out[:max_documents]


def check_packing_isolation(lm, micro, *, attn_implementation: str, attention: str, device, sp: int = 1,
                            sp_rank: int = 0, sp_group=None, tolerance: float | None = None,
                            max_documents: int = 32, inputs_fn=None) -> IsolationResult:
    """Compare the packed forward of `micro` (a `MicroBatch`) with per-document forwards; raise PackingLeakError
    beyond tolerance. The packed forward's inputs come from `inputs_fn` (default: `forward_inputs`, what training
    uses; tests pass a leaking one as the negative control). Call on every rank of the run at the same point
    (forwards are collective under ZeRO-3 and sequence parallelism)."""
    from longctx.train.batches import forward_inputs  # deferred: pulls in pyarrow, used only here

    t0 = time.perf_counter()
    dtype = next(lm.parameters()).dtype
    tol = tolerance if tolerance is not None else TOLERANCE.get(dtype, 3e-2)
    was_training = lm.training
    lm.eval()
    forwards = 0
    reference_impl = attn_implementation
    try:
        with torch.no_grad():
            b, s = micro.input_ids.shape
            if sp > 1:  # the sequence-parallel core rebuilds document masks from the gathered position ids
                ids, kwargs = micro.input_ids.to(device), {"position_ids": micro.position_ids.to(device)}
            else:
                ids, _, kwargs = (inputs_fn or forward_inputs)(micro, None, attn_implementation=attn_implementation,
                                                               attention=attention, device=device, dtype=dtype)
            packed = _hidden(lm, ids, kwargs, sp, sp_rank, sp_group).reshape(b, s, -1).float()
            forwards += 1
            spans = _spans(micro.doc_ids, max_documents)
            n_local = len(spans)
            n_max = n_local
            lengths = [end - start for _, start, end in spans]
            if dist.is_available() and dist.is_initialized():
                t = torch.tensor([n_local], dtype=torch.int64, device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                n_max = int(t.item())
                # NOTE: forward k has the same length on every rank (the longest), not only the same count: with
                # ZeRO-3 and tiled MLP (or any length-dependent collective) forwards of different lengths issue
                # different collectives, and the ranks' first micro-batches hold different documents
                t = torch.tensor([lengths[k] if k < n_local else lengths[0] for k in range(n_max)], dtype=torch.int64,
                                 device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                lengths = [int(x) for x in t.tolist()]
            worst, where = 0.0, "-"
            if attn_implementation == "flex_attention" and sp == 1:
                reference_impl = "sdpa"
                lm.set_attn_implementation("sdpa")
            for k in range(n_max):
                r, start, end = spans[k] if k < n_local else spans[0]  # repeats keep collective forwards even
                doc = micro.input_ids[r : r + 1, start:end]
                length = end - start
                padded = -(-max(length, lengths[k]) // sp) * sp  # sequence-parallel forwards need a multiple of sp
                if padded != length:  # causal: padding after the document changes none of its states
                    doc = torch.cat([doc, doc[:, -1:].expand(1, padded - length)], dim=1)
                pos = torch.arange(padded).unsqueeze(0)
                kw = attention_inputs(pos.to(device), attn_implementation=reference_impl, attention="full") \
                    if sp == 1 else {"position_ids": pos.to(device)}
                alone = _hidden(lm, doc.to(device), kw, sp, sp_rank, sp_group)[0, :length].float()
                forwards += 1
                if k >= n_local:
                    continue
                got = packed[r, start:end]
                dev = float((got - alone).abs().max()) / max(1.0, float(alone.abs().max()))
                if dev > worst:
                    worst, where = dev, f"row {micro.row_ids[r]} tokens {start}..{end - 1}"
    finally:
        if reference_impl != attn_implementation:
            lm.set_attn_implementation(attn_implementation)
        lm.train(was_training)
    result = IsolationResult(backend=attn_implementation, documents=n_local, max_deviation=worst, tolerance=tol,
                             seconds=time.perf_counter() - t0, forwards=forwards, worst=where)
    if worst > tol:
        raise PackingLeakError(
            f"packed documents are not isolated on attn_implementation={attn_implementation} (data.attention="
            f"{attention}, micro_batch_size={b}, sequence_parallel={sp}): the first micro-batch's final hidden "
            f"states differ from per-document forwards by up to {worst:.3g} (tolerance {tol:.0e}) at {where}. "
            "Training would let documents attend to each other; refusing to train. Use attn_implementation=sdpa, "
            "train.micro_batch_size=1, or report this backend; train.isolation_check=false skips the check.")
    return result
