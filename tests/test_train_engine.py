"""The real training path: Ray Train (2 CPU workers, gloo) + DeepSpeed ZeRO-2 on a tiny Llama, to loopback S3.

One run checks: the final HF model on s3:// loads with `from_pretrained` and carries the new rope_parameters;
its weights equal a plain single-process PyTorch run (AdamW, cosine LR, clip, loss = mean over every valid token
of the global batch) on the same rows; ZeRO-2 really partitions the optimizer state over the 2 workers; the
per-step log, the checkpoint's row ledger and the step count are what the config asked for.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from longctx import storage
from longctx.config import load_config
from longctx.train.batches import lane_step_rows
from train_helpers import make_tiny_model, packed_rows, reference_training, write_packed_shards

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

SEQ, STEPS, THETA = 64, 3, 50000.0


def test_training_on_two_workers_matches_single_process_and_publishes_to_s3(ray_cluster, s3_bucket, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from longctx.train.trainer import run_training

    model_dir = make_tiny_model(str(tmp_path / "model"), hidden=32, max_pos=32)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    table = packed_rows(16, SEQ, vocab, seed=1)
    data_uri = write_packed_shards(f"{s3_bucket}/data", table, rows_per_shard=5)
    run_dir = f"{s3_bucket}/runs/r1"
    cfg = load_config(None, [
        f"model.path={model_dir}", "data.seq_len=64", f"model.rope_theta={THETA}",
        "train.global_batch_tokens=256", f"train.max_steps={STEPS}", "train.lr=3e-3", "train.warmup_ratio=0.34",
        "train.grad_clip=0.5", "train.loss_chunk_tokens=40",
    ])

    out = run_training(cfg, data_uri, f"{run_dir}/train", run_id="r1")

    # Steps, tokens and the per-step log.
    assert out.steps == STEPS and out.tokens == STEPS * 4 * SEQ
    assert [h["step"] for h in out.history] == [1, 2, 3]
    assert out.metrics_log_uri.startswith("s3://") and storage.exists(out.metrics_log_uri[:-len("jsonl")] + "csv")
    for h in out.history:
        assert h["tokens_per_s"] > 0 and h["grad_norm"] > 0 and h["loss_tokens"] > 0

    # Final model: committed on S3, loads with from_pretrained, has the new RoPE base and length.
    assert out.final_model_uri == f"{run_dir}/train/final_model"
    storage.require_committed(out.final_model_uri)
    local = storage.download_dir(out.final_model_uri, str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(local)
    assert reloaded.config.rope_parameters["rope_theta"] == THETA
    assert reloaded.config.max_position_embeddings == SEQ
    assert AutoTokenizer.from_pretrained(local).eos_token == "<|endoftext|>"

    # Weights and losses equal a single-process PyTorch run on the same rows.
    ref, ref_losses, ref_norms = reference_training(model_dir, cfg, table, STEPS)
    got = reloaded.state_dict()
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 2e-5, f"max weight difference vs single-process reference: {worst}"
    assert [h["loss"] for h in out.history] == pytest.approx(ref_losses, rel=1e-5)
    assert [h["grad_norm"] for h in out.history] == pytest.approx(ref_norms, rel=1e-4)
    assert out.history[1]["lr"] == pytest.approx(3e-3)  # warmup of 2 steps reached the peak at step 2

    # ZeRO-2 partitions the fp32 optimizer state: each of the 2 ranks holds about half.
    info = json.loads(storage.read_text(f"{run_dir}/train/engine_info.json"))
    total = info["params"]["total"]
    sizes = [r["optimizer_state_numel"] for r in info["ranks"]]
    assert info["zero_stage"] == 2 and len(sizes) == 2
    assert all(0.45 * total <= s <= 0.55 * total for s in sizes), (sizes, total)

    # The last checkpoint's ledger holds exactly the rows trained on.
    ckpt = out.checkpoint_uri
    state = json.loads(storage.read_text(("s3://" + ckpt if not ckpt.startswith(("s3://", "/")) else ckpt)
                                         + "/trainer_state.json"))
    assert state["step"] == STEPS
    # (each rank's lane of the 16 rows: 0-7 and 8-15, two rows per step)
    assert state["ledger"]["consumed"] == {"0": sorted(i for rows in lane_step_rows(16, 2, 2, STEPS) for i in rows)}
    assert state["ledger"]["consumed"]["0"] == sorted(i for h in out.history for i in h["row_ids"])
