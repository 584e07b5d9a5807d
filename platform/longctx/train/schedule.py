"""Batch layout and learning-rate schedule: one knob (global batch in tokens) derives the rest.

    layout = derive_layout(global_batch_tokens=4_194_304, seq_len=32768, micro_batch_size=1,
                           num_workers=64, sequence_parallel=1)   # grad_accum = 2
    steps = plan_steps(layout, token_budget=..., max_steps=..., rows_available=..., epochs=...)
    lr = cosine_lr(step, total_steps=steps.total, peak=1e-5, warmup_ratio=0.01, min_lr_ratio=0.1)

Layout: world = data_parallel x sequence_parallel. With sequence parallelism a row is split over `sp` workers, so
a micro-batch of `micro_batch_size` rows covers sp workers and the tokens per optimizer step are
seq_len x micro_batch_size x data_parallel x grad_accum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


class BatchLayoutError(ValueError):
    """The global batch does not divide into whole micro-batches; the message has the numbers and the fix."""


@dataclass(frozen=True)
class BatchLayout:
    """The parallel layout of one run (world = data_parallel x sequence_parallel)."""

    world_size: int
    data_parallel: int
    sequence_parallel: int
    seq_len: int
    micro_batch_size: int
    grad_accum: int

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.data_parallel * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len

    def as_dict(self) -> dict:
        return {**asdict(self), "rows_per_step": self.rows_per_step, "tokens_per_step": self.tokens_per_step}


def derive_layout(
    *, global_batch_tokens: int, seq_len: int, micro_batch_size: int, num_workers: int, sequence_parallel: int = 1
) -> BatchLayout:
    """Gradient accumulation from the token batch; a clear error when the numbers do not divide."""
    if num_workers % sequence_parallel:
        raise BatchLayoutError(
            f"train.num_workers={num_workers} is not a multiple of train.sequence_parallel={sequence_parallel}"
        )
    dp = num_workers // sequence_parallel
    per_micro = seq_len * micro_batch_size * dp
    if global_batch_tokens % per_micro:
        lower = max(per_micro, (global_batch_tokens // per_micro) * per_micro)
        raise BatchLayoutError(
            f"train.global_batch_tokens={global_batch_tokens} is not a multiple of seq_len x micro_batch_size x "
            f"data_parallel = {seq_len} x {micro_batch_size} x {dp} = {per_micro} tokens per micro-step; "
            f"use e.g. train.global_batch_tokens={lower} or {lower + per_micro}"
        )
    return BatchLayout(
        world_size=num_workers,
        data_parallel=dp,
        sequence_parallel=sequence_parallel,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        grad_accum=global_batch_tokens // per_micro,
    )


@dataclass(frozen=True)
class StepPlan:
    total: int
    """Optimizer steps the run will take."""
    limited_by: str
    """What set the number: max_steps, token_budget or data."""
    data_steps: int | None
    """Steps the data allows (rows x epochs / rows per step), when the row count is known."""


def plan_steps(
    layout: BatchLayout,
    *,
    token_budget: int | None = None,
    max_steps: int | None = None,
    rows_available: int | None = None,
    epochs: int = 1,
) -> StepPlan:
    """Optimizer steps = min(max_steps, token_budget / batch tokens, rows x epochs / rows per step)."""
    candidates: dict[str, int] = {}
    if max_steps is not None:
        candidates["max_steps"] = int(max_steps)
    if token_budget is not None:
        candidates["token_budget"] = int(token_budget) // layout.tokens_per_step
    data_steps = None
    if rows_available is not None:
        # Each data-parallel rank reads its own share (row_id % dp): the smallest share bounds the step count,
        # approximated here by an even split.
        data_steps = (int(rows_available) // layout.data_parallel) * epochs // (layout.micro_batch_size * layout.grad_accum)
        candidates["data"] = data_steps
    if not candidates:
        raise ValueError("cannot plan steps: give train.max_steps, train.token_budget, or a dataset with a known row count")
    limited_by = min(candidates, key=candidates.get)
    total = candidates[limited_by]
    if total < 1:
        raise BatchLayoutError(
            f"no full optimizer step fits: {candidates} (one step needs {layout.rows_per_step} rows = "
            f"{layout.tokens_per_step} tokens); lower train.global_batch_tokens or give more data"
        )
    return StepPlan(total=total, limited_by=limited_by, data_steps=data_steps)


def cosine_lr(step: int, *, total_steps: int, peak: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """LR at optimizer step `step` (0-based): linear warmup to `peak`, cosine decay to peak x min_lr_ratio."""
    return warmup_cosine_lr(step, total_steps=total_steps, warmup_steps=int(math.ceil(warmup_ratio * total_steps)),
                            peak=peak, min_lr_ratio=min_lr_ratio)


def warmup_cosine_lr(step: int, *, total_steps: int, warmup_steps: int, peak: float, min_lr_ratio: float) -> float:
    """`cosine_lr` with the warmup given in steps (linear over `warmup_steps`, then cosine to the floor at
    `total_steps`)."""
    warmup = warmup_steps
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = peak * min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Multiplier function for torch's LambdaLR (peak = the optimizer's base LR)."""
    return lambda step: cosine_lr(step, total_steps=total_steps, peak=1.0, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
