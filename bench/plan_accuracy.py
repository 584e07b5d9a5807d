"""How right is `longctx plan`? Three tables, printed as markdown (docs/planning.md carries their output):

    python bench/plan_accuracy.py --cpu        # plan vs the real step on CPU (peak allocated), small shapes
    python bench/plan_accuracy.py --alst       # planned longest rows vs ALST's published Llama-3.1-8B figures
    python bench/plan_accuracy.py --recipes    # the plan of every shipped GPU recipe on its stated GPUs
    python bench/plan_accuracy.py --layers     # 3 traced layers extrapolated vs all 32 traced (8B, fake tensors)

No GPU is used: the CPU table measures real CPU runs; the other tables are predictions (ALST's are the only
measurements there, from arXiv 2506.13996 and its ArcticTraining recipes). Seconds and the load average are
printed beside each table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

SHAPES = "builtin:model-shapes"
ALST_BASE = [f"model.path={SHAPES}/llama-3.1-8b", "train.use_gpu=true", "train.gpu_type=h100", "train.zero_stage=3",
             "train.offload_optimizer=true", "train.activation_checkpointing=true", "train.loss_chunk_tokens=4096",
             "model.attn_implementation=flash_attention_2", "data.attention=document", "data.seq_len=32768"]
# (setup, GPUs, SP degree, savers beyond ALST_BASE, ALST's longest row): ArcticTraining's recipes
# projects/sequence-parallelism/run-h100-sp{1,8,32}-llama-8b*.yml (all: ZeRO-3, optimizer offload, checkpointing).
ALST = [
    ("1 GPU: all savers + parameter offload", 1, 1, ["activation_offload", "tiled_mlp", "offload_params"], 500_000),
    ("8 GPUs: chunked loss (no SP)", 8, 1, [], 160_000),
    ("8 GPUs: + Ulysses SP=8", 8, 8, [], 1_100_000),
    ("8 GPUs: + activation offload", 8, 8, ["activation_offload"], 2_400_000),
    ("8 GPUs: + tiled MLP", 8, 8, ["activation_offload", "tiled_mlp"], 3_700_000),
    ("32 GPUs: all savers, SP=32", 32, 32, ["activation_offload", "tiled_mlp"], 15_000_000),
]
RECIPES = [  # shipped GPU recipes and the config.json of the model they name
    ("index-1.9b-32k-pt.yaml", "index-1.9b"), ("index-1.9b-32k-sft.yaml", "index-1.9b"),
    ("llama2-7b-80k-per-source.yaml", "llama-2-7b"), ("longskywork-sft.yaml", "skywork-13b"),
    ("sweep-index-rope-base.yaml", "index-1.9b"),
]


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def cpu_table(lengths=(256, 512, 1024), layers: int = 6) -> list[dict]:
    import torch
    from transformers import LlamaConfig

    from longctx.config import TrainConfig
    from longctx.plan.measure import measure_cpu_step
    from longctx.plan.trace import StepShape, trace_step

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(lengths))
    torch.set_num_threads(1)  # the same allocations, much faster on a shared machine
    rows = []
    for s, attn, ckpt, tiled in itertools.product(lengths, ("sdpa", "eager"), (False, True), (False, True)):
        train = TrainConfig(loss_chunk_tokens=256, activation_checkpointing=ckpt, tiled_mlp=tiled)
        shape = StepShape(cfg, s, 2, 1, attn, "document", torch.float32, train, gpu_kernels=False)
        planned = trace_step(shape).peak
        measured = measure_cpu_step(shape)
        rows.append({"seq_len": s, "attn": attn, "checkpointing": ckpt, "tiled_mlp": tiled,
                     "plan_mib": planned / 2**20, "measured_mib": measured / 2**20, "ratio": planned / measured})
    return rows


def alst_table() -> list[dict]:
    from longctx.config import load_config
    from longctx.plan.planner import Planner

    rows = []
    for name, gpus, sp, savers, published in ALST:
        over = ALST_BASE + [f"train.num_workers={gpus}", f"train.sequence_parallel={sp}",
                            f"train.global_batch_tokens={32768 * gpus // sp}"] + [f"train.{k}=true" for k in savers]
        t0 = time.perf_counter()
        best = Planner(load_config(None, over)).max_seq_len()
        planned = best.extra["max_seq_len"] if best else 0
        rows.append({"setup": name, "alst": published, "plan": planned, "ratio": planned / published,
                     "cpu_gib_per_node": best.cpu_gib_per_node if best else None,
                     "dominant": best.dominant if best else None, "probes": best.extra.get("probes") if best else 0,
                     "seconds": time.perf_counter() - t0})
    return rows


def recipe_table() -> list[dict]:
    from longctx.config import load_config
    from longctx.plan.planner import Planner

    rows = []
    for recipe, shapes in RECIPES:
        cfg = load_config(f"jobs/configs/{recipe}", [f"model.path={SHAPES}/{shapes}"])
        t0 = time.perf_counter()
        planner = Planner(cfg)
        p = planner.plan()
        longest = planner.max_seq_len()
        rows.append({"recipe": recipe, "model": shapes, "gpus": f"{cfg.train.num_workers} x {p.gpu}",
                     "seq_len": cfg.data.seq_len, "layout": p.layout, "total_gib": p.per_gpu_gib["total"],
                     "usable_gib": p.usable_gib, "fits": p.fits, "dominant": p.dominant,
                     "cpu_gib_per_node": p.cpu_gib_per_node, "step_seconds": p.step_seconds,
                     "max_seq_len": longest.extra["max_seq_len"] if longest else None,
                     "seconds": time.perf_counter() - t0})
    return rows


def layer_table(seq_len: int = 32768) -> list[dict]:
    import torch

    from longctx.config import TrainConfig, load_config
    from longctx.plan.planner import read_model_config
    from longctx.plan.trace import StepShape, trace_step

    hf = read_model_config(load_config(None, [f"model.path={SHAPES}/llama-3.1-8b", f"data.seq_len={seq_len}"]))
    rows = []
    for ckpt, offload in ((False, False), (True, False), (True, True)):
        train = TrainConfig(loss_chunk_tokens=4096, activation_checkpointing=ckpt, activation_offload=offload)
        shape = StepShape(hf, seq_len, 1, 1, "flash_attention_2", "document", torch.bfloat16, train)
        few, every = trace_step(shape), trace_step(StepShape(**{**shape.__dict__, "layers": 32}))
        rows.append({"checkpointing": ckpt, "activation_offload": offload, "peak_3_layers_gib": few.peak / 2**30,
                     "peak_32_layers_gib": every.peak / 2**30, "ratio": few.peak / every.peak,
                     "seconds_3": few.seconds, "seconds_32": every.seconds})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("cpu", "alst", "recipes", "layers"):
        p.add_argument(f"--{name}", action="store_true")
    args = p.parse_args(argv)
    if not any(vars(args).values()):
        p.error("pick at least one of --cpu --alst --recipes --layers")
    if args.cpu:
        t0 = time.perf_counter()
        rows = cpu_table()
        print(f"\n### Plan vs measured, CPU ({time.perf_counter() - t0:.0f} s, {_load()})\n")
        print("| seq_len | attention | checkpointing | tiled MLP | plan MiB | measured MiB | plan / measured |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['seq_len']} | {r['attn']} | {'on' if r['checkpointing'] else 'off'} | "
                  f"{'on' if r['tiled_mlp'] else 'off'} | {r['plan_mib']:.2f} | {r['measured_mib']:.2f} | "
                  f"{r['ratio']:.3f} |")
        print(f"\nworst: {max(abs(r['ratio'] - 1) for r in rows):.1%}")
    if args.layers:
        t0 = time.perf_counter()
        rows = layer_table()
        print(f"\n### 3 traced layers extrapolated vs 32 traced (Llama-3.1-8B, 32K, flash_attention_2) "
              f"({time.perf_counter() - t0:.0f} s, {_load()})\n")
        print("| checkpointing | activation offload | peak, 3 layers + extrapolation (GiB) | peak, 32 layers (GiB) | "
              "ratio | trace s (3 / 32) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {'on' if r['checkpointing'] else 'off'} | {'on' if r['activation_offload'] else 'off'} | "
                  f"{r['peak_3_layers_gib']:.2f} | {r['peak_32_layers_gib']:.2f} | {r['ratio']:.4f} | "
                  f"{r['seconds_3']:.1f} / {r['seconds_32']:.1f} |")
    if args.alst:
        t0 = time.perf_counter()
        rows = alst_table()
        print(f"\n### Longest Llama-3.1-8B row on H100 80 GB: plan vs ALST ({time.perf_counter() - t0:.0f} s, "
              f"{_load()})\n")
        print("| setup | ALST (measured) | plan | plan / ALST | CPU GiB per node (plan) | dominant term | plans | s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['setup']} | {r['alst']:,} | {r['plan']:,} | {r['ratio']:.2f} | "
                  f"{r['cpu_gib_per_node']:.0f} | {r['dominant']} | {r['probes']} | {r['seconds']:.0f} |")
    if args.recipes:
        t0 = time.perf_counter()
        rows = recipe_table()
        print(f"\n### Shipped GPU recipes ({time.perf_counter() - t0:.0f} s, {_load()})\n")
        print("| recipe | model | GPUs | seq_len | layout | GiB per GPU (usable) | fits | dominant | CPU GiB/node | "
              "s/step at 35% MFU | longest row that fits |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            lay = r["layout"]
            savers = [k for k in ("activation_checkpointing", "tiled_mlp", "activation_offload", "offload_optimizer",
                                  "offload_params") if lay[k]]
            layout = f"ZeRO-{lay['zero_stage']}, SP {lay['sequence_parallel']}, " + (", ".join(savers) or "-")
            print(f"| {r['recipe']} | {r['model']} | {r['gpus']} | {r['seq_len']:,} | {layout} | "
                  f"{r['total_gib']:.1f} ({r['usable_gib']:.1f}) | {'yes' if r['fits'] else 'NO'} | {r['dominant']} | "
                  f"{r['cpu_gib_per_node']:.0f} | {r['step_seconds']:.1f} | {r['max_seq_len'] or 0:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
