"""The plan against measurement: the traced step (fake tensors, 3 of 6 layers, extrapolated) vs the same step run
for real on the CPU, its peak of allocated bytes taken from the CPU allocator's records (longctx.plan.measure).

3 row lengths x 2 attention backends x activation checkpointing on/off x tiled MLP on/off, plus activation offload,
each within 10%. The negative control shows the comparison is sensitive: without the extrapolation to all layers
the same trace misses by more than that."""

from __future__ import annotations

import itertools

import pytest
import torch

from longctx.config import TrainConfig
from longctx.plan.measure import measure_cpu_step
from longctx.plan.trace import StepShape, trace_step

LENGTHS = (128, 256, 512)
LAYERS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the measured CPU step is ~6x faster on a shared 2-core machine (same allocations)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(LENGTHS))


def _shape(cfg, seq_len, attn, **train):
    return StepShape(cfg, seq_len, 2, 1, attn, "document", torch.float32,
                     TrainConfig(loss_chunk_tokens=256, **train), gpu_kernels=False)


@pytest.mark.parametrize("seq_len,attn,ckpt,tiled", list(itertools.product(LENGTHS, ("sdpa", "eager"),
                                                                           (False, True), (False, True))))
def test_plan_within_10_percent_of_the_measured_cpu_peak(hf_config, seq_len, attn, ckpt, tiled):
    shape = _shape(hf_config, seq_len, attn, activation_checkpointing=ckpt, tiled_mlp=tiled)
    planned, measured = trace_step(shape), measure_cpu_step(shape)
    assert planned.layers_traced == 3 and planned.num_layers == LAYERS
    assert planned.peak == pytest.approx(measured, rel=0.10), (planned.peak, measured)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_activation_offload_planned_within_10_percent(hf_config, attn):
    # On the CPU the offloaded copies live in the same memory: compare device and host bytes together.
    shape = _shape(hf_config, 512, attn, activation_checkpointing=True, activation_offload=True)
    planned, measured = trace_step(shape), measure_cpu_step(shape)
    assert planned.host == pytest.approx(LAYERS * 2 * 512 * 128 * 4, rel=0.01)  # every layer input, fp32
    assert planned.peak_with_host == pytest.approx(measured, rel=0.10), (planned.peak_with_host, measured)


def test_negative_control_without_layer_extrapolation_the_plan_misses(hf_config):
    shape = _shape(hf_config, 512, "sdpa")
    planned, measured = trace_step(shape), measure_cpu_step(shape)
    three_layers_only = planned.peak - (LAYERS - planned.layers_traced) * planned.per_layer
    assert abs(three_layers_only / measured - 1) > 0.10
    assert planned.peak == pytest.approx(measured, rel=0.10)
