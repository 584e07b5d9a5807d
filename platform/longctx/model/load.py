"""Load a Hugging Face causal LM and tokenizer from a local folder, `builtin:` asset or s3:// prefix.

Safety defaults: safetensors weights only (pickle-based `.bin` needs `allow_pickle=True`), and
`trust_remote_code` off unless the user turns it on. RoPE changes are applied to the config before the
model is built (see `longctx.model.rope`).
"""

from __future__ import annotations

import glob
import logging
import os

import torch

from longctx import storage
from longctx.model.rope import apply_rope_changes

log = logging.getLogger(__name__)


def local_model_dir(uri: str) -> str:
    """A local folder holding the model/tokenizer at `uri` (S3 prefixes are downloaded to a cache once)."""
    return storage.local_dir(uri)


def check_weight_format(model_dir: str, allow_pickle: bool) -> None:
    """Refuse pickle-based weights unless allowed (pickle from untrusted storage runs code)."""
    safetensors = glob.glob(os.path.join(model_dir, "*.safetensors"))
    pickled = [p for p in glob.glob(os.path.join(model_dir, "*.bin")) + glob.glob(os.path.join(model_dir, "*.pt"))
               if not os.path.basename(p).startswith("training_args")]
    if safetensors:
        return
    if pickled and not allow_pickle:
        raise ValueError(
            f"{model_dir}: only pickle-based weights ({os.path.basename(pickled[0])}); loading them can run code. "
            "Convert to safetensors, or set model.allow_pickle=true if you trust the source."
        )
    if not pickled:
        raise ValueError(f"{model_dir}: no model weights (*.safetensors) found")


def pick_dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_attn_implementation(requested: str, device: torch.device | str) -> str:
    """`auto`: flash_attention_2 on GPU when installed, else flex_attention on GPU, else sdpa."""
    if requested != "auto":
        return requested
    if str(device).startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "flex_attention"
    return "sdpa"


def load_config_with_rope(model_uri: str, model_cfg=None, *, trust_remote_code: bool = False, **rope_kwargs):
    """The model's HF config with RoPE changes from a `ModelConfig` (or explicit keyword overrides)."""
    from transformers import AutoConfig  # deferred: heavy import, used only here

    model_dir = local_model_dir(model_uri)
    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    theta = rope_kwargs.get("rope_theta", getattr(model_cfg, "rope_theta", None))
    scaling = rope_kwargs.get("scaling", getattr(model_cfg, "rope_scaling", None))
    max_pos = rope_kwargs.get("max_position_embeddings", getattr(model_cfg, "max_position_embeddings", None))
    if theta is not None or scaling is not None or max_pos is not None:
        params = apply_rope_changes(hf_config, rope_theta=theta, scaling=scaling, max_position_embeddings=max_pos)
        log.info("RoPE for %s: %s (max_position_embeddings=%s)", model_uri, params, hf_config.max_position_embeddings)
    return hf_config


def load_causal_lm(
    model_uri: str,
    model_cfg=None,
    *,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    dtype: str | None = None,
    **rope_kwargs,
):
    """Load a causal LM with the RoPE/attention/dtype choices of `model_cfg` (a `longctx.config.ModelConfig`).

    Keyword overrides (`rope_theta=`, `scaling=`, `max_position_embeddings=`) take precedence over model_cfg,
    which is how evaluation builds its training-free baselines from the same base model.
    """
    from transformers import AutoModelForCausalLM  # deferred: heavy import, used only here

    trust = bool(getattr(model_cfg, "trust_remote_code", False))
    allow_pickle = bool(getattr(model_cfg, "allow_pickle", False))
    model_dir = local_model_dir(model_uri)
    check_weight_format(model_dir, allow_pickle)
    hf_config = load_config_with_rope(model_uri, model_cfg, trust_remote_code=trust, **rope_kwargs)
    attn = pick_attn_implementation(attn_implementation or getattr(model_cfg, "attn_implementation", "auto"), device)
    torch_dtype = pick_dtype(dtype or getattr(model_cfg, "dtype", "auto"), device)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        config=hf_config,
        dtype=torch_dtype,
        attn_implementation=attn,
        trust_remote_code=trust,
        use_safetensors=not allow_pickle,
    )
    return model.to(device)


def load_tokenizer(uri: str, *, trust_remote_code: bool = False):
    """A Hugging Face fast tokenizer from a local folder, `builtin:` asset or s3:// prefix."""
    from transformers import AutoTokenizer  # deferred: heavy import, used only here

    tok = AutoTokenizer.from_pretrained(local_model_dir(uri), use_fast=True, trust_remote_code=trust_remote_code)
    if not tok.is_fast:
        raise ValueError(f"{uri}: tokenizer is not a fast (Rust) tokenizer; longctx needs one for throughput")
    return tok
