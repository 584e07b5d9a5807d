"""DeepSpeed config generated from `TrainConfig` + the batch layout; a user's DeepSpeed JSON may override keys.

    ds_config = build_deepspeed_config(cfg.train, layout, use_gpu=False)

CPU runs use fp32 (no bf16/fp16 section) and gloo; GPU runs use bf16. The optimizer and LR schedule are ours
(torch AdamW + LambdaLR passed as client objects), so the generated config has no `optimizer`/`scheduler`
sections; a user JSON that adds them takes over (logged). The batch keys are always consistent with the layout:
an override that changes them is refused with the numbers, because the step count and the loss normalisation
are derived from the layout.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
from typing import Any

from longctx import storage
from longctx.train.schedule import BatchLayout

log = logging.getLogger(__name__)

REDUCE_BUCKET_ELEMENTS = int(5e8)
"""ZeRO reduce / all-gather bucket size (elements) of the generated config (the planner counts these buffers)."""

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_user_deepspeed_json(uri: str) -> dict:
    """A user's DeepSpeed JSON (local or s3://); a clear error naming the file when it is not a JSON object."""
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise ValueError(f"train.deepspeed_config {uri}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"train.deepspeed_config {uri}: must hold a JSON object, got {type(data).__name__}")
    return data


def build_deepspeed_config(train_cfg, layout: BatchLayout, *, use_gpu: bool, user_override: dict | None = None) -> dict:
    """The DeepSpeed config dict for `deepspeed.initialize(config=...)`."""
    stage = int(train_cfg.zero_stage)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(
            {
                "overlap_comm": bool(use_gpu),
                "contiguous_gradients": True,
                "reduce_scatter": True,
                "allgather_bucket_size": REDUCE_BUCKET_ELEMENTS,
                "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
            }
        )
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 0})
    if train_cfg.offload_optimizer:
        if stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(use_gpu)}
    if getattr(train_cfg, "offload_params", False):
        if stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(use_gpu)}
    config: dict[str, Any] = {
        # DeepSpeed's train_batch_size counts rows over data-parallel ranks only; with sequence parallelism the
        # other ranks of a group hold pieces of the same rows.
        "train_batch_size": layout.micro_batch_size * layout.grad_accum * layout.data_parallel,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": float(train_cfg.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves (rank 0, every step)
        "wall_clock_breakdown": False,
    }
    if use_gpu:
        config["bf16"] = {"enabled": True}
    if train_cfg.offload_optimizer:
        # NOTE: DeepSpeed's CPU Adam (compiled op) is what makes offload fast; a torch optimizer also works.
        config["zero_force_ds_cpu_optimizer"] = False
    if layout.sequence_parallel > 1:
        config["sequence_parallel_size"] = layout.sequence_parallel
    if user_override:
        changed = {k for k in _BATCH_KEYS if k in user_override and user_override[k] != config[k]}
        if changed:
            raise ValueError(
                f"train.deepspeed_config sets {sorted(changed)} to "
                f"{ {k: user_override[k] for k in sorted(changed)} } but the layout derived from "
                f"train.global_batch_tokens needs { {k: config[k] for k in sorted(changed)} }: "
                "change train.global_batch_tokens / micro_batch_size instead"
            )
        config = _deep_merge(config, user_override)
        log.info("DeepSpeed config overridden by user JSON keys: %s", sorted(user_override))
    return config


def disable_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed on plain torch.distributed collectives (gloo on CPU).

    NOTE: on CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op (`deepspeed_shm_comm`) the
    first time it starts: a C++ build of ~1 min per machine, serialised by a file lock under
    ~/.cache/torch_extensions that stays behind if a worker is killed mid-build and then blocks every later run.
    Gloo is what we test and is enough for CPU runs; GPU runs use nccl and never build it.
    """
    # NOTE: `import deepspeed.comm.torch as m` would bind the torch library (deepspeed.comm imports torch).
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def init_single_process(device: str) -> None:
    """A one-rank process group for DeepSpeed outside Ray Train (benchmarks: nccl on GPU, gloo on CPU)."""
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29500 + os.getpid() % 1000)),
                       ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if not str(device).startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # deferred: after DS_ACCELERATOR, which DeepSpeed reads at import

    disable_deepspeed_shm_comm()
    deepspeed.init_distributed(dist_backend="nccl" if str(device).startswith("cuda") else "gloo")
