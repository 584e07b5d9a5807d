"""Cost of the packing-isolation check (longctx.train.isolation) against the training it guards.

    python bench/isolation_cost.py                              # shipped tiny Llama, seq_len 1024, sdpa, CPU
    python bench/isolation_cost.py --seq-len 2048 --micro-batch-size 2 --attn eager --steps 6

One process, no Ray: the model (any HF folder, `--model`) is loaded as training loads it; rows are packed from
random documents (lengths drawn from --doc-lengths). Paired variants on the same rows:
(a) the isolation check on the first micro-batch (packed forward + per-document forwards, no gradients);
(b) training micro-steps exactly as the loop runs them (forward_inputs -> chunked loss -> backward -> AdamW).
Printed: both times, and the check's share of a 1,000-step run = check / (1000 x grad_accum x micro-step).
The first micro-step (warm-up) is reported apart and left out of the mean. Load average printed: on a shared
machine compare the two variants of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=4, help="micro-steps per optimizer step (tiny recipe: 4)")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--steps", type=int, default=5, help="micro-steps timed for (b)")
    p.add_argument("--doc-lengths", default="16,600", help="min,max document length")
    args = p.parse_args()

    from longctx.model.load import load_causal_lm
    from longctx.train.batches import PackedRow, collate, forward_inputs
    from longctx.train.isolation import check_packing_isolation
    from longctx.train.loss import CausalLMWithChunkedLoss, shift_targets

    torch.manual_seed(0)
    lm = load_causal_lm(args.model, device="cpu", attn_implementation=args.attn,
                        max_position_embeddings=max(args.seq_len, 256))
    vocab = lm.config.vocab_size
    lo, hi = (int(x) for x in args.doc_lengths.split(","))
    rng = np.random.default_rng(0)

    def row(i: int) -> PackedRow:
        lengths, left = [], args.seq_len
        while left:
            n = min(left, int(rng.integers(lo, hi + 1)))
            lengths.append(n)
            left -= n
        return PackedRow(i, rng.integers(0, vocab, args.seq_len), np.concatenate([np.arange(n) for n in lengths]),
                         rng.integers(0, vocab, args.seq_len), lengths, [False] * len(lengths))

    micros = [collate([row(i * args.micro_batch_size + j) for j in range(args.micro_batch_size)], "document")
              for i in range(args.steps + 1)]
    load = os.getloadavg()

    t0 = time.perf_counter()
    result = check_packing_isolation(lm, micros[0], attn_implementation=args.attn, attention="document", device="cpu")
    check_s = time.perf_counter() - t0

    model = CausalLMWithChunkedLoss(lm).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for m in micros:
        t0 = time.perf_counter()
        ids, tgt, kw = forward_inputs(m, shift_targets(m.labels, m.doc_ids), attn_implementation=args.attn,
                                      attention="document", device="cpu", dtype=lm.dtype)
        loss_sum, n = model(ids, tgt, **kw)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    step_s = statistics.mean(times[1:])
    run_s = 1000 * args.grad_accum * step_s
    print(f"model {args.model} attn {args.attn} seq_len {args.seq_len} micro_batch {args.micro_batch_size} "
          f"grad_accum {args.grad_accum}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    print(f"(a) isolation check: {check_s:.2f} s ({result.documents} documents, {result.forwards} forwards, "
          f"max deviation {result.max_deviation:.2e})")
    print(f"(b) training micro-step: {step_s:.3f} s mean of {len(times) - 1} (first, warm-up: {times[0]:.3f} s)")
    print(f"check / 1,000-step run ({run_s:.0f} s) = {100 * check_s / run_s:.3f}%  "
          f"(= {check_s / step_s:.2f} micro-steps)")


if __name__ == "__main__":
    main()
