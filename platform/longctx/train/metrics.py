"""Training metrics: FLOPs / MFU estimate, memory, and the per-step log (rank 0: console + JSONL + CSV).

FLOPs per optimizer step (forward + backward = 3 x forward; activation-checkpointing recompute not counted):
    6 * N * T                                   dense matmuls (N = non-embedding params + LM head, T = tokens)
  + c * L * A * sum_over_documents(len^2)       attention (QK^T and AV), padding excluded
with A = num_attention_heads x head_dim (the width of q, which is NOT hidden_size in Qwen3, Gemma and other
models whose heads x head_dim differs from the hidden size) and c the convention:

- `causal` (c = 6): 2 matmuls x 2 FLOPs x L x A x len^2 x 3 (fwd+bwd), halved because a causal kernel skips the
  masked upper triangle. The work flash-attention does; our `mfu`.
- `full_square` (c = 12): the same without halving, as Megatron-LM, NeMo and PaLM (arXiv 2204.02311, appendix B)
  count it; `torch.utils.flop_counter.FlopCounterMode` counts the same for an explicit QK^T / AV (eager) step.
  Our `mfu_full_square`; compare it with their published MFU (for Llama-3.1-8B on one-document rows it reads
  1.36x our `mfu` at 32K, 1.70x at 128K, 1.95x at 1M).

Packed documents only attend within themselves, so the attention term uses the sum of squared document lengths
rather than seq_len^2. Sliding-window layers are counted as full attention (an upper bound).
MFU = achieved FLOP/s / the device's dense bf16 tensor-core peak (`longctx.train.gpus`, exact device names).
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import time
from typing import Any

from longctx.progress import emit, format_duration
from longctx.train.gpus import gpu_by_name

ATTENTION_CONVENTIONS = {"causal": 6.0, "full_square": 12.0}
"""FLOPs per (layer x attention width x squared document length) of fwd+bwd attention, by counting convention."""


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


def attention_width(hf_config) -> int:
    """num_attention_heads x head_dim of a HF config (the q projection's width; hidden_size only when they agree)."""
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads * int(head_dim)


def step_flops(*, matmul_params: int, tokens: int, num_layers: int, attention_dim: int, sum_sq_doc_lengths: int,
               convention: str = "causal") -> float:
    """Model FLOPs of one step (forward + backward) for `tokens` tokens in documents with the given sum of squared
    lengths; `attention_dim` = heads x head_dim (`attention_width`); `convention` in ATTENTION_CONVENTIONS."""
    if convention not in ATTENTION_CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(ATTENTION_CONVENTIONS)}, got {convention!r}")
    return (6.0 * matmul_params * tokens
            + ATTENTION_CONVENTIONS[convention] * num_layers * attention_dim * sum_sq_doc_lengths)


def model_step_flops(hf_config, *, matmul_params: int, tokens: int, sum_sq_doc_lengths: int) -> dict[str, float]:
    """`step_flops` of a HF model config in both conventions: {"causal": ..., "full_square": ...}."""
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return {c: step_flops(matmul_params=matmul_params, tokens=tokens, num_layers=int(cfg.num_hidden_layers),
                          attention_dim=attention_width(cfg), sum_sq_doc_lengths=sum_sq_doc_lengths, convention=c)
            for c in ATTENTION_CONVENTIONS}


def device_peak_flops(device: str = "cpu") -> float | None:
    """Dense bf16 peak of the current GPU (exact device name, `longctx.train.gpus`), or None on CPU and on GPUs
    not listed there (MFU then not reported)."""
    if not str(device).startswith("cuda"):
        return None
    import torch  # deferred: heavy import, used only here

    spec = gpu_by_name(torch.cuda.get_device_name())
    return spec.peak_bf16_flops if spec else None


def memory_stats(device: str = "cpu") -> dict[str, float]:
    """Peak memory of this worker: GPU allocated (GiB) on CUDA, process max RSS (GiB) always."""
    out = {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if str(device).startswith("cuda"):
        import torch  # deferred: heavy import, used only here

        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class StepLog:
    """Per-step metrics kept in memory and written by rank 0 as JSONL + CSV (local or s3://), plus the step line
    (printed once, with elapsed time and ETA) and the tracker's scalars (TensorBoard, W&B, MLflow).

    Local files are appended to: a record is written when the next one arrives (so a validation loss measured
    at its step still joins it), at `flush` and at the end. The first write after a start or a resume rewrites
    the files from `history` (the resumed checkpoint's log), so steps a failed attempt logged after its last
    checkpoint do not stay behind. Object storage cannot append: there the objects are re-uploaded at most every
    `flush_every_s` seconds, at checkpoints and at the end."""

    def __init__(self, jsonl_uri: str | None, history: list[dict] | None = None, echo: bool = True,
                 tracker=None, flush_every_s: float = 10.0):
        self.jsonl_uri = jsonl_uri
        self.history: list[dict] = list(history or [])
        self.echo = echo
        self.tracker = tracker
        self.flush_every_s = flush_every_s
        self._written = None  # records already in the files; None: rewrite them from history at the next write
        self._last_flush = 0.0
        self._t0 = time.perf_counter()
        self._step0 = int(self.history[-1]["step"]) if self.history else 0

    def add(self, record: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self._t0
        done = int(record["step"]) - self._step0
        total = record.get("total_steps")
        record.setdefault("elapsed_s", elapsed)
        if total and done > 0:
            record.setdefault("eta_s", (int(total) - int(record["step"])) * elapsed / done)
        self.history.append(record)
        if self.echo:
            emit(format_step(record))
        if self.tracker is not None:
            self.tracker.log_step(record)
        if not self.jsonl_uri:
            return
        if self.jsonl_uri.startswith("s3://"):
            if time.time() - self._last_flush > self.flush_every_s:
                self.flush()
        else:
            self._write(upto=len(self.history) - 1)  # the newest record waits for a validation loss

    def annotate(self, step: int, **fields: Any) -> None:
        """Add fields measured at `step` (e.g. val_loss) to that step's record, and to the tracker."""
        if self.echo:
            emit(f"[train] step {step} " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in fields.items()))
        if self.history and self.history[-1].get("step") == step:
            self.history[-1].update(fields)
            if self._written is not None and self._written >= len(self.history):
                self._written = None  # already in the files: rewrite them at the next write
        if self.tracker is not None:
            self.tracker.log({("val/loss" if k == "val_loss" else f"train/{k}"): v for k, v in fields.items()}, step)

    def flush(self) -> None:
        if self.jsonl_uri:
            self._write(upto=len(self.history))
        if self.tracker is not None:
            self.tracker.flush()

    def close(self) -> None:
        self.flush()
        if self.tracker is not None:
            self.tracker.close()

    def _write(self, upto: int) -> None:
        from longctx import storage  # deferred: pulls in pyarrow, used only here

        if upto == 0 and self._written is None:
            return  # nothing to write yet
        csv_uri = os.path.splitext(self.jsonl_uri)[0] + ".csv"
        if self.jsonl_uri.startswith("s3://") or self._written is None or upto < self._written:
            records = self.history[:upto]
            storage.write_text(self.jsonl_uri, "".join(json.dumps(r) + "\n" for r in records))
            storage.write_text(csv_uri, to_csv(records))
            self._csv_keys = _csv_keys(records)
        else:
            new = self.history[self._written:upto]
            if not new:
                return
            keys = _csv_keys(self.history[:upto])
            if keys != self._csv_keys:  # a new column: the CSV header changes, rewrite it once
                storage.write_text(csv_uri, to_csv(self.history[:upto]))
                self._csv_keys = keys
            else:
                with open(csv_uri, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=keys, extrasaction="ignore").writerows(new)
            with open(self.jsonl_uri, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in new))
        self._written = upto
        self._last_flush = time.time()


def _csv_keys(history: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in history:  # list-valued fields (row ids) stay in the JSONL only
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (list, dict))]
    return keys


def to_csv(history: list[dict]) -> str:
    keys = _csv_keys(history)
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
        if r.get("mfu_full_square") is not None:
            parts.append(f"(full-square {100 * r['mfu_full_square']:.1f}%)")
    if r.get("elapsed_s") is not None:
        parts.append(f"elapsed {format_duration(r['elapsed_s'])}")
        if r.get("total_steps"):
            parts.append(f"eta {format_duration(r.get('eta_s'))}")
    return "[train] " + " | ".join(parts)
