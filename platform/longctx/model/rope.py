"""RoPE changes: a new base (rope_theta), or scaling (linear/PI, dynamic NTK, YaRN, llama3), and the base
lower bound of Liu et al. 2023 (arXiv 2310.05209).

NOTE: transformers 5 keeps RoPE settings in `config.rope_parameters` ({"rope_type", "rope_theta", "factor",
...}); assigning `config.rope_theta` after construction silently changes nothing. Everything here edits
`rope_parameters` before the model is built, and `rotary_inv_freq` lets tests check the frequencies moved.
"""

from __future__ import annotations

import math
from typing import Any

HF_ROPE_TYPE = {"linear": "linear", "pi": "linear", "dynamic": "dynamic", "dynamic_ntk": "dynamic", "yarn": "yarn", "llama3": "llama3"}


def current_rope_parameters(hf_config) -> dict[str, Any]:
    """The model config's RoPE parameters as a plain dict (transformers 5 layout)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        theta = getattr(hf_config, "rope_theta", 10000.0)
        params = {"rope_type": "default", "rope_theta": float(theta)}
    params = dict(params)
    params.setdefault("rope_type", "default")
    return params


def build_rope_parameters(
    base: dict[str, Any],
    *,
    rope_theta: float | None = None,
    scaling_type: str | None = None,
    factor: float | None = None,
    original_max_position_embeddings: int | None = None,
    extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    """New rope_parameters from the current ones plus a new base and/or a scaling method."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(base.get("rope_theta", 10000.0))}
    if base.get("rope_type", "default") != "default":
        params = dict(base)
    if rope_theta is not None:
        params["rope_theta"] = float(rope_theta)
    if scaling_type is not None:
        if scaling_type not in HF_ROPE_TYPE:
            raise ValueError(f"unknown RoPE scaling {scaling_type!r}; allowed: {sorted(HF_ROPE_TYPE)}")
        if factor is None or factor <= 0:
            raise ValueError(f"RoPE scaling {scaling_type!r} needs a positive factor, got {factor!r}")
        params = {"rope_type": HF_ROPE_TYPE[scaling_type], "rope_theta": params["rope_theta"], "factor": float(factor)}
        if original_max_position_embeddings:
            params["original_max_position_embeddings"] = int(original_max_position_embeddings)
        if params["rope_type"] == "llama3":
            params.setdefault("low_freq_factor", 1.0)
            params.setdefault("high_freq_factor", 4.0)
        params.update(extra or {})
    return params


def apply_rope_changes(
    hf_config,
    *,
    rope_theta: float | None = None,
    scaling=None,
    max_position_embeddings: int | None = None,
) -> dict[str, Any]:
    """Edit a (not yet instantiated) HF config in place: new base and/or scaling and context length.

    `scaling` is a `longctx.config.RopeScalingConfig` (or None). Returns the new rope_parameters. The
    original training length is recorded for methods that need it (YaRN, llama3, dynamic NTK).
    """
    base = current_rope_parameters(hf_config)
    orig_len = getattr(hf_config, "max_position_embeddings", None)
    params = build_rope_parameters(
        base,
        rope_theta=rope_theta,
        scaling_type=getattr(scaling, "type", None),
        factor=getattr(scaling, "factor", None),
        original_max_position_embeddings=getattr(scaling, "original_max_position_embeddings", None) or orig_len,
        extra=getattr(scaling, "extra", None),
    )
    hf_config.rope_parameters = params
    if max_position_embeddings is not None:
        hf_config.max_position_embeddings = int(max_position_embeddings)
    return params


def rotary_inv_freq(model):
    """The inverse frequencies the model's rotary embedding actually uses (to check a change took)."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and "Rotary" in type(module).__name__:
            return module.inv_freq.detach().clone()
    raise ValueError(f"{type(model).__name__} has no rotary embedding module")


def suggest_rope_base(head_dim: int, train_len: int, target_len: int) -> dict[str, float]:
    """Lower bound on the RoPE base for a target context (Liu et al. 2023, arXiv 2310.05209).

    Critical dimension d_c = 2 * ceil((d/2) * log_10000(T_train / 2pi)); base >= (T_target / 2pi)^(d / d_c).
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if train_len <= 2 * math.pi or target_len <= 2 * math.pi:
        raise ValueError(f"lengths must exceed 2*pi tokens, got train_len={train_len}, target_len={target_len}")
    d_c = 2 * math.ceil((head_dim / 2) * math.log(train_len / (2 * math.pi), 10000))
    d_c = max(2, min(head_dim, d_c))
    bound = (target_len / (2 * math.pi)) ** (head_dim / d_c)
    return {"head_dim": head_dim, "train_len": train_len, "target_len": target_len, "critical_dim": d_c, "base_lower_bound": bound}
