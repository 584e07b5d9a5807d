"""Will it fit? `longctx plan`: memory per GPU, CPU memory per node, FLOPs and step time of a training job from the
model's config.json alone, by tracing the project's own step on fake tensors (docs/planning.md).

    from longctx.plan.planner import Planner
    plan = Planner(cfg, gpu="h100").plan()       # plan.per_gpu_gib, plan.fits, plan.dominant, plan.as_json()

Modules: `trace` (the step on fake tensors), `kernels` (GPU attention kernels by their documented memory),
`states` (ZeRO bookkeeping), `planner` (plans, longest row, savers ladder), `report` (table, refusal line),
`measure` (the same step measured on real CPU tensors, for validation).
"""
