"""Trace one micro-batch of the project's own training step on fake tensors and measure its memory.

    t = trace_step(StepShape(hf_config, seq_len=131072, sequence_parallel=8, attn_implementation="flex_attention",
                             attention="document", dtype=torch.bfloat16, train=cfg.train, gpu_kernels=True))
    t.peak, t.end_of_forward, t.host      # bytes per rank, excluding parameters (see longctx.plan.states)

What runs is the training loop's own code on `FakeTensorMode` tensors (device "cpu": fake "cuda" tensors fail at
the device guard of a CPU build of torch), under `StorageTracker` (below):

1. the model from its config alone, built on the meta device and materialised with `to_empty` (no weights);
2. `prepare_for_training` (activation checkpointing and offload, tiled MLP, chunked loss), as the loop calls it;
3. with train.sequence_parallel > 1, `enable_ulysses` on a fake process group of that size: DeepSpeed's real
   Ulysses wrapper, its all-to-alls and our document-mask core, at this rank's shapes;
4. one micro-batch of one-document rows: `shift_targets`, `rank_forward_inputs` (masks, varlen flattening, the
   rank's shard), forward, backward. Gradients are dropped as soon as they are accumulated (ZeRO-2/3 hand them
   to a reduce bucket); `longctx.plan.states` adds what the ZeRO stage keeps instead.

With `gpu_kernels` the CUDA attention kernels are their documented-memory stand-ins (`longctx.plan.kernels`);
without, the CPU kernels run (how the plan is validated against real CPU runs). Offloaded activations go to the
"meta" device, so the tracker reports them apart from device memory.

`StorageTracker` counts bytes the way `torch.distributed._tools.mem_tracker.MemTracker` does (every tensor storage
an op creates, by weak reference until it is freed) but without MemTracker's module tracker, whose gradient hooks
fail on the no-grad views inside DeepSpeed's TiledMLP ("Expected gradient function to be set"; FlopCounterMode's
module tracker fails the same way, so the plan's FLOPs come from `longctx.train.metrics`, which tests/test_flops.py
checks against FlopCounterMode).

Only `layers` (default 3) decoder layers are traced: every decoder layer keeps the same bytes for backward, so the
bytes per layer are measured between the starts of the 2nd and 3rd layers and the totals (held at the end of the
forward, and the peak, which comes after it) extrapolated to all layers (tests/test_plan_validation.py checks this
against traces of every layer).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from longctx.model.attention import document_ids_from_position_ids
from longctx.plan.kernels import gpu_attention_kernels
from longctx.train.batches import MicroBatch, rank_forward_inputs
from longctx.train.deepspeed import disable_deepspeed_shm_comm
from longctx.train.loss import shift_targets
from longctx.train.memory_savers import prepare_for_training
from longctx.train.sequence_parallel import enable_ulysses

HOST = "meta"
"""Where offloaded activations go in a trace (their bytes are host memory)."""


@dataclass(frozen=True)
class StepShape:
    hf_config: Any
    """The model's HF config with RoPE changes applied (its text config's num_hidden_layers: the real depth)."""
    seq_len: int
    """Tokens of one packed row (all ranks of a sequence-parallel group together)."""
    micro_batch_size: int
    sequence_parallel: int
    attn_implementation: str
    """Resolved backend: sdpa, eager, flash_attention_2 or flex_attention."""
    attention: str
    """data.attention: document or full."""
    dtype: torch.dtype
    train: Any
    """The `TrainConfig` (activation_checkpointing, activation_offload, tiled_mlp, loss_chunk_tokens)."""
    gpu_kernels: bool = True
    layers: int = 3


@dataclass(frozen=True)
class StepTrace:
    """Bytes of one rank, parameters and buffers excluded, extrapolated to all decoder layers."""

    num_layers: int
    layers_traced: int
    end_of_forward: int
    """Device bytes held when the forward (loss included) has finished: activations saved for backward."""
    peak: int
    """Peak device bytes over forward and backward (saved activations plus the largest temporaries)."""
    per_layer: int
    """Device bytes each decoder layer adds to what is held for backward."""
    host: int
    """Offloaded (CPU) bytes held at the end of the forward."""
    peak_with_host: int
    """Peak of device and offloaded bytes together (what one CPU process holds when the host is the CPU)."""
    seconds: float


def _fake_model(hf_config, layers: int, attn_implementation: str, dtype: torch.dtype):
    """A HF causal LM of `layers` decoder layers on the meta device (no memory, no weights)."""
    cfg = copy.deepcopy(hf_config)
    text = cfg.get_text_config()
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]
    # NOTE: flash-attn is not installed where plans are made; the model is built with sdpa and switched to the
    # flash_attention_2 name, whose kernel is then the stand-in (transformers checks the package only on load).
    load_as = "sdpa" if attn_implementation == "flash_attention_2" else attn_implementation
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation=load_as, dtype=dtype)
    if load_as != attn_implementation:
        lm.config._attn_implementation = attn_implementation
    return lm


@contextlib.contextmanager
def _fake_process_group(size: int):
    """A fake process group of `size` ranks (this is rank 0) with DeepSpeed's comm on top; torn down after."""
    if dist.is_initialized():
        raise RuntimeError("longctx plan: cannot trace sequence parallelism in a process that already has a "
                           "torch.distributed process group")
    import deepspeed  # deferred: only sequence-parallel traces need DeepSpeed's comm (imported by _deepspeed_on_cpu)
    import deepspeed.comm as ds_dist  # deferred: heavy import, used only here

    dist.init_process_group("fake", rank=0, world_size=size, store=dist.HashStore())
    disable_deepspeed_shm_comm()
    deepspeed.init_distributed(dist_backend="fake")
    try:
        yield
    finally:
        ds_dist.destroy_process_group()


@contextlib.contextmanager
def _deepspeed_on_cpu():
    """DeepSpeed imported with its CPU accelerator (Ulysses and TiledMLP are traced on the CPU), without leaving
    DS_ACCELERATOR in the environment: preflight runs in the job's driver, whose environment a local Ray cluster
    and its GPU workers inherit."""
    before = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import deepspeed  # noqa: F401  deferred: heavy, and only traces with SP or tiled MLP need it

        yield
    finally:
        if before is None:
            os.environ.pop("DS_ACCELERATOR", None)
        else:
            os.environ["DS_ACCELERATOR"] = before


@contextlib.contextmanager
def _attention_functions_restored():
    """transformers' attention registry as it was: Ulysses (and the kernel stand-ins) override entries of it, and
    an override left behind would be wrapped again by the next trace's Ulysses."""
    fns = ALL_ATTENTION_FUNCTIONS
    before = {k: fns[k] for k in fns}
    try:
        yield
    finally:
        for k in list(fns):
            if k not in before:
                with contextlib.suppress(KeyError):  # a local override goes; a global registration stays harmless
                    del fns[k]
            elif fns[k] is not before[k]:
                fns[k] = before[k]


def one_document_rows(rows: int, seq_len: int, vocab: int) -> MicroBatch:
    """A micro-batch of rows that each hold one document (fake tensors)."""
    ids = torch.randint(0, vocab, (rows, seq_len))
    pos = torch.arange(seq_len).expand(rows, seq_len).contiguous()
    return MicroBatch(input_ids=ids, position_ids=pos, labels=ids, doc_ids=document_ids_from_position_ids(pos),
                      row_ids=list(range(rows)), tokens=rows * seq_len, non_pad_tokens=rows * seq_len,
                      sum_sq_doc_lengths=rows * seq_len * seq_len)


def drop_gradients(model) -> None:
    """Free every parameter's gradient as soon as it is accumulated, as ZeRO-2/3 do (they copy it into a reduce
    bucket); `longctx.plan.states` accounts what each ZeRO stage keeps instead."""
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


class StorageTracker(TorchDispatchMode):
    """Bytes of live tensor storages per device type, for tensors created while active, and the peak of the
    non-host devices' total."""

    def __init__(self):
        super().__init__()
        self.current: dict[str, int] = defaultdict(int)
        self.peak = 0
        self.peak_with_host = 0
        self._seen = WeakIdKeyDictionary()

    def ignore(self, tensors) -> None:
        """Never count these tensors' storages (parameters: `longctx.plan.states` accounts them), even when an op
        returns a view of them."""
        for t in tensors:
            self._seen[t.untyped_storage()] = None

    def device_bytes(self) -> int:
        return sum(v for d, v in self.current.items() if d != HOST)

    def _freed(self, device: str, nbytes: int) -> None:
        self.current[device] -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        device, nbytes = t.device.type, st.nbytes()
        self._seen[st] = weakref.ref(st, lambda _, d=device, n=nbytes: self._freed(d, n))
        self.current[device] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.device_bytes())
        self.peak_with_host = max(self.peak_with_host, sum(self.current.values()))
        return out


def _trace(shape: StepShape, layers: int) -> dict:
    cfg = shape.hf_config
    sp = shape.sequence_parallel
    with contextlib.ExitStack() as stack:
        stack.enter_context(_attention_functions_restored())
        if sp > 1 or shape.train.tiled_mlp:
            stack.enter_context(_deepspeed_on_cpu())
        if shape.gpu_kernels:
            stack.enter_context(gpu_attention_kernels())
        lm = _fake_model(cfg, layers, shape.attn_implementation, shape.dtype)
        wrapped = prepare_for_training(lm, shape.train, use_gpu=shape.gpu_kernels, offload_host=HOST)
        if sp > 1:
            stack.enter_context(_fake_process_group(sp))
            enable_ulysses(lm, sp, shape.micro_batch_size, core=shape.attn_implementation, attention=shape.attention)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        wrapped.to_empty(device="cpu")
        wrapped.train()
        drop_gradients(wrapped)
        decoder = [m for m in lm.modules() if getattr(m, "gradient_checkpointing", None) is not None
                   and hasattr(m, "mlp")][1:3]
        m = one_document_rows(shape.micro_batch_size, shape.seq_len, cfg.get_text_config().vocab_size)
        tracker = StorageTracker()
        tracker.ignore([*wrapped.parameters(), *wrapped.buffers()])
        # (device, host) bytes when the 2nd and the 3rd decoder layer start: what the 2nd one added and kept (its
        # input, by then held only by what it saved, and its output, now the 3rd one's input)
        before: list[tuple[int, int]] = []
        hooks = [layer.register_forward_pre_hook(
            lambda *_: before.append((tracker.device_bytes(), tracker.current[HOST]))) for layer in decoder]
        with tracker:
            tgt = shift_targets(m.labels, m.doc_ids if shape.attention == "document" else None)
            input_ids, tgt, kwargs = rank_forward_inputs(
                m, tgt, sequence_parallel=sp, sp_rank=0, attn_implementation=shape.attn_implementation,
                attention=shape.attention, device="cpu", dtype=shape.dtype)
            loss_sum, _ = wrapped(input_ids, tgt, **kwargs)
            end_fw, host = tracker.device_bytes(), tracker.current[HOST]
            loss_sum.backward()
        for h in hooks:
            h.remove()
    per_layer = before[1][0] - before[0][0] if len(before) >= 2 else 0
    host_per_layer = before[1][1] - before[0][1] if len(before) >= 2 else 0
    return {"end_fw": end_fw, "peak": tracker.peak, "peak_with_host": tracker.peak_with_host,
            "per_layer": per_layer, "host": host,
            "host_per_layer": host_per_layer}


def trace_step(shape: StepShape) -> StepTrace:
    """Trace `shape.layers` decoder layers and extrapolate to the model's depth (see the module docstring)."""
    t0 = time.perf_counter()
    total = int(shape.hf_config.get_text_config().num_hidden_layers)
    k = min(max(3, shape.layers), total)
    r = _trace(shape, k)
    extra = total - k
    return StepTrace(num_layers=total, layers_traced=k, end_of_forward=r["end_fw"] + extra * r["per_layer"],
                     peak=r["peak"] + extra * r["per_layer"], per_layer=r["per_layer"],
                     host=r["host"] + extra * r["host_per_layer"],
                     peak_with_host=r["peak_with_host"] + extra * (r["per_layer"] + r["host_per_layer"]),
                     seconds=time.perf_counter() - t0)
