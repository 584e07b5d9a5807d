"""The GPU attention kernels, represented by their documented memory while a plan is traced on the CPU.

Planning runs on fake tensors on the CPU, where the CUDA kernels do not exist (flash-attn is not even installed,
FlexAttention needs Triton). Everything *around* the kernel still runs for real: transformers' attention code
(its `repeat_kv` copies, transposes and the flash path's varlen copies), our masks (`document_causal_mask`,
`document_block_mask`) and DeepSpeed's Ulysses all-to-alls. Only the kernel call is replaced by a stand-in that
allocates what the kernel allocates and keeps what its autograd node saves:

| backend | forward keeps for backward | backward allocates | source |
|---|---|---|---|
| flash_attention_2 | q, k, v (varlen copies [tokens, heads, dim]), out, softmax_lse fp32 [heads, tokens] | dq; dk, dv expanded to the query heads when GQA; dq_accum fp32; softmax_d fp32 [heads, tokens] | flash-attn 2 `mha_varlen_fwd/bwd` (csrc/flash_attn/flash_api.cpp) |
| flex_attention (CUDA) | q, k, v, out, logsumexp fp32 [B, heads, S] | dq, dk, dv, delta fp32 [B, heads, S] | torch `flex_attention` HOP (its autograd saves q, k, v, out, logsumexp) |
| sdpa (CUDA) | q, k, v, out, logsumexp fp32; a boolean mask converted to a float bias [B, 1, S, S] in q's dtype | dq, dk, dv, delta fp32, a fp32 dq accumulator | aten `scaled_dot_product_attention` -> `_scaled_dot_product_efficient_attention` (derivatives.yaml saves attn_bias); flash when there is no mask |

All of these are O(S) per head except the converted SDPA mask (O(S^2)): that is why sdpa with
data.attention=document does not scale on GPUs and flash_attention_2 / flex_attention do. The FLOPs of the
kernels are not counted by FlopCounterMode here; the plan's FLOPs come from `longctx.train.metrics`.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.integrations import flex_attention as hf_flex
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_LSE = torch.float32


class _KernelStandIn(torch.autograd.Function):
    """Allocates what an attention kernel allocates: output (+ saved inputs and log-sum-exp) in forward; the
    input gradients and the kernel's fp32 scratch in backward. Values are meaningless (fake tensors)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, out_shape, lse_shape, grad_k_shape):
        out = q.new_empty(out_shape)
        lse = q.new_empty(lse_shape, dtype=_LSE)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.grad_k_shape = grad_k_shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, bias = ctx.saved_tensors
        dq = torch.empty_like(q)
        scratch = [q.new_empty(q.shape, dtype=_LSE), torch.empty_like(lse)]  # dq accumulator, softmax_d / delta
        if ctx.grad_k_shape is not None and tuple(ctx.grad_k_shape) != tuple(k.shape):
            scratch += [k.new_empty(ctx.grad_k_shape), v.new_empty(ctx.grad_k_shape)]  # GQA: expanded dk, dv
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        del scratch  # alive until here: part of the backward's peak
        return dq, dk, dv, None, None, None, None


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    bias = None
    if attn_mask is not None:
        # NOTE: a boolean mask is converted to an additive one in q's dtype, which the efficient kernel saves
        bias = query.new_empty(attn_mask.shape) if attn_mask.dtype == torch.bool else attn_mask
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    b, h, s = query.shape[0], query.shape[1], query.shape[2]
    return _KernelStandIn.apply(query, key, value, bias, query.shape, (b, h, s), None)


def _flex(query, key, value, training=False, **kwargs):
    b, h, s = query.shape[0], query.shape[1], query.shape[2]
    return _KernelStandIn.apply(query, key, value, None, query.shape, (b, h, s), None)


def _flash_attention_2(module, query, key, value, attention_mask, **kwargs):
    """transformers' flash_attention_2 path: [B, heads, S, D] -> varlen copies [B*S, heads, D] -> kernel ->
    [B, S, heads, D]."""
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * s, hq, d)
    k = key.transpose(1, 2).reshape(b * s, hkv, d)
    v = value.transpose(1, 2).reshape(b * s, hkv, d)
    out = _KernelStandIn.apply(q, k, v, None, q.shape, (hq, b * s), (b * s, hq, d))
    return out.reshape(b, s, hq, d), None


@contextlib.contextmanager
def gpu_attention_kernels():
    """While active: F.scaled_dot_product_attention, transformers' FlexAttention call and its flash_attention_2
    function are the stand-ins above (restored on exit)."""
    saved = (ALL_ATTENTION_FUNCTIONS["flash_attention_2"], hf_flex.compile_friendly_flex_attention,
             torch.nn.functional.scaled_dot_product_attention)
    # NOTE: module attributes, not a TorchFunctionMode: a mode is switched off while it handles a call, and the
    # backward (with its checkpoint recomputes) is such a call.
    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = _flash_attention_2
    hf_flex.compile_friendly_flex_attention = _flex
    torch.nn.functional.scaled_dot_product_attention = _sdpa
    try:
        yield
    finally:
        (ALL_ATTENTION_FUNCTIONS["flash_attention_2"], hf_flex.compile_friendly_flex_attention,
         torch.nn.functional.scaled_dot_product_attention) = saved
