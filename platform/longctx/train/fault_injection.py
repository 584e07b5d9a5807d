"""Fault injection for the fault tests, driven by `LoopSpec.fail_at` / `LoopSpec.nan_at` (None in real runs).

    failure(spec, step, rank)        # a hard worker exit (like an OOM kill) once, right after step `step`
    nan = NanOnce(spec.nan_at, rank, lambda: runner.step + 1)
    loss_sum = nan(loss_sum)         # NaN once, on one rank, at the attempt of one step
"""

from __future__ import annotations

import os
from typing import Callable


def failure(spec, step: int, rank: int) -> None:
    """A hard process exit (no cleanup, like an OOM kill) once, at a given step.

    The trigger file makes it happen on the first attempt only: it is removed before exiting.
    """
    fail = spec.fail_at
    if not fail or step != fail["step"] or rank != fail.get("rank", 0):
        return
    trigger = fail["trigger_file"]
    if os.path.exists(trigger):
        os.remove(trigger)
        print(f"[train] injected failure: rank {rank} exits at step {step}", flush=True)
        os._exit(1)


class NanOnce:
    """Makes the loss of rank `nan_at["rank"]` NaN at the attempt of step `nan_at["step"]`, once per worker
    process (a step skipped under train.nonfinite=skip is retried on the next rows, which stay clean)."""

    def __init__(self, nan_at: dict | None, rank: int, attempted_step: Callable[[], int]):
        self.nan_at, self.rank, self.attempted_step = nan_at, rank, attempted_step
        self.done = False

    def __call__(self, loss_sum):
        nan = self.nan_at
        if self.done or not nan or self.rank != nan.get("rank", 0) or self.attempted_step() != nan["step"]:
            return loss_sum
        self.done = True
        print(f"[train] injected NaN loss: rank {self.rank} at step {nan['step']}", flush=True)
        return loss_sum * float("nan")
