"""Activation checkpointing of every decoder layer, optionally with the checkpointed inputs kept in host memory.

    enable_activation_checkpointing(lm)                       # recompute each layer in backward (hidden states kept)
    enable_activation_checkpointing(lm, offload=True)         # ... and the kept hidden states live in CPU memory

With checkpointing, what a layer keeps for backward is its input: one [batch, seq, hidden] tensor per layer. At
long rows that is what is left on the device (32 layers x 1M tokens x 4096 x 2 bytes = 256 GiB for an 8B model),
so ALST (arXiv 2506.13996) moves these checkpointed inputs to host memory after the forward of each layer and
brings each back just before its recompute: `offload=True`.

How: torch's non-reentrant checkpoint saves a layer's inputs as saved tensors *before* it installs its own hooks,
so saved-tensor hooks around the `checkpoint` call see exactly those inputs (and nothing inside the layer). Ours
copy each into a fresh host tensor (pinned on GPU) and copy it back in backward, like
`torch.autograd.graph.save_on_cpu`, except that the host device is a parameter: the planner (`longctx.plan`)
traces the same code with host="meta", which is how it tells offloaded bytes from device bytes.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def host_copy(t: torch.Tensor, host: str, pin_memory: bool) -> torch.Tensor:
    """A copy of `t` in `host` memory (what the offload keeps of each checkpointed layer input)."""
    copy = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, device=host, pin_memory=pin_memory and host == "cpu")
    return copy.copy_(t)


def _offloaded_checkpoint(function, *args, host: str, pin_memory: bool, **kwargs):
    def pack(t: torch.Tensor):
        return t.device, host_copy(t, host, pin_memory)

    def unpack(packed):
        device, copy = packed
        return copy.to(device, non_blocking=pin_memory)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return checkpoint(function, *args, **kwargs)


def enable_activation_checkpointing(lm, *, offload: bool = False, host: str = "cpu", pin_memory: bool = False) -> int:
    """Checkpoint every decoder layer of a HF model (non-reentrant); with `offload`, keep the checkpointed layer
    inputs in `host` memory (`pin_memory` on GPU runs). Returns the number of layers whose inputs are offloaded."""
    enable = getattr(lm, "activation_checkpointing_enable", None)  # transformers >= 5.x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not offload:
        return 0
    fn = functools.partial(_offloaded_checkpoint, host=host, pin_memory=pin_memory, use_reentrant=False)
    layers = 0
    for module in lm.modules():
        # NOTE: transformers calls `module._gradient_checkpointing_func` for each layer with checkpointing on
        # (just set to torch's checkpoint above); ours replaces it.
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = fn
            layers += 1
    return layers
