"""Training metrics: FLOPs / MFU estimate, memory, and the per-step log (rank 0: console + JSONL + CSV).

FLOPs per optimizer step (Megatron-LM style, forward + backward = 3 x forward):
    6 * N * T                                   dense matmuls (N = non-embedding params + LM head, T = tokens)
  + 6 * L * H * sum_over_documents(len^2)       causal attention (QK^T and AV: 2 matmuls x 2 FLOPs x L x H x
                                                len^2 / 2 for causality, x 3 for fwd+bwd), padding excluded
with H the hidden size (heads x head_dim). Packed documents only attend within themselves, so the attention
term uses the sum of squared document lengths rather than seq_len^2.
MFU = achieved FLOP/s / peak FLOP/s of the device (dense bf16 tensor-core peak on GPU).
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import time
from typing import Any

# Dense bf16 peak FLOP/s (no sparsity) per device, by substring of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def count_params(model) -> dict[str, int]:
    """Total parameters and the part that does matmul work per token (all but input embeddings)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings()
    emb_n = sum(p.numel() for p in emb.parameters()) if emb is not None else 0
    out = model.get_output_embeddings()
    tied = out is not None and emb is not None and out.weight is emb.weight
    matmul = total - emb_n + (emb_n if tied else 0)
    # ZeRO-3 partitions parameters: numel() is 0 on a partition; ds_numel holds the full count.
    if total == 0:
        total = sum(getattr(p, "ds_numel", 0) for p in model.parameters())
        matmul = total
    return {"total": int(total), "matmul": int(matmul)}


def step_flops(*, matmul_params: int, tokens: int, num_layers: int, hidden_size: int, sum_sq_doc_lengths: int) -> float:
    """Training FLOPs of one step (forward + backward) for `tokens` tokens in documents with the given sum of
    squared lengths."""
    return 6.0 * matmul_params * tokens + 6.0 * num_layers * hidden_size * sum_sq_doc_lengths


def device_peak_flops(device: str = "cpu") -> float | None:
    """Dense bf16 peak of the current GPU, or None on CPU / unknown GPUs (MFU then not reported)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, peak in GPU_PEAK_BF16.items():
        if key in name:
            return peak
    return None


def memory_stats(device: str = "cpu") -> dict[str, float]:
    """Peak memory of this worker: GPU allocated (GiB) on CUDA, process max RSS (GiB) always."""
    out = {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if str(device).startswith("cuda"):
        import torch

        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class StepLog:
    """Per-step metrics kept in memory and written by rank 0 as JSONL + CSV (local or s3://)."""

    def __init__(self, jsonl_uri: str | None, history: list[dict] | None = None, echo: bool = True):
        self.jsonl_uri = jsonl_uri
        self.history: list[dict] = list(history or [])
        self.echo = echo
        self._last_flush = 0.0

    def add(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.echo:
            print(format_step(record), flush=True)
        # Local files are cheap to rewrite every step; object storage every ~10 s (and at checkpoints / end).
        if self.jsonl_uri and (not self.jsonl_uri.startswith("s3://") or time.time() - self._last_flush > 10):
            self.flush()

    def flush(self) -> None:
        if not self.jsonl_uri:
            return
        from longctx import storage

        storage.write_text(self.jsonl_uri, "".join(json.dumps(r) + "\n" for r in self.history))
        storage.write_text(os.path.splitext(self.jsonl_uri)[0] + ".csv", to_csv(self.history))
        self._last_flush = time.time()


def to_csv(history: list[dict]) -> str:
    keys: list[str] = []
    for r in history:  # list-valued fields (row ids) stay in the JSONL only
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (list, dict))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def format_step(r: dict) -> str:
    parts = [f"step {r['step']}/{r.get('total_steps', '?')}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3g}"]
    if r.get("grad_norm") is not None:
        parts.append(f"grad_norm {r['grad_norm']:.3f}")
    parts.append(f"tok/s {r['tokens_per_s']:.0f}")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    return "[train] " + " | ".join(parts)
