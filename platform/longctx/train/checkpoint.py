"""Checkpoints: DeepSpeed state + trainer state (step, data ledger, metrics history) + an HF model directory.

Layout of one checkpoint (Ray Train copies every worker's folder into the same checkpoint prefix):

    deepspeed/            engine.save_checkpoint (each rank writes its own ZeRO partition files)
    trainer_state.json    {"step", "ledger": {"consumed": {epoch: [row ids]}}, "history": [...], "layout"}
    hf_model/             safetensors + config.json (new rope_parameters) + tokenizer files (rank 0)

The final model is published separately with `storage.publish_dir` (atomic, `_COMMITTED` marker) so
`AutoModelForCausalLM.from_pretrained` loads the extended model back; the HF snapshots `eval.during_training`
evaluates are `longctx.train.snapshots`.

NOTE: DeepSpeed loads its own files with `torch.load(weights_only=False)` (pickle). We only ever load
checkpoints this run wrote under its own storage path, and `safe_deepspeed_load` switches DeepSpeed to
`weights_only=True` with the few plain types its files hold allow-listed, so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import shutil

import torch

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
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce  # deferred: heavy import, used only here

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
    allowed: list = [collections.OrderedDict, collections.defaultdict, dict, list, set, tuple]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum  # deferred: heavy import, used only here

        allowed.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address  # deferred: heavy import, used only here

        allowed.append(fragment_address)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler  # deferred: heavy import, used only here

        allowed += [LossScaler, DynamicLossScaler]
    return allowed


def latest_local_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "**"), recursive=True))
