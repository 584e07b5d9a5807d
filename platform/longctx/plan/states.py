"""Model states per GPU under DeepSpeed ZeRO (parameters, gradients, optimizer, ZeRO's own buffers) and what the
offloads put in CPU memory: the part of a plan that is bookkeeping, not tracing.

    s = model_states(params=8_030_261_248, largest_layer=525_336_576, world=8, train=cfg.train, dtype_bytes=2)
    s.gpu, s.cpu, s.step_extra

Bytes per parameter (P parameters, W = train.num_workers ranks; ZeRO partitions over every rank, sequence-
parallel ones included; mixed precision as DeepSpeed runs it with our torch AdamW: 16-bit parameters and
gradients, fp32 master weights and Adam moments):

| stage | 16-bit params | 16-bit grads | fp32 master + Adam m, v | ZeRO buffers | at the optimizer step |
|---|---|---|---|---|---|
| 0 | 2 | 2 | 12 | - | fp32 grads 4 |
| 1 | 2 | 2 | 12/W | reduce bucket (x2 with overlap_comm, as on GPU) | fp32 grads 4/W |
| 2 | 2 | 2/W | 12/W | reduce bucket (x2 with overlap_comm) | fp32 grads 4/W |
| 3 | 2/W | 2/W | 12/W | reduce bucket + 4 x largest layer (gathered, DeepSpeed's own estimate) | fp32 grads 4/W |

offload_optimizer moves the fp32 master, moments and fp32 gradient partition (16/W) to CPU memory, and with
ZeRO-2/3 the 16-bit gradient partition too (DeepSpeed allocates it on the optimizer's device); offload_params
moves the 16-bit parameter partition (2/W). Bucket sizes are those `longctx.train.deepspeed`
generates (reduce_bucket_size 5e8 elements). On CPU (fp32) ZeRO-0 keeps no master copy (8 bytes of Adam moments).
DeepSpeed's own `estimate_zero3_model_states_mem_needs` uses 18/W + 4 x largest layer; tests/test_plan_states.py
sets the two side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.train.deepspeed import REDUCE_BUCKET_ELEMENTS


@dataclass(frozen=True)
class ModelStates:
    gpu: dict[str, float]
    """Bytes per GPU held for the whole step: params, grads, optimizer, zero_buffers."""
    step_extra: float
    """Bytes per GPU allocated only during the optimizer step (fp32 gradient copy), when activations are gone."""
    cpu: dict[str, float]
    """Bytes per rank in CPU memory: optimizer (offload_optimizer), params (offload_params)."""

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())


def model_states(*, params: int, largest_layer: int, world: int, train, dtype_bytes: int,
                 overlap_comm: bool = True) -> ModelStates:
    """ZeRO bookkeeping for `params` parameters (`largest_layer`: the most parameters one module holds) over
    `world` ranks with `train` (a TrainConfig: zero_stage, offload_optimizer, offload_params); `overlap_comm` as
    the generated DeepSpeed config sets it (on GPU)."""
    p, w, b = float(params), max(1, int(world)), int(dtype_bytes)
    stage = int(train.zero_stage)
    mixed = b < 4  # 16-bit training keeps fp32 master weights (ZeRO >= 1 keeps an fp32 partition copy anyway)
    opt_per_param = 12 if (mixed or stage >= 1) else 8
    grads = b * p / (w if stage >= 2 else 1)
    weights = b * p / (w if stage == 3 else 1)
    optimizer = opt_per_param * p / (w if stage >= 1 else 1)
    step_extra = (4 if mixed else 0) * p / (w if stage >= 1 else 1)
    buffers = 0.0
    if stage in (1, 2):
        buffers = b * REDUCE_BUCKET_ELEMENTS * (2 if overlap_comm else 1)
    elif stage == 3:
        buffers = b * REDUCE_BUCKET_ELEMENTS + 4.0 * largest_layer
    cpu = {"optimizer": 0.0, "params": 0.0}
    if train.offload_optimizer:
        cpu["optimizer"] = optimizer + (4 if mixed else 0) * p / w  # + the fp32 gradient partition
        optimizer, step_extra = 0.0, 0.0
        if stage >= 2:  # the 16-bit gradient partitions live in (pinned) CPU memory too
            cpu["optimizer"] += grads
            grads = 0.0
    if getattr(train, "offload_params", False):
        cpu["params"], weights = weights, 0.0
    return ModelStates(gpu={"params": weights, "grads": grads, "optimizer": optimizer, "zero_buffers": buffers},
                       step_extra=step_extra, cpu=cpu)
