"""The planner's proof on a GPU: the real training step at several row lengths, measured peak memory and tokens/s
beside what `longctx plan` predicts for each length, in one command (one GPU, random weights from config.json).

    python bench/gpu_proof.py --set model.path=builtin:model-shapes/llama-3.1-8b --lengths 8192,32768,65536 \\
        --set train.zero_stage=3 --set train.activation_checkpointing=true --set train.offload_optimizer=true
    python bench/gpu_proof.py --device cpu --set model.path=PATH --lengths 128,256   # CPU smoke run (CI)

The job config (--config/--set, as `longctx plan` takes them) is run on ONE rank: `train.num_workers` is set to 1
(so ZeRO partitions nothing; offloads and the savers work as configured). Each length runs in a fresh process (an
out-of-memory leaves CUDA unusable): model from config.json at random init, `prepare_for_training`, the DeepSpeed
engine of `build_deepspeed_config`, one warm-up step then `--steps` timed steps of one-document rows. Measured peak:
`torch.cuda.max_memory_allocated()` since the process started (on CPU: the peak of bytes allocated from before the
model is built, from the allocator's records). Planned: the plan's per-GPU total for the same config, which counts
the same allocations (the allocator reserve is not in either). A length that runs out of memory is reported as OOM:
the plan should say it does not fit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from longctx.config import load_config


def _one_config(args, seq_len: int):
    """The job config on one rank at this row length (one micro-batch per step)."""
    micro = load_config(args.config, args.overrides).train.micro_batch_size
    return load_config(args.config, [
        *args.overrides, "train.num_workers=1", "train.sequence_parallel=1", f"data.seq_len={seq_len}",
        f"model.max_position_embeddings={seq_len}", f"train.global_batch_tokens={seq_len * micro}",
        f"train.use_gpu={str(args.device != 'cpu').lower()}"])


def measure(args, seq_len: int) -> dict:
    """The real step at `seq_len` in this process: peak bytes and seconds per step."""
    import torch
    from transformers import AutoModelForCausalLM

    from longctx.model.load import pick_attn_implementation
    from longctx.plan.measure import peak_allocated
    from longctx.plan.planner import read_model_config
    from longctx.plan.trace import one_document_rows
    from longctx.train.batches import rank_forward_inputs
    from longctx.train.deepspeed import build_deepspeed_config, init_single_process
    from longctx.train.loss import shift_targets
    from longctx.train.memory_savers import prepare_for_training
    from longctx.train.optim import adamw
    from longctx.train.schedule import derive_layout

    cfg = _one_config(args, seq_len)
    gpu = args.device != "cpu"
    init_single_process(args.device)
    import deepspeed

    hf = read_model_config(cfg)
    attn = pick_attn_implementation(cfg.model.attn_implementation, args.device)
    dtype = torch.bfloat16 if gpu and cfg.model.dtype == "auto" else getattr(torch, {"auto": "float32"}.get(
        cfg.model.dtype, cfg.model.dtype))
    t = cfg.train
    layout = derive_layout(global_batch_tokens=t.global_batch_tokens, seq_len=seq_len,
                           micro_batch_size=t.micro_batch_size, num_workers=1)
    timings: list[float] = []

    def run():
        torch.manual_seed(0)
        with torch.device(args.device):
            lm = AutoModelForCausalLM.from_config(hf, attn_implementation=attn, dtype=dtype)
        wrapped = prepare_for_training(lm, t, use_gpu=gpu)
        optimizer = adamw(wrapped, lr=t.lr, weight_decay=t.weight_decay, betas=t.adam_betas)  # the loop's AdamW
        engine, *_ = deepspeed.initialize(model=wrapped, optimizer=optimizer,
                                          config=build_deepspeed_config(t, layout, use_gpu=gpu))
        m = one_document_rows(t.micro_batch_size, seq_len, hf.get_text_config().vocab_size)
        tgt = shift_targets(m.labels, m.doc_ids if cfg.data.attention == "document" else None)
        ids, tgt, kwargs = rank_forward_inputs(m, tgt, sequence_parallel=1, sp_rank=0, attn_implementation=attn,
                                               attention=cfg.data.attention, device=args.device, dtype=dtype)
        for i in range(1 + args.steps):
            t0 = time.perf_counter()
            loss_sum, n = engine(ids, tgt, **kwargs)
            engine.backward(loss_sum / n)
            engine.step()
            if gpu:
                torch.cuda.synchronize()
            if i:
                timings.append(time.perf_counter() - t0)

    if gpu:
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_allocated(run)
    step_s = sum(timings) / len(timings)
    return {"seq_len": seq_len, "measured_gib": peak / 2**30, "step_s": step_s,
            "tokens_per_s": t.micro_batch_size * seq_len / step_s,
            "device": torch.cuda.get_device_name() if gpu else "cpu", "attn": attn}


def plan_for(args, seq_len: int, gpu_kind: str | None) -> dict:
    from longctx.plan.planner import Planner

    p = Planner(_one_config(args, seq_len), gpu=gpu_kind, mfu=args.mfu).plan()
    return {"planned_gib": p.per_gpu_gib["total"], "planned_fits": p.fits, "planned_tokens_per_s": p.tokens_per_s,
            "usable_gib": p.usable_gib}


def _gpu_kind(device: str) -> str | None:
    if device == "cpu":
        return None
    import torch

    from longctx.train.gpus import PLAN_KINDS, gpu_by_name

    spec = gpu_by_name(torch.cuda.get_device_name())
    return spec.kind if spec and spec.kind in PLAN_KINDS else None


def main(argv=None) -> int:
    from longctx.jobargs import add_config_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p, default_config=None, example="model.path=builtin:model-shapes/llama-3.1-8b")
    p.add_argument("--lengths", default="8192,32768,65536", help="row lengths (tokens), comma-separated")
    p.add_argument("--steps", type=int, default=2, help="timed steps per length (after one warm-up step)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--mfu", type=float, default=0.35, help="MFU the plan assumes for tokens/s")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: measure one length
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one is not None:
        print(json.dumps(measure(args, args.one)), flush=True)
        return 0
    kind = _gpu_kind(args.device)
    if args.device != "cpu" and kind is None:
        import torch

        args.overrides.append(f"train.gpu_memory_gib={torch.cuda.get_device_properties(0).total_memory / 2**30}")
    rows = []
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(seq_len), "--device", args.device, "--steps", str(args.steps)]
        cmd += (["--config", args.config] if args.config else []) + [a for o in args.overrides for a in ("--set", o)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"seq_len": seq_len, "measured_gib": None, "oom": True,
                                                   "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
        row.update(plan_for(args, seq_len, kind))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| seq_len | planned GiB | measured GiB | planned / measured | fits (plan) | tokens/s measured | "
          "tokens/s planned |\n|---|---|---|---|---|---|---|")
    for r in rows:
        measured = f"{r['measured_gib']:.2f}" if r.get("measured_gib") is not None else "OOM / failed"
        ratio = f"{r['planned_gib'] / r['measured_gib']:.3f}" if r.get("measured_gib") else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        planned_tps = f"{r['planned_tokens_per_s']:,.0f}" if r.get("planned_tokens_per_s") else "-"
        print(f"| {r['seq_len']:,} | {r['planned_gib']:.2f} | {measured} | {ratio} | {r['planned_fits']} | {tps} | "
              f"{planned_tps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
