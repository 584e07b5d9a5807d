"""Preemption: a reclaimed node or an evicted driver costs at most the step in flight, never a checkpoint interval.

Driver: `PreemptionGuard` holds SIGTERM/SIGINT while `trainer.fit()` runs. The first signal writes a request
marker (`_PREEMPT_REQUESTED`) into the train folder, which every worker sees at its next step boundary (rank 0
reads it, the step's all-reduce carries it to the others): they checkpoint there, report a `preempted` stop and
return, and the driver raises `TrainingPreempted` (exit code 75, "rerun to resume"). Should no checkpoint come
within `train.preemption_grace_s`, or a second signal arrive, the driver stops at once; a rerun then resumes
from the last checkpoint.

Workers: Ray Train's own notice of a node being drained (a spot reclaim the cluster announces,
`ray.train.get_preemption_info`, polled every few seconds) makes them checkpoint at the next step boundary and
keep training: when the node goes, Ray Train restarts the worker group (`FailureConfig.max_preemption_failures`,
unlimited by default) and the restore finds that checkpoint by listing the train folder, registered or not.

    with PreemptionGuard(train_root, grace_s=110) as guard:
        result = trainer.fit()
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import socket
import threading
import time

from longctx import storage
from longctx.progress import emit

MARKER = "_PREEMPT_REQUESTED"


def marker_uri(train_root: str) -> str:
    return storage.join(train_root, MARKER)


def _remove(uri: str) -> None:
    if storage.is_s3(uri):
        fs, path = storage.fsspec_fs(uri)
        if fs.exists(path):
            fs.rm_file(path)
    elif os.path.exists(uri):
        os.remove(uri)


def _in_ray_actor() -> bool:
    """True inside a Ray actor (a Ray Tune trial): Ray and Tune stop those themselves."""
    import ray  # deferred: heavy import, used only here

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class PreemptionGuard:
    """SIGTERM/SIGINT during `trainer.fit()` ask the workers for a checkpoint at the next step boundary (see the
    module docstring). Installs its handlers only in a driver's main thread (a Ray Tune trial runs in an actor
    and is stopped by Tune); restores the previous ones on exit."""

    def __init__(self, train_root: str, grace_s: float):
        self.marker, self.grace_s = marker_uri(train_root), float(grace_s)
        self.signal: str | None = None
        self.expired = False
        self._old: dict = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "PreemptionGuard":
        _remove(self.marker)  # a request of an earlier attempt is not one of this attempt
        if threading.current_thread() is threading.main_thread() and not _in_ray_actor():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for s, old in self._old.items():
            signal.signal(s, old)
        try:
            _remove(self.marker)
        except Exception:  # noqa: BLE001 - tidying only; the next attempt removes it before it starts
            pass

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:  # a second signal, or the grace period's interrupt
            if not self.expired:
                emit(f"[train] {name} again: stopping now (a rerun resumes from the last checkpoint)")
            raise KeyboardInterrupt
        self.signal = name
        storage.write_text(self.marker, json.dumps({"signal": name, "time": time.time(), "pid": os.getpid(),
                                                    "host": socket.gethostname()}))
        emit(f"[train] {name}: checkpointing at the next step boundary, then exiting with code 75 "
             f"(train.preemption_grace_s={self.grace_s:g}); rerun the same command to resume")
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        emit(f"[train] no checkpoint within train.preemption_grace_s={self.grace_s:g}: stopping now (a rerun "
             "resumes from the last checkpoint)")
        _thread.interrupt_main(signal.SIGINT)


class PreemptionPoller:
    """Worker side: rank 0 looks for the driver's request (every step on a local train folder, at most every
    `s3_check_every_s` on object storage) and says when all ranks should ask Ray Train for a preemption notice
    (a collective, so every rank must call it at the same step)."""

    def __init__(self, train_root: str, is_rank0: bool, s3_check_every_s: float = 1.0, ray_every_s: float = 5.0):
        self.marker, self.is_rank0 = marker_uri(train_root), is_rank0
        self.check_every_s = s3_check_every_s if storage.is_s3(train_root) else 0.0
        self.ray_every_s = ray_every_s
        self._checked = self._asked = time.monotonic()
        self._seen = False

    def flags(self) -> list[float]:
        """[driver asked for a checkpoint, time to ask Ray] as numbers to all-reduce (0 on ranks other than 0)."""
        if not self.is_rank0:
            return [0.0, 0.0]
        now = time.monotonic()
        if not self._seen and now - self._checked >= self.check_every_s:
            self._checked = now
            self._seen = storage.exists(self.marker)
        ask = now - self._asked >= self.ray_every_s
        if ask:
            self._asked = now
        return [1.0 if self._seen else 0.0, 1.0 if ask else 0.0]


def ray_preemption_notice():
    """Ray Train's notice that a node of this worker group is being drained (None when there is none, or this
    Ray has no such API). Every rank must call it at the same step (it is a barrier)."""
    import ray.train  # deferred: heavy import, used only here

    get = getattr(ray.train, "get_preemption_info", None)
    return get() if get is not None else None
