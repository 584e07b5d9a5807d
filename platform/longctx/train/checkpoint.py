"""Checkpoints: DeepSpeed state + trainer state (step, data ledger, metrics history) + an HF model directory.

Layout of one checkpoint (Ray Train copies every worker's folder into the same checkpoint prefix):

    deepspeed/            engine.save_checkpoint (each rank writes its own ZeRO partition files)
    trainer_state.json    {"step", "ledger": {"consumed": {epoch: [row ids]}}, "history": [...], "layout"}
    hf_model/             safetensors + config.json (new rope_parameters) + tokenizer files (rank 0)

The final model is published separately with `storage.publish_dir` (atomic, `_COMMITTED` marker) so
`AutoModelForCausalLM.from_pretrained` loads the extended model back.

NOTE: DeepSpeed loads its own files with `torch.load(weights_only=False)` (pickle). We only ever load
checkpoints this run wrote under its own storage path, and `safe_deepspeed_load` switches DeepSpeed to
`weights_only=True` with the few plain types its files hold allow-listed, so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil

import torch

from longctx import storage

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
)
TRAINER_STATE = "trainer_state.json"


def copy_tokenizer_files(src_dirs: list[str], dest: str) -> list[str]:
    """Copy tokenizer files from the first folder that has any (the model's own, else the data tokenizer)."""
    for src in src_dirs:
        if not src or not os.path.isdir(src):
            continue
        found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
        if any(n.startswith("tokenizer") for n in found):
            for n in found:
                if not os.path.exists(os.path.join(dest, n)):
                    shutil.copy2(os.path.join(src, n), os.path.join(dest, n))
            return found
    return []


def gather_hf_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full HF state dict of the wrapped model (collective under ZeRO-3: every rank must call it).

    Returns the dict on rank 0 (None elsewhere under ZeRO-3), keys without the wrapper's `lm.` prefix.
    """
    if zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
        if sd is None:
            return None
    else:
        sd = engine.module.state_dict()
    return {k[len("lm."):]: v.detach().to("cpu").contiguous() for k, v in sd.items() if k.startswith("lm.")}


def save_hf_model(lm, state_dict: dict, dest: str, tokenizer_dirs: list[str]) -> None:
    """Write an HF directory (safetensors, config with the new rope_parameters, tokenizer files)."""
    os.makedirs(dest, exist_ok=True)
    lm.config.use_cache = True
    lm.save_pretrained(dest, state_dict=state_dict, safe_serialization=True)
    copy_tokenizer_files(tokenizer_dirs, dest)


def write_trainer_state(folder: str, state: dict) -> None:
    with open(os.path.join(folder, TRAINER_STATE), "w") as f:
        json.dump(state, f)


def read_trainer_state(folder: str) -> dict:
    path = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: checkpoint has no {TRAINER_STATE} (incomplete checkpoint)")
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def safe_deepspeed_load():
    """Make DeepSpeed's checkpoint loading use torch.load(weights_only=True) for the duration."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce

    original = tce.TorchCheckpointEngine.load

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)

    allowed = _deepspeed_safe_globals()
    tce.TorchCheckpointEngine.load = load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        tce.TorchCheckpointEngine.load = original


def _deepspeed_safe_globals() -> list:
    """Plain types DeepSpeed checkpoint files contain besides tensors (found by loading our own checkpoints)."""
    import collections

    allowed: list = [collections.OrderedDict, collections.defaultdict, dict, list, set, tuple]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        allowed += [LossScaler, DynamicLossScaler]
    return allowed


def latest_local_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "**"), recursive=True))


# ------------------------------------------------------------------------------------- evaluation snapshots
EVAL_SNAPSHOTS = "eval_snapshots"
SNAPSHOT_INFO = "snapshot.json"


def eval_snapshot_uri(train_root: str, step: int) -> str:
    return storage.join(train_root, EVAL_SNAPSHOTS, f"step_{int(step):08d}")


def publish_eval_snapshot(lm, state_dict: dict, train_root: str, step: int, tokens: int,
                          tokenizer_dirs: list[str]) -> str:
    """Publish the HF model of a checkpoint Ray Train has just persisted, for `eval.during_training`.

    A snapshot is *committed* once its `_COMMITTED` marker exists (`storage.publish_dir`): the evaluator only ever
    reads committed snapshots, and the loop publishes one only after `ray.train.report` returned (the checkpoint
    it mirrors is persisted). Unlike Ray Train's checkpoints (`num_to_keep` prunes them) a snapshot stays until
    it has been evaluated, however far the evaluator lags.
    """
    import time

    dest = eval_snapshot_uri(train_root, step)
    with storage.publish_dir(dest, overwrite=True) as staging:
        save_hf_model(lm, state_dict, staging, tokenizer_dirs)
        with open(os.path.join(staging, SNAPSHOT_INFO), "w") as f:
            json.dump({"step": int(step), "tokens": int(tokens), "committed_at": time.time()}, f)
    return dest


def ensure_eval_snapshot(checkpoint_dir: str, train_root: str, step: int, tokens: int) -> str | None:
    """On resume from `checkpoint_dir`: publish its `hf_model/` as the step's snapshot when neither a committed
    snapshot nor a checkpoint_eval.jsonl record exists for it (the worker died between persisting the checkpoint
    and publishing its snapshot). Returns the snapshot published, else None."""
    import time

    dest = eval_snapshot_uri(train_root, step)
    src = os.path.join(checkpoint_dir, "hf_model")
    if storage.is_committed(dest) or not os.path.isdir(src):
        return None
    if int(step) in _evaluated_steps(train_root):
        return None
    with storage.publish_dir(dest, overwrite=True) as staging:
        for name in os.listdir(src):
            shutil.copy2(os.path.join(src, name), os.path.join(staging, name))
        with open(os.path.join(staging, SNAPSHOT_INFO), "w") as f:
            json.dump({"step": int(step), "tokens": int(tokens), "committed_at": time.time()}, f)
    return dest


EVAL_LEDGER = "checkpoint_eval.jsonl"
"""eval.during_training's ledger (`longctx.eval.during_training.LEDGER`; read here without importing the evaluator,
which imports this module)."""


def _evaluated_steps(train_root: str) -> set[int]:
    """Steps the evaluator has recorded in its ledger (a torn or unreadable line counts as not evaluated)."""
    uri = storage.join(train_root, EVAL_LEDGER)
    if not storage.exists(uri):
        return set()
    steps = set()
    for line in storage.read_text(uri).splitlines():
        try:
            steps.add(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps


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
