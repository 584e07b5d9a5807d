"""Tiny randomly initialised Llama models saved like real checkpoints, for tests and smoke runs.

    path = save_tiny_llama(tmp_path / "m", tokenizer_uri="builtin:tiny-tokenizer")

The model is a real `LlamaForCausalLM` (safetensors + config + tokenizer files), so it loads through
`longctx.model.load.load_causal_lm` exactly like a user's model; it just knows nothing.
"""

from __future__ import annotations

import os

from longctx import storage


def save_tiny_llama(
    path: str | os.PathLike,
    tokenizer_uri: str = "builtin:tiny-tokenizer",
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
    rope_theta: float = 10000.0,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> str:
    """Write a random tiny Llama with the given tokenizer to `path`; returns the path.

    A larger `initializer_range` (e.g. 0.5) makes attention scores, and so RoPE changes, visible in the outputs.
    """
    import torch  # deferred: heavy import, used only here
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: heavy import, used only here

    from longctx.model.load import load_tokenizer  # deferred: pulls in torch, used only here

    tok = load_tokenizer(tokenizer_uri)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    path = storage.normalize(str(path))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
