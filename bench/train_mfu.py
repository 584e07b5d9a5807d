"""Training throughput and MFU of one worker's training step (our path: HF Llama + DeepSpeed engine + packed-document
attention + chunked loss), and the longest row that trains on one device.

    python bench/train_mfu.py --preset 1b --seq-lens 8192,32768,131072          # GPU: MFU + tokens/s per length
    python bench/train_mfu.py --preset 8b --find-max-len --offload              # GPU: longest trainable row
    python bench/train_mfu.py --preset tiny --seq-lens 256,512 --device cpu     # CPU smoke run (proves the path)

Prints one JSON line per measurement and a table. FLOPs per step = 6*N*T + c*L*A*sum(doc_len^2) with A = heads x
head_dim; MFU in both conventions (longctx.train.metrics): `mfu` counts causal attention once (c=6), `mfu_full_square`
the full square as Megatron-LM / NeMo / PaLM do (c=12). MFU = achieved FLOP/s / the device's dense bf16 peak.
Attention backend: flash_attention_2 if installed, else flex_attention (document BlockMask) on GPU, SDPA with a
per-document mask on CPU (override with --attn). Activation checkpointing is on by default for rows >= 8K.
The longest-row search runs each attempt in a fresh subprocess (an OOM leaves CUDA state unusable) and doubles,
then bisects, the row length.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PRESETS = {
    # Llama-3.2-1B-like and Llama-3.1-8B-like shapes (random init: only throughput and memory matter here).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=2048),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


def measure(preset: str, seq_len: int, *, device: str, attn: str, steps: int, docs_per_row: int, zero: int,
            offload: bool, checkpointing: bool | None, loss_chunk: int) -> dict:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from longctx.config import TrainConfig
    from longctx.model.attention import attention_inputs, document_ids_from_seg_lengths
    from longctx.model.load import pick_attn_implementation
    from longctx.train.deepspeed import build_deepspeed_config, init_single_process
    from longctx.train.loss import CausalLMWithChunkedLoss, shift_targets
    from longctx.train.metrics import count_params, device_peak_flops, model_step_flops
    from longctx.train.schedule import derive_layout

    init_single_process(device)
    attn_impl = pick_attn_implementation(attn, device)
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=seq_len, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_impl, dtype=dtype)
    use_ckpt = checkpointing if checkpointing is not None else seq_len >= 8192
    if use_ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    n = count_params(lm)
    model = CausalLMWithChunkedLoss(lm, chunk_tokens=loss_chunk)
    layout = derive_layout(global_batch_tokens=seq_len, seq_len=seq_len, micro_batch_size=1, num_workers=1)
    tcfg = TrainConfig(zero_stage=zero, offload_optimizer=offload)
    ds_config = build_deepspeed_config(tcfg, layout, use_gpu=gpu)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu and not offload)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    lengths = [seq_len // docs_per_row] * docs_per_row
    lengths[-1] += seq_len - sum(lengths)
    doc_ids = document_ids_from_seg_lengths([lengths], seq_len).to(device)
    pos = torch.cat([torch.arange(k) for k in lengths])[None].to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), device=device)
    tgt = shift_targets(ids, doc_ids)
    kwargs = attention_inputs(pos, attn_implementation=attn_impl, doc_ids=doc_ids)

    def one_step():
        loss_sum, count = engine(ids, tgt, **kwargs)
        engine.backward(loss_sum / count)
        engine.step()

    one_step()  # warm-up (kernels, compile of flex_attention)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if gpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    flops = model_step_flops(cfg, matmul_params=n["matmul"], tokens=seq_len,
                             sum_sq_doc_lengths=sum(k * k for k in lengths))
    peak = device_peak_flops(device)
    return {
        "preset": preset, "params": n["total"], "seq_len": seq_len, "docs_per_row": docs_per_row, "attn": attn_impl,
        "device": torch.cuda.get_device_name() if gpu else "cpu", "zero": zero, "offload": offload,
        "activation_checkpointing": use_ckpt, "step_s": dt, "tokens_per_s": seq_len / dt,
        "tflops_per_s": flops["causal"] / dt / 1e12, "mfu": flops["causal"] / dt / peak if peak else None,
        "mfu_full_square": flops["full_square"] / dt / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
    }


def _attempt(args, seq_len: int) -> dict | None:
    """One measurement in a fresh subprocess; None when it ran out of memory (or failed)."""
    cmd = [sys.executable, __file__, "--preset", args.preset, "--seq-lens", str(seq_len), "--steps", "1",
           "--device", args.device, "--attn", args.attn, "--zero", str(args.zero), "--docs-per-row", "1",
           "--loss-chunk", str(args.loss_chunk), "--json-only"] + (["--offload"] if args.offload else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["?"]
    print(f"  {seq_len}: failed ({tail[0][:160]})", file=sys.stderr)
    return None


def find_max_len(args) -> dict:
    lo, hi, best = None, None, None
    length = args.start_len
    while length <= args.limit_len:  # double until a failure
        r = _attempt(args, length)
        if r is None:
            hi = length
            break
        lo, best = length, r
        length *= 2
    if lo is None:
        return {"preset": args.preset, "max_trainable_seq_len": None, "note": f"{args.start_len} already fails"}
    while hi is not None and hi - lo > args.granularity:  # bisect between the last success and the failure
        mid = (lo + hi) // 2 // args.granularity * args.granularity
        r = _attempt(args, mid)
        if r is None:
            hi = mid
        else:
            lo, best = mid, r
    return {"preset": args.preset, "max_trainable_seq_len": lo, "at_max": best}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    p.add_argument("--seq-lens", default="8192,32768,131072")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--attn", default="auto", help="auto | flash_attention_2 | flex_attention | sdpa")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--docs-per-row", type=int, default=1, help="documents packed into each row (1 = one long doc)")
    p.add_argument("--zero", type=int, default=0, help="ZeRO stage (one device: only matters with --offload)")
    p.add_argument("--offload", action="store_true", help="ZeRO optimizer state offload to CPU (needs --zero >= 1)")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--find-max-len", action="store_true")
    p.add_argument("--start-len", type=int, default=32768)
    p.add_argument("--limit-len", type=int, default=4 * 2**20)
    p.add_argument("--granularity", type=int, default=8192)
    p.add_argument("--json-only", action="store_true")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.json_only:
        print("# no GPU: CPU smoke run (fp32, SDPA with document masks); MFU needs a GPU's bf16 peak", file=sys.stderr)
    if args.find_max_len:
        r = find_max_len(args)
        print(json.dumps(r))
        return 0
    ckpt = {"auto": None, "on": True, "off": False}[args.checkpointing]
    rows = []
    for seq_len in [int(s) for s in args.seq_lens.split(",")]:
        r = measure(args.preset, seq_len, device=args.device, attn=args.attn, steps=args.steps,
                    docs_per_row=args.docs_per_row, zero=args.zero, offload=args.offload, checkpointing=ckpt,
                    loss_chunk=args.loss_chunk)
        rows.append(r)
        print(json.dumps(r), flush=True)
    if not args.json_only:
        print("\n| preset | seq_len | attn | tokens/s | TFLOP/s | MFU (causal) | MFU (full square) | peak GiB |\n"
              "|---|---|---|---|---|---|---|---|")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            mfu_fs = f"{100 * r['mfu_full_square']:.1f}%" if r["mfu_full_square"] else "n/a"
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "n/a"
            print(f"| {r['preset']} | {r['seq_len']} | {r['attn']} | {r['tokens_per_s']:.0f} | "
                  f"{r['tflops_per_s']:.3f} | {mfu} | {mfu_fs} | {mem} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
