"""Ulysses sequence parallelism (DeepSpeed ALST) on 2 gloo workers: each packed row is split in two halves, one
per worker, and the attention all-to-alls heads <-> sequence. Loss, gradient norm and the updated weights equal a
single-process run without SP on the same rows, with documents crossing the shard boundary kept apart (the
reference uses per-document masks, so any cross-document attention would show as a difference).
"""

from __future__ import annotations

import pytest

from longctx.config import load_config
from train_helpers import make_tiny_model, packed_rows, reference_training, write_packed_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SEQ, STEPS = 64, 2


def test_ulysses_sp2_equals_single_process_training(ray_cluster, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx.train.trainer import run_training

    model_dir = make_tiny_model(str(tmp_path / "model"), hidden=32, max_pos=32)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    table = packed_rows(8, SEQ, vocab, seed=3, min_doc=10, max_doc=40)
    data_uri = write_packed_shards(str(tmp_path / "data"), table, rows_per_shard=4)
    cfg = load_config(None, [
        f"model.path={model_dir}", "data.seq_len=64", "model.rope_theta=20000",
        "train.num_workers=2", "train.sequence_parallel=2", "train.zero_stage=1",
        "train.global_batch_tokens=128", f"train.max_steps={STEPS}", "train.lr=3e-3", "train.warmup_ratio=0.5",
    ])
    out = run_training(cfg, data_uri, str(tmp_path / "run" / "train"), run_id="run")
    assert out.layout["data_parallel"] == 1 and out.layout["grad_accum"] == 2
    # Both SP ranks read the same rows; the step log counts them once.
    assert [h["row_ids"] for h in out.history] == [[0, 1], [2, 3]]
    assert all(h["step_tokens"] == 2 * SEQ for h in out.history)

    ref_weights, ref_losses, ref_norms = reference_training(model_dir, cfg, table, STEPS, rows_per_step=2, data_parallel=1)
    assert [h["loss"] for h in out.history] == pytest.approx(ref_losses, rel=1e-5)
    assert [h["grad_norm"] for h in out.history] == pytest.approx(ref_norms, rel=1e-4)
    got = AutoModelForCausalLM.from_pretrained(out.final_model_uri).state_dict()
    worst = max((got[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    assert worst < 2e-5, f"SP=2 weights differ from the single-process run by {worst}"
