"""RoPE changes take effect: the base lower bound of Liu et al. 2023, rotary frequencies that really move with
rope_theta and every scaling type, and a saved model whose config reloads with the new rope_parameters."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.config import RopeScalingConfig
from longctx.model.load import load_causal_lm
from longctx.model.rope import rotary_inv_freq, suggest_rope_base
from train_helpers import make_tiny_model


def test_suggest_rope_base_matches_paper_example():
    # d=128, trained at 4K, target 32K: critical dimension 92, base >= ~1.5e5 (Index's 3.2e5 holds).
    s = suggest_rope_base(128, 4096, 32768)
    assert s["critical_dim"] == 92
    assert s["base_lower_bound"] == pytest.approx(1.485e5, rel=0.01)
    assert suggest_rope_base(128, 4096, 131072)["base_lower_bound"] > s["base_lower_bound"]
    with pytest.raises(ValueError, match="even"):
        suggest_rope_base(127, 4096, 32768)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("rope") / "m"), hidden=64, max_pos=64, vocab=128)


def test_rope_theta_changes_rotary_frequencies(model_dir):
    base = rotary_inv_freq(load_causal_lm(model_dir))
    moved = rotary_inv_freq(load_causal_lm(model_dir, rope_theta=1e6))
    head_dim = 16
    expected = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    assert torch.allclose(moved, expected, rtol=1e-5)
    assert torch.allclose(base, 1.0 / (1e4 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), rtol=1e-5)
    assert moved[-1] < base[-1] / 5  # the slowest dimension rotates much more slowly


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_scaling_types_change_frequencies(model_dir, kind):
    base = rotary_inv_freq(load_causal_lm(model_dir))
    model = load_causal_lm(model_dir, scaling=RopeScalingConfig(type=kind, factor=4.0), max_position_embeddings=256)
    scaled = rotary_inv_freq(model)
    assert model.config.rope_parameters["rope_type"] == kind
    if kind == "linear":  # position interpolation divides every frequency by the factor
        assert torch.allclose(scaled, base / 4.0, rtol=1e-5)
    else:  # YaRN / llama3 keep the fastest dimensions and slow down the slowest ones
        assert torch.allclose(scaled[0], base[0], rtol=1e-3)
        assert scaled[-1] < base[-1] * 0.5


def test_dynamic_ntk_grows_base_beyond_trained_length(model_dir):
    model = load_causal_lm(model_dir, scaling=RopeScalingConfig(type="dynamic", factor=4.0))
    rotary = next(m for m in model.modules() if "Rotary" in type(m).__name__)
    x = torch.zeros(1, 1, 8)
    short = rotary(x, torch.arange(32)[None])[0]
    long_pos = torch.arange(256)[None]
    long = rotary(torch.zeros(1, 256, 8), long_pos)[0]
    # Within the trained length frequencies are unchanged; past it dynamic NTK lowers them (cos differs).
    assert torch.allclose(short[0, :32], load_causal_lm(model_dir).model.rotary_emb(x, torch.arange(32)[None])[0][0], atol=1e-6)
    plain = load_causal_lm(model_dir).model.rotary_emb(torch.zeros(1, 256, 8), long_pos)[0]
    assert (long - plain).abs().max().item() > 1e-3


def test_saved_model_reloads_with_new_rope_parameters(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(model_dir, rope_theta=3.2e5, max_position_embeddings=512)
    model.save_pretrained(tmp_path / "out", safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert again.config.rope_parameters["rope_theta"] == 3.2e5
    assert again.config.max_position_embeddings == 512
    assert torch.allclose(rotary_inv_freq(again), rotary_inv_freq(model))
    assert not math.isclose(float(rotary_inv_freq(again)[-1]), float(rotary_inv_freq(load_causal_lm(model_dir))[-1]))
