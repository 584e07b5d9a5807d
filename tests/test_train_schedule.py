"""Batch layout, step planning, the cosine schedule and the generated DeepSpeed config (no Ray needed)."""

from __future__ import annotations

import json

import pytest

from longctx.config import TrainConfig
from longctx.train.deepspeed import build_deepspeed_config, load_user_deepspeed_json
from longctx.train.schedule import BatchLayoutError, cosine_lr, derive_layout, plan_steps


def test_index_long_pt_layout():
    # Index Long-PT: 4M-token batches of 32K rows on 64 GPUs, micro batch 1 -> grad_accum 2.
    layout = derive_layout(global_batch_tokens=4 * 2**20, seq_len=32768, micro_batch_size=1, num_workers=64)
    assert (layout.data_parallel, layout.grad_accum, layout.tokens_per_step) == (64, 2, 4 * 2**20)
    sp = derive_layout(global_batch_tokens=4 * 2**20, seq_len=32768, micro_batch_size=1, num_workers=64, sequence_parallel=4)
    assert (sp.data_parallel, sp.grad_accum) == (16, 8)


def test_layout_error_names_the_numbers_and_a_fix():
    with pytest.raises(BatchLayoutError) as e:
        derive_layout(global_batch_tokens=10_000, seq_len=1024, micro_batch_size=1, num_workers=2)
    msg = str(e.value)
    assert "10000" in msg and "1024 x 1 x 2 = 2048" in msg and "8192" in msg and "10240" in msg
    with pytest.raises(BatchLayoutError, match="multiple of train.sequence_parallel"):
        derive_layout(global_batch_tokens=4096, seq_len=1024, micro_batch_size=1, num_workers=3, sequence_parallel=2)


def test_plan_steps_takes_the_smallest_limit():
    layout = derive_layout(global_batch_tokens=8192, seq_len=1024, micro_batch_size=1, num_workers=2)
    assert plan_steps(layout, token_budget=81920).total == 10
    p = plan_steps(layout, token_budget=81920, max_steps=4)
    assert (p.total, p.limited_by) == (4, "max_steps")
    p = plan_steps(layout, token_budget=10**9, rows_available=50, epochs=2)
    assert (p.total, p.limited_by) == (12, "data")  # 25 rows per rank x 2 epochs / 4 rows per rank per step
    with pytest.raises(BatchLayoutError, match="no full optimizer step"):
        plan_steps(layout, rows_available=3)


def test_cosine_schedule_warmup_peak_and_floor():
    kw = dict(total_steps=100, peak=1e-5, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert cosine_lr(0, **kw) == pytest.approx(1e-6)
    assert cosine_lr(9, **kw) == pytest.approx(1e-5)
    assert cosine_lr(10, **kw) == pytest.approx(1e-5)
    assert cosine_lr(55, **kw) == pytest.approx(0.55e-5)  # halfway through the decay: midpoint of peak and floor
    assert cosine_lr(100, **kw) == pytest.approx(1e-6)
    lrs = [cosine_lr(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def _layout():
    return derive_layout(global_batch_tokens=8192, seq_len=1024, micro_batch_size=2, num_workers=2)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    cfg = build_deepspeed_config(TrainConfig(zero_stage=stage, grad_clip=0.7), _layout(), use_gpu=False)
    assert cfg["zero_optimization"]["stage"] == stage
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 2, 2)
    assert cfg["gradient_clipping"] == 0.7
    assert "bf16" not in cfg and "optimizer" not in cfg  # fp32 on CPU; our AdamW is the client optimizer
    assert build_deepspeed_config(TrainConfig(zero_stage=stage), _layout(), use_gpu=True)["bf16"] == {"enabled": True}


def test_offload_and_user_override(tmp_path):
    cfg = build_deepspeed_config(TrainConfig(zero_stage=3, offload_optimizer=True), _layout(), use_gpu=False)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        build_deepspeed_config(TrainConfig(zero_stage=0, offload_optimizer=True), _layout(), use_gpu=False)

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "communication_data_type": "fp32"}))
    merged = build_deepspeed_config(TrainConfig(), _layout(), use_gpu=False, user_override=load_user_deepspeed_json(str(path)))
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000
    assert merged["zero_optimization"]["stage"] == 2  # deep merge keeps our other keys
    assert merged["communication_data_type"] == "fp32"

    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        build_deepspeed_config(TrainConfig(), _layout(), use_gpu=False, user_override={"gradient_accumulation_steps": 8})
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_user_deepspeed_json(str(path))


@pytest.mark.parametrize("name,grad_accum,steps", [
    ("index-1.9b-32k-pt", 2, 2384), ("index-1.9b-32k-sft", 1, None), ("llama2-7b-80k-per-source", 6, 1271),
])
def test_paper_presets_have_the_papers_numbers_and_a_valid_layout(name, grad_accum, steps):
    from pathlib import Path

    from longctx.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "jobs" / "configs" / f"{name}.yaml")
    layout = derive_layout(global_batch_tokens=cfg.train.global_batch_tokens, seq_len=cfg.data.seq_len,
                           micro_batch_size=cfg.train.micro_batch_size, num_workers=cfg.train.num_workers)
    assert layout.grad_accum == grad_accum
    if steps:
        assert plan_steps(layout, token_budget=cfg.train.token_budget).total == steps
    paper = {
        "index-1.9b-32k-pt": dict(lr=1e-5, rope=3.2e5, seq=32768, batch=4 * 2**20, wd=0.1),
        "index-1.9b-32k-sft": dict(lr=5e-6, rope=None, seq=32768, batch=2**20, wd=0.1),
        "llama2-7b-80k-per-source": dict(lr=2e-5, rope=5e6, seq=81920, batch=3932160, wd=0.1),
    }[name]
    assert (cfg.train.lr, cfg.model.rope_theta, cfg.data.seq_len, cfg.train.global_batch_tokens, cfg.train.weight_decay) == (
        paper["lr"], paper["rope"], paper["seq"], paper["batch"], paper["wd"])
    assert cfg.train.grad_clip == 1.0 and cfg.model.path == "/path/to/your/model"
    if name == "index-1.9b-32k-sft":
        assert cfg.train.epochs == 2


def test_param_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.train.metrics import count_params

    for tie in (False, True):
        m = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie))
        n = count_params(m)
        assert n["total"] == sum(p.numel() for p in m.parameters())
        # input embeddings do no matmul work; a tied LM head does
        assert n["matmul"] == n["total"] - (0 if tie else 100 * 16)
