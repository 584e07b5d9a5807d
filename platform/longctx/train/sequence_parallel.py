"""Ulysses sequence parallelism (DeepSpeed ALST, `deepspeed.runtime.sequence_parallel.ulysses_sp`) that keeps
packed documents apart.

With `train.sequence_parallel = sp > 1`, each row is cut into sp contiguous shards, one per rank of a sequence-
parallel group. Inside every attention layer DeepSpeed's `UlyssesSPAttentionHF` all-to-alls q/k/v so each rank
holds the *whole* sequence for num_heads / sp heads, runs the core attention, and all-to-alls back; it also
all-gathers the position ids, so the core attention sees the full row's position ids.

NOTE: DeepSpeed's wrapper drops 4D attention masks (and for flex_attention rebuilds a plain causal BlockMask), so
with `sdpa` or `flex_attention` as the core packed documents would attend to each other (axolotl #3608 measured
1.83x loss from that). We register our own core attention, `longctx_document_attention`, which rebuilds the
per-document causal mask from the gathered position ids (SDPA with a boolean mask on CPU; a document BlockMask
with FlexAttention on GPU). flash_attention_2 needs nothing: its varlen path reads the gathered position ids.

    mpu = enable_ulysses(lm, sp, micro_batch_size, core="sdpa")   # before deepspeed.initialize(..., mpu=mpu)
    local = shard_for_rank(tensor, sp_rank, sp)                   # this rank's slice of [B, S] tensors

Loss: each rank sums the loss of its own shard's targets (targets are shifted on the whole row before sharding).
DeepSpeed sums gradients over the sequence-data-parallel group and divides by the data-parallel size only, so the
same scale as without SP (dp x grad_accum / valid tokens of the global batch) gives the exact global mean.
"""

from __future__ import annotations

import torch

from longctx.model.attention import document_block_mask, document_causal_mask, document_ids_from_position_ids

CORE_NAME = "longctx_document_attention"


def _document_attention(backend: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # deferred: heavy import, used only here

    def attention(module, query, key, value, attention_mask, **kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError("sequence-parallel document attention needs position_ids (restarting per document)")
        doc_ids = document_ids_from_position_ids(position_ids)
        if backend == "flex_attention":
            from transformers.integrations.flex_attention import flex_attention_forward  # deferred: heavy import, used only here

            return flex_attention_forward(module, query, key, value, document_block_mask(doc_ids), **kwargs)
        mask = document_causal_mask(doc_ids.to(query.device))
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    return attention


def enable_ulysses(lm, sequence_parallel: int, micro_batch_size: int, *, core: str = "sdpa", attention: str = "document"):
    """Register Ulysses SP for `lm` (already loaded) and return DeepSpeed's mpu for `deepspeed.initialize(mpu=)`.

    `core` is the backend the model was loaded with (sdpa, flex_attention or flash_attention_2). For document
    attention with sdpa/flex the core is swapped for our mask-rebuilding one.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF  # deferred: heavy import, used only here
    from transformers import AttentionInterface  # deferred: heavy import, used only here

    cfg = lm.config.get_text_config()
    for name, n in (("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads", cfg.num_key_value_heads)):
        if n % sequence_parallel and not (name == "num_key_value_heads" and sequence_parallel % n == 0):
            raise ValueError(f"train.sequence_parallel={sequence_parallel} does not divide the model's {name}={n}")
    core_name = core
    if attention == "document" and core in ("sdpa", "flex_attention", "eager"):
        core_name = CORE_NAME
        AttentionInterface.register(CORE_NAME, _document_attention("flex_attention" if core == "flex_attention" else "sdpa"))
        lm.set_attn_implementation(CORE_NAME)
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=lm,
        core_attn_implementation=core_name,
        sequence_parallel_size=sequence_parallel,
        micro_batch_size=micro_batch_size,
        seq_length_is_variable=True,
    )


def shard_for_rank(t: torch.Tensor, sp_rank: int, sequence_parallel: int) -> torch.Tensor:
    """This rank's contiguous slice of the sequence dimension (dim 1) of a [B, S, ...] tensor."""
    s = t.shape[1]
    if s % sequence_parallel:
        raise ValueError(f"seq_len={s} is not divisible by train.sequence_parallel={sequence_parallel}")
    chunk = s // sequence_parallel
    return t[:, sp_rank * chunk : (sp_rank + 1) * chunk].contiguous()
