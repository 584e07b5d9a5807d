"""Why a training run ended early on purpose, carried from the workers to the driver and on to an exit code.

Workers never raise for these: Ray Train retries a raised error `max_failures` times, and a non-finite loss or a
run without an intact checkpoint would fail the same way every time. Every rank returns `stop_reason(...)` from
the training function; the driver finds rank 0's in the result (`Result.return_value`, `raise_for_stop`) and
raises the matching error, which jobs turn into an exit code (`longctx.jobargs.exit_code`):

    4   training stopped: a non-finite loss or gradient norm (`train.nonfinite=stop`), non-finite weights (never
        published), or no intact checkpoint to resume from (each damaged one is named)
    75  preempted (SIGTERM/SIGINT to the driver): the run checkpointed at a step boundary; rerun the same command
        to resume (75 is EX_TEMPFAIL of sysexits.h: a temporary failure, retrying is expected to work)
"""

from __future__ import annotations

import math

STOP_KEY = "longctx_stop"
PREEMPTED_EXIT_CODE = 75
STOPPED_EXIT_CODE = 4


class TrainingStopped(RuntimeError):
    """Training ended early on purpose; the message says why and what to do."""

    exit_code = STOPPED_EXIT_CODE

    def __init__(self, message: str, step: int | None = None, checkpoint: str | None = None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class NonFiniteTraining(TrainingStopped):
    """A non-finite loss or gradient norm under `train.nonfinite=stop`, or non-finite weights (not published)."""


class NoIntactCheckpoint(TrainingStopped):
    """Checkpoints exist but every one is damaged: the message names each and what is wrong with it."""


class TrainingPreempted(TrainingStopped):
    """SIGTERM/SIGINT reached the driver: the run checkpointed (or the grace period ran out); rerun to resume."""

    exit_code = PREEMPTED_EXIT_CODE


_KINDS = {"nonfinite": NonFiniteTraining, "damaged": NoIntactCheckpoint, "preempted": TrainingPreempted}


def stop_reason(kind: str, message: str, *, step: int | None = None, checkpoint: str | None = None) -> dict:
    """What every rank returns when it stops early (rank 0's reaches the driver)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown stop kind {kind!r}; known: {sorted(_KINDS)}")
    return {STOP_KEY: {"kind": kind, "message": message, "step": step, "checkpoint": checkpoint}}


def raise_for_stop(reason: dict | None) -> None:
    """Raise the error a worker's stop report stands for (nothing when the run was not stopped)."""
    stop = (reason or {}).get(STOP_KEY)
    if stop:
        raise _KINDS[stop["kind"]](stop["message"], step=stop.get("step"), checkpoint=stop.get("checkpoint"))


def nonfinite_tensors(state_dict: dict | None) -> list[str]:
    """Names of the tensors in a state dict holding NaN or inf."""
    import torch  # deferred: heavy import, used only here

    if not state_dict:
        return []
    return [name for name, t in state_dict.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def is_finite(x: float | None) -> bool:
    return x is None or math.isfinite(float(x))
