"""Evaluation snapshots of checkpoints, and the ledger of their evaluations: what training publishes for
`eval.during_training` and what it reads back.

    publish_eval_snapshot(lm, state_dict, train_root, step, tokens, tokenizer_dirs)   # rank 0, after a checkpoint
    committed_eval_snapshots(train_root)      # [(step, uri)], committed ones only
    read_ledger(ledger_uri(train_root))       # one record per evaluated step, in step order

Layout under the train root: `eval_snapshots/step_<N>/` (an HF model folder with `snapshot.json`, committed with
a `_COMMITTED` marker) and `checkpoint_eval.jsonl` (the ledger: one JSON line per evaluated checkpoint, written by
the evaluator in `longctx.eval.during_training`). The ledger has one reader, `read_ledger`: a torn last line (a
writer killed mid-write) counts as not evaluated, so that checkpoint is evaluated again (never lost); a bad line
before the last is damage and an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from typing import Any

from longctx import storage

log = logging.getLogger(__name__)

EVAL_SNAPSHOTS = "eval_snapshots"
SNAPSHOT_INFO = "snapshot.json"
LEDGER = "checkpoint_eval.jsonl"
"""The evaluations of the run's checkpoints (eval.during_training), one JSON line each."""


# ------------------------------------------------------------------------------------------------ ledger
def ledger_uri(train_root: str) -> str:
    return storage.join(train_root, LEDGER)


def read_ledger(uri: str) -> list[dict]:
    """Records of a checkpoint_eval.jsonl, one per step (the first wins), in step order.

    A torn last line (a writer killed mid-write on a filesystem without atomic replace) is dropped with a
    warning: its checkpoint is then evaluated again. Any other bad line is an error naming the file and line.
    """
    if not storage.exists(uri):
        return []
    lines = storage.read_text(uri).splitlines()
    out: dict[int, dict] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError) as exc:
            if n == len(lines):
                log.warning("%s: line %d is incomplete (%s); that checkpoint will be evaluated again", uri, n, exc)
                continue
            raise ValueError(f"{uri}: line {n} is not a checkpoint evaluation record ({exc})") from exc
        out.setdefault(step, rec)
    return [out[s] for s in sorted(out)]


def write_ledger(uri: str, records: list[dict]) -> None:
    """Rewrite the whole ledger (object storage has no append; the file is small). Atomic on local disks."""
    storage.write_text(uri, "".join(json.dumps(r, allow_nan=True) + "\n" for r in sorted(records, key=lambda r: r["step"])))


def objective_value(record: dict, objective: str) -> float | None:
    """Higher-is-better value of `objective` in one record (None when it was not measured)."""
    if objective == "neg_nll_beyond_base":
        v = record.get("nll_beyond_base")
        return None if v is None or not math.isfinite(v) else -float(v)
    v = record.get(objective)
    return None if v is None else float(v)


def should_stop(records: list[dict], objective: str, patience: int, min_delta: float = 0.0) -> bool:
    """True when the last `patience` evaluated checkpoints all failed to beat the best value before them by
    more than `min_delta` (records in step order; checkpoints without the objective do not count)."""
    if patience <= 0:
        return False
    values = [v for v in (objective_value(r, objective) for r in records) if v is not None]
    if len(values) <= patience:
        return False
    best_before = max(values[:-patience])
    return all(v <= best_before + min_delta for v in values[-patience:])


def tune_metrics(records: list[dict]) -> dict[str, Any]:
    """The latest evaluated checkpoint's values as flat Tune metrics (empty before the first evaluation)."""
    if not records:
        return {}
    last = records[-1]
    nll = last.get("nll_beyond_base")
    return {"ckpt_step": last["step"], "ckpt_tokens": last.get("tokens"), "ckpt_passkey": last.get("passkey"),
            "ckpt_needle": last.get("needle"), "ckpt_nll_beyond_base": nll,
            "ckpt_neg_nll_beyond_base": None if nll is None else -nll}


# --------------------------------------------------------------------------------------------- snapshots
def eval_snapshot_uri(train_root: str, step: int) -> str:
    return storage.join(train_root, EVAL_SNAPSHOTS, f"step_{int(step):08d}")


def _write_info(staging: str, step: int, tokens: int) -> None:
    with open(os.path.join(staging, SNAPSHOT_INFO), "w") as f:
        json.dump({"step": int(step), "tokens": int(tokens), "committed_at": time.time()}, f)


def publish_eval_snapshot(lm, state_dict: dict, train_root: str, step: int, tokens: int,
                          tokenizer_dirs: list[str]) -> str:
    """Publish the HF model of a checkpoint Ray Train has just persisted, for `eval.during_training`.

    A snapshot is *committed* once its `_COMMITTED` marker exists (`storage.publish_dir`): the evaluator only ever
    reads committed snapshots, and the loop publishes one only after `ray.train.report` returned (the checkpoint
    it mirrors is persisted). Unlike Ray Train's checkpoints (`num_to_keep` prunes them) a snapshot stays until
    it has been evaluated, however far the evaluator lags.
    """
    from longctx.train.checkpoint import save_hf_model  # deferred: imports torch; the driver reads ledgers without it

    dest = eval_snapshot_uri(train_root, step)
    with storage.publish_dir(dest, overwrite=True) as staging:
        save_hf_model(lm, state_dict, staging, tokenizer_dirs)
        _write_info(staging, step, tokens)
    return dest


def ensure_eval_snapshot(checkpoint_dir: str, train_root: str, step: int, tokens: int) -> str | None:
    """On resume from `checkpoint_dir`: publish its `hf_model/` as the step's snapshot when neither a committed
    snapshot nor a ledger record exists for it (the worker died between persisting the checkpoint and publishing
    its snapshot). Returns the snapshot published, else None."""
    dest = eval_snapshot_uri(train_root, step)
    src = os.path.join(checkpoint_dir, "hf_model")
    if storage.is_committed(dest) or not os.path.isdir(src):
        return None
    if any(int(r["step"]) == int(step) for r in read_ledger(ledger_uri(train_root))):
        return None
    with storage.publish_dir(dest, overwrite=True) as staging:
        for name in os.listdir(src):
            shutil.copy2(os.path.join(src, name), os.path.join(staging, name))
        _write_info(staging, step, tokens)
    return dest


def committed_eval_snapshots(train_root: str) -> list[tuple[int, str]]:
    """(step, uri) of every committed evaluation snapshot under `train_root`, by step; half-written ones are
    skipped (their writer is still running or died: a restarted worker publishes that step again)."""
    root = storage.join(train_root, EVAL_SNAPSHOTS)
    if storage.is_s3(root):
        fs, path = storage.fsspec_fs(root)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] if fs.exists(path) else []
    else:
        names = os.listdir(root) if os.path.isdir(root) else []
    out = []
    for name in names:
        if not name.startswith("step_") or not name[5:].isdigit():
            continue
        uri = storage.join(root, name)
        if storage.is_committed(uri):
            out.append((int(name[5:]), uri))
    return sorted(out)
