"""The optimizer: AdamW with weight decay on matrices only (biases and norm weights, 1-D tensors, get none).

    optimizer = adamw(model, lr=2e-5, weight_decay=0.1, betas=(0.9, 0.95))

One definition for the training loop (`longctx.train.loop`, DeepSpeed takes it as a client optimizer), the
plain-PyTorch reference the tests compare against, and the build of the shipped sample model
(`scripts/build_sample_assets.py`). The learning-rate schedule is `longctx.train.schedule.cosine_lr`.
"""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: `weight_decay` on every trainable parameter with 2+ dimensions, none on the 1-D ones (biases,
    norm weights). Parameters in `named_parameters()` order (a tied weight once)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas, eps: float = 1e-8) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups(model, weight_decay)`."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
