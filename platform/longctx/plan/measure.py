"""Measure what the plan predicts: the real training step on real CPU tensors, its peak of allocated memory taken
from the CPU allocator's own records (the profiler's memory events), independent of the planner's tracker.

    measured = measure_cpu_step(shape)      # same StepShape the planner traces (gpu_kernels=False)

The model is built at full depth with random weights, prepared by the same `prepare_for_training`, fed the same
one-document rows through `rank_forward_inputs`, and gradients are dropped on accumulation as in the trace.
Bytes allocated before the step (the parameters) are not counted, as in the trace. Used by
tests/test_plan_validation.py and bench/plan_accuracy.py.
"""

from __future__ import annotations

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from longctx.plan.trace import StepShape, drop_gradients, one_document_rows
from longctx.train.batches import rank_forward_inputs
from longctx.train.loss import shift_targets
from longctx.train.memory_savers import prepare_for_training


def peak_allocated(fn) -> int:
    """Peak of CPU bytes allocated and not yet freed while `fn()` runs (relative to its start), from every
    allocation and free the CPU allocator reported to the profiler, in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_cpu_step(shape: StepShape, seed: int = 0) -> int:
    """Peak bytes of one real forward + backward of `shape` on the CPU (sequence_parallel must be 1)."""
    if shape.sequence_parallel != 1:
        raise ValueError("a CPU measurement runs one process: sequence_parallel must be 1")
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(shape.hf_config, attn_implementation=shape.attn_implementation,
                                          dtype=shape.dtype)
    wrapped = prepare_for_training(lm, shape.train, use_gpu=False).train()
    drop_gradients(wrapped)
    vocab = shape.hf_config.get_text_config().vocab_size

    def step():
        m = one_document_rows(shape.micro_batch_size, shape.seq_len, vocab)
        tgt = shift_targets(m.labels, m.doc_ids if shape.attention == "document" else None)
        input_ids, tgt, kwargs = rank_forward_inputs(m, tgt, sequence_parallel=1, sp_rank=0,
                                                     attn_implementation=shape.attn_implementation,
                                                     attention=shape.attention, device="cpu", dtype=shape.dtype)
        loss_sum, _ = wrapped(input_ids, tgt, **kwargs)
        loss_sum.backward()

    return peak_allocated(step)
