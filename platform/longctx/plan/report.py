"""`longctx plan` output: a short table per plan, or one JSON line; and the one-line refusal preflight prints."""

from __future__ import annotations

from longctx.plan.planner import RESERVE_FRACTION, RESERVE_GIB, Plan

_SAVERS = ("activation_checkpointing", "tiled_mlp", "activation_offload", "offload_optimizer", "offload_params")


def describe_changes(changes: dict) -> str:
    """`train.sequence_parallel=8 train.tiled_mlp=true` for a layout change."""
    return " ".join(f"{'data' if k == 'seq_len' else 'train'}.{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in changes.items())


def _gib(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"


def render(plan: Plan, model: str, workers: int, nearest: tuple[dict, Plan] | None = None) -> str:
    lay, g, d = plan.layout, plan.per_gpu_gib, plan.detail_gib
    savers = ", ".join(k.replace("_", " ") for k in _SAVERS if lay[k]) or "none"
    gpu = f"{workers} x {plan.gpu or 'GPU of unknown type'}" if plan.gpu or plan.gpu_memory_gib else f"{workers} CPU workers"
    lines = [f"plan: {model} ({plan.params_total / 1e9:.2f}B parameters) on {gpu}",
             f"  layout: seq_len {lay['seq_len']:,} x micro-batch {lay['micro_batch_size']} | sequence parallel "
             f"{lay['sequence_parallel']} | ZeRO-{lay['zero_stage']} | {plan.attn_implementation} | savers: {savers}",
             "  per GPU                         GiB",
             f"    model states              {g['model_states']:7.1f}   params {d['params']:.1f}, grads {d['grads']:.1f}, "
             f"optimizer {d['optimizer']:.1f}, ZeRO buffers {d['zero_buffers']:.1f}",
             f"    activations (for backward){g['activations']:7.1f}   {d['activations_per_layer'] * 1024:.0f} MiB x "
             f"{plan.num_layers} layers + the rest",
             f"    temporaries (peak)        {g['temporary']:7.1f}",
             f"    optimizer step (fp32 grads){g['optimizer_step']:6.1f}   (after backward; counts only when larger)",
             f"    total                     {g['total']:7.1f}"]
    if plan.usable_gib is not None:
        verdict = "FITS" if plan.fits else "DOES NOT FIT"
        lines.append(f"  device: {_gib(plan.gpu_memory_gib)} GiB - reserve ({RESERVE_GIB:g} GiB + "
                     f"{RESERVE_FRACTION:.0%}) = {plan.usable_gib:.1f} GiB usable -> {verdict} "
                     f"(largest term: {plan.dominant.replace('_', ' ')})")
    else:
        lines.append("  device memory unknown: pass --gpu, or set train.gpu_type / train.gpu_memory_gib")
    lines.append(f"  CPU memory per node: {plan.cpu_gib_per_node:.1f} GiB ({plan.gpus_per_node} GPUs: optimizer "
                 f"{d['cpu_optimizer_per_gpu']:.1f}, params {d['cpu_params_per_gpu']:.1f}, activations "
                 f"{d['cpu_activations_per_gpu']:.1f} GiB each)")
    lines.append(f"  FLOPs per step: {plan.flops_per_step:.3g} (causal) / {plan.flops_per_step_full_square:.3g} "
                 "(full square, Megatron-LM convention)")
    if plan.step_seconds:
        lines.append(f"  at {plan.mfu_assumed:.0%} MFU: {plan.step_seconds:.1f} s per step, "
                     f"{plan.tokens_per_s:,.0f} tokens/s ({plan.tokens_per_s / workers:,.0f} per GPU)")
    if "max_seq_len" in plan.extra:
        lines.append(f"  longest data.seq_len that fits this layout: {plan.extra['max_seq_len']:,} "
                     f"({plan.extra['probes']} plans)")
    if nearest is not None:
        changes, p = nearest
        lines.append(f"  nearest layout that fits: {describe_changes(changes)} ({p.per_gpu_gib['total']:.1f} GiB)")
    elif plan.fits is False:
        lines.append("  no layout on the savers ladder fits: more GPUs, a larger GPU or a shorter data.seq_len")
    lines.append(f"  (traced {plan.layers_traced} of {plan.num_layers} layers on fake tensors in "
                 f"{plan.trace_seconds:.1f} s; GPU attention kernels by their documented memory; docs/planning.md)")
    return "\n".join(lines)


def refusal(plan: Plan, nearest: tuple[dict, Plan] | None) -> tuple[str, str]:
    """(what, fix) of a layout that does not fit: predicted vs usable GiB with the dominant term; the nearest
    layout that fits (or what is left to do)."""
    g = plan.per_gpu_gib
    what = (f"predicted {g['total']:.1f} GiB per GPU > {plan.usable_gib:.1f} GiB usable on {plan.gpu or 'the GPU'} "
            f"({plan.gpu_memory_gib:g} GiB; dominant: {plan.dominant.replace('_', ' ')} {g[plan.dominant]:.1f} GiB)")
    if nearest:
        fix = f"nearest layout that fits: {describe_changes(nearest[0])} ({nearest[1].per_gpu_gib['total']:.1f} GiB)"
    else:
        fix = "no layout on the savers ladder fits: more GPUs, a larger GPU or a shorter data.seq_len"
    return what, fix
