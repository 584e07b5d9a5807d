"""ALST's memory savers (Arctic Long Sequence Training, arXiv 2506.13996) as config keys, and the one function
that prepares a loaded model for training with them: the training loop and the planner (`longctx.plan`) both call
`prepare_for_training`, so what is planned is what runs.

    wrapped = prepare_for_training(lm, cfg.train, use_gpu=True)   # -> CausalLMWithChunkedLoss

| key | what it does | memory it saves (per GPU) |
|---|---|---|
| `train.activation_checkpointing` | recompute each decoder layer in backward | all activations but each layer's input |
| `train.activation_offload` | those layer inputs live in CPU memory (longctx.model.checkpointing) | L x tokens x hidden x 2 B |
| `train.tiled_mlp` | each MLP runs over ~hidden_size-token tiles in forward and backward (DeepSpeed `TiledMLP`, recomputing each tile) | the [tokens, intermediate] temporaries: ~tokens/hidden x |
| `train.offload_params` | ZeRO-3 parameter offload to CPU (longctx.train.deepspeed) | the bf16 parameter partition |
| (always on GPU) | `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` in the workers' environment | allocator fragmentation |

The chunked loss (`train.loss_chunk_tokens`, longctx.train.loss) plays the part of ALST's tiled logits + loss.
Each saver gives the same loss and gradients as the plain step (tests/test_memory_savers.py).
"""

from __future__ import annotations

import math
import os
import types

from torch import nn

from longctx.model.checkpointing import enable_activation_checkpointing
from longctx.train.loss import CausalLMWithChunkedLoss

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE = "expandable_segments:True"


def mlp_tiles(tokens: int, hidden_size: int) -> int:
    """Tiles of a tiled MLP over `tokens` positions: ALST's ceil(tokens / hidden_size), so each tile's
    [tile, intermediate] temporaries are about the size of one [hidden, intermediate] weight."""
    return max(1, math.ceil(tokens / hidden_size))


def _tiled_mlp_forward(mlp, x):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP  # deferred: DeepSpeed is heavy to import

    tiles = mlp_tiles(x.shape[-2], x.shape[-1])
    plain = type(mlp).forward
    if tiles == 1:
        return plain(mlp, x)
    # compute_params: under ZeRO the gradients of these weights are handed over after the last tile only
    return TiledMLP.apply(plain, mlp, x, tiles, list(mlp.parameters()))


def enable_tiled_mlp(lm) -> int:
    """Run the MLP of every decoder layer tiled along the sequence (DeepSpeed's TiledMLP); returns how many."""
    n = 0
    for module in lm.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Module) and hasattr(module, "self_attn"):  # a decoder layer's MLP
            mlp.forward = types.MethodType(_tiled_mlp_forward, mlp)
            n += 1
    if n == 0:
        raise ValueError(f"train.tiled_mlp: {type(lm).__name__} has no decoder layers with an `mlp` module")
    return n


def prepare_for_training(lm, tcfg, *, use_gpu: bool, offload_host: str = "cpu") -> CausalLMWithChunkedLoss:
    """Activation checkpointing (+ offload) and tiled MLP as `tcfg` (a `TrainConfig`) says; the chunked-loss
    wrapper DeepSpeed trains. `offload_host`: where offloaded activations go ("meta" when planning)."""
    if tcfg.activation_checkpointing:
        enable_activation_checkpointing(lm, offload=tcfg.activation_offload, host=offload_host,
                                        pin_memory=use_gpu and offload_host == "cpu")
    if tcfg.tiled_mlp:
        enable_tiled_mlp(lm)
    lm.config.use_cache = False
    return CausalLMWithChunkedLoss(lm, chunk_tokens=tcfg.loss_chunk_tokens)


def worker_env(tcfg) -> dict[str, str]:
    """Environment of the training workers: on GPU, the CUDA caching allocator with expandable segments (less
    fragmentation at long rows, as ALST runs). A value the driver already has is kept."""
    if not tcfg.use_gpu:
        return {}
    return {ALLOC_CONF: os.environ.get(ALLOC_CONF) or EXPANDABLE}
