"""FLOP counting (longctx.train.metrics) checked against torch's own FlopCounterMode, and the GPU peak lookup.

The attention term must use num_attention_heads x head_dim: in Qwen3-like models that is twice the hidden size,
and a formula with hidden_size undercounts attention 2x (the negative control below shows the gap is caught).
"""

from __future__ import annotations

import pytest
import torch

from longctx.train.metrics import ATTENTION_CONVENTIONS, attention_width, count_params, model_step_flops, step_flops

SEQ = 1024


def _qwen3_like():
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def _counted_step_flops(lm) -> int:
    """FlopCounterMode's count of one forward + backward over one SEQ-token document (full logits, plain loss)."""
    from torch.utils.flop_counter import FlopCounterMode

    from longctx.train.loss import reference_lm_loss, shift_targets

    ids = torch.randint(0, lm.config.vocab_size, (1, SEQ))
    with FlopCounterMode(display=False) as counter:
        logits = lm(input_ids=ids, position_ids=torch.arange(SEQ)[None], use_cache=False).logits
        loss, n = reference_lm_loss(logits, shift_targets(ids))
        (loss / n).backward()
    return counter.get_total_flops()


def test_step_flops_match_flop_counter_mode_with_head_dim_not_hidden_size():
    lm = _qwen3_like()
    assert attention_width(lm.config) == 128 == 2 * lm.config.hidden_size
    counted = _counted_step_flops(lm)
    n = count_params(lm)
    ours = model_step_flops(lm.config, matmul_params=n["matmul"], tokens=SEQ, sum_sq_doc_lengths=SEQ * SEQ)
    # FlopCounterMode counts every matmul, including the masked half of QK^T: the full-square convention.
    # (6*N*T counts the norm weights too: 0.3% here.)
    assert ours["full_square"] == pytest.approx(counted, rel=5e-3)
    attention = 12 * 2 * 128 * SEQ * SEQ
    assert ours["full_square"] - ours["causal"] == pytest.approx(attention / 2)
    # Negative control: the attention term from hidden_size (the old formula) misses by far more than the tolerance.
    old = 6.0 * n["matmul"] * SEQ + 12.0 * 2 * lm.config.hidden_size * SEQ * SEQ
    assert abs(old - counted) / counted > 0.3


def test_step_flops_conventions_and_document_lengths():
    args = dict(matmul_params=10**9, tokens=32768, num_layers=16, attention_dim=2048)
    one = step_flops(**args, sum_sq_doc_lengths=32768**2)
    many = step_flops(**args, sum_sq_doc_lengths=32 * 1024**2)
    assert many == pytest.approx(6e9 * 32768 + 6 * 16 * 2048 * 32 * 1024**2)
    assert (one - 6e9 * 32768) == pytest.approx(32 * (many - 6e9 * 32768))  # one 32K doc = 32x the attention
    full = step_flops(**args, sum_sq_doc_lengths=32768**2, convention="full_square")
    assert full - 6e9 * 32768 == pytest.approx(2 * (one - 6e9 * 32768))
    assert set(ATTENTION_CONVENTIONS) == {"causal", "full_square"}
    with pytest.raises(ValueError, match="convention"):
        step_flops(**args, sum_sq_doc_lengths=1, convention="megatron")


def test_gpu_peaks_are_looked_up_by_exact_device_name():
    from longctx.train.gpus import PLAN_KINDS, gpu_by_kind, gpu_by_name

    peak = {name: (gpu_by_name(name).peak_bf16_flops if gpu_by_name(name) else None) for name in (
        "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL",
        "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA L40S", "NVIDIA L40", "NVIDIA L4",
        "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA A10G")}
    assert peak["NVIDIA H100 80GB HBM3"] == peak["NVIDIA H200"] == 989e12
    assert peak["NVIDIA H100 PCIe"] == 756e12 and peak["NVIDIA H100 NVL"] == peak["NVIDIA H200 NVL"] == 835e12
    assert peak["NVIDIA A100-SXM4-40GB"] == peak["NVIDIA A100 80GB PCIe"] == 312e12
    assert (peak["NVIDIA L40S"], peak["NVIDIA L40"], peak["NVIDIA L4"]) == (362e12, 181e12, 121e12)
    assert peak["NVIDIA H100 80GB HBM3 MIG 1g.10gb"] is None and peak["NVIDIA A10G"] is None
    for kind in PLAN_KINDS:  # every kind `longctx plan --gpu` accepts has a memory size
        assert gpu_by_kind(kind).memory_gib > 30
    with pytest.raises(ValueError, match="known: h100"):
        gpu_by_kind("v100")
