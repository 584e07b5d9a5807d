"""ALST's memory savers give the same loss and gradients as the plain step (fp32 on CPU), through the same
`prepare_for_training` the training loop and the planner call. ZeRO-3 parameter offload runs through the real
Ray Train + DeepSpeed path in tests/test_train_zero3.py (together with the two savers here)."""

from __future__ import annotations

import pytest
import torch

from longctx.config import TrainConfig
from longctx.model.attention import attention_inputs, document_ids_from_position_ids
from longctx.train.loss import shift_targets
from longctx.train.memory_savers import ALLOC_CONF, EXPANDABLE, mlp_tiles, prepare_for_training, worker_env

SEQ, HIDDEN = 256, 32


def _lm():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, SEQ), generator=g)
    lengths = [[100, 156], [40, 90, 126]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    doc_ids = document_ids_from_position_ids(pos)
    return ids, shift_targets(ids, doc_ids), attention_inputs(pos, attn_implementation="sdpa", doc_ids=doc_ids)


def _step(**savers):
    """(loss, {param name: grad}, the wrapped model) of one forward + backward with these TrainConfig keys."""
    lm = _lm()
    wrapped = prepare_for_training(lm, TrainConfig(loss_chunk_tokens=100, **savers), use_gpu=False).train()
    ids, tgt, kwargs = _batch()
    loss_sum, n = wrapped(ids, tgt, **kwargs)
    (loss_sum / n).backward()
    return float(loss_sum.detach() / n), {k: p.grad.clone() for k, p in lm.named_parameters()}, wrapped


def _graph_nodes(loss) -> set[str]:
    seen, todo, names = set(), [loss.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo += [g for g, _ in f.next_functions]
    return names


@pytest.fixture(scope="module")
def plain():
    loss, grads, _ = _step()
    return loss, grads


def _assert_same(plain, loss, grads):
    ref_loss, ref_grads = plain
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    worst = max(float((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp_min(1e-12))
                for k in ref_grads)
    assert worst < 1e-5, f"gradients differ from the plain step by {worst:.2e} (relative to each tensor's max)"


def test_tiled_mlp_same_loss_and_gradients(plain):
    assert mlp_tiles(SEQ, HIDDEN) == 8
    loss, grads, wrapped = _step(tiled_mlp=True)
    _assert_same(plain, loss, grads)
    ids, tgt, kwargs = _batch()
    assert "TiledMLPBackward" in _graph_nodes(wrapped(ids, tgt, **kwargs)[0])  # the tiles really ran


def test_activation_offload_same_loss_and_gradients_and_moves_every_layer_input(plain, monkeypatch):
    from longctx.model import checkpointing

    packed = []
    real_copy = checkpointing.host_copy

    def recording_copy(t, host, pin_memory):
        packed.append((tuple(t.shape), host))
        return real_copy(t, host, pin_memory)

    monkeypatch.setattr(checkpointing, "host_copy", recording_copy)
    loss, grads, _ = _step(activation_checkpointing=True, activation_offload=True)
    monkeypatch.undo()
    _assert_same(plain, loss, grads)
    assert packed == [((2, SEQ, HIDDEN), "cpu")] * 3  # one [batch, seq, hidden] input per decoder layer, nothing else


def test_all_savers_together_same_loss_and_gradients(plain):
    loss, grads, _ = _step(activation_checkpointing=True, activation_offload=True, tiled_mlp=True)
    _assert_same(plain, loss, grads)
    with pytest.raises(AssertionError, match="gradients differ"):  # negative control: 0.1% off is caught
        _assert_same(plain, loss, {k: g * 1.001 for k, g in grads.items()})


def test_savers_need_their_prerequisites_and_gpu_workers_get_expandable_segments(monkeypatch):
    from longctx.config import ConfigError, load_config
    from longctx.train.deepspeed import build_deepspeed_config
    from longctx.train.schedule import derive_layout

    with pytest.raises(ConfigError, match="activation_checkpointing=true"):
        load_config(None, ["train.activation_offload=true"])
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(None, ["train.offload_params=true"])
    cfg = load_config(None, ["train.zero_stage=3", "train.offload_params=true", "train.use_gpu=true"])
    layout = derive_layout(global_batch_tokens=8192, seq_len=1024, micro_batch_size=1, num_workers=2)
    zero = build_deepspeed_config(cfg.train, layout, use_gpu=True)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    monkeypatch.delenv(ALLOC_CONF, raising=False)
    assert worker_env(cfg.train) == {ALLOC_CONF: EXPANDABLE}
    monkeypatch.setenv(ALLOC_CONF, "max_split_size_mb:512")  # the user's own setting wins
    assert worker_env(cfg.train) == {ALLOC_CONF: "max_split_size_mb:512"}
    assert worker_env(load_config(None, []).train) == {}  # CPU workers: nothing
