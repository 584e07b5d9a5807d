"""Will it fit? Memory per GPU, CPU memory per node, FLOPs and step time of a training job, before any GPU is paid.

    planner = Planner(cfg, gpu="h100")            # the model's config.json only: no weights, no GPU, no Ray
    p = planner.plan()                            # the job as configured
    p = planner.plan(seq_len=262144, sequence_parallel=8)   # the same job with other layout values
    best = planner.max_seq_len()                  # longest data.seq_len that fits
    rung = planner.nearest_fit()                  # the first layout on the savers ladder that fits

Per GPU = model states (longctx.plan.states: ZeRO partitioning, offloads, DeepSpeed's buffers)
        + max(activations held for backward + the peak of temporaries (longctx.plan.trace: the project's own step
              traced on fake tensors at this rank's shapes), the optimizer step's fp32 gradient copy),
against the device's memory minus a stated reserve: RESERVE_GIB for the CUDA context, NCCL and cuBLAS workspaces
(outside PyTorch's allocator) and RESERVE_FRACTION of the device for allocator rounding and fragmentation (with
expandable segments, as the workers run). Neither is fitted to any measurement.

FLOPs per step count rows of one document each (the most attention work a row of that length can cost) with
`longctx.train.metrics`; step time = FLOPs per GPU / (dense bf16 peak x the assumed MFU, causal convention).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from longctx import storage
from longctx.config import ConfigError, JobConfig, config_from_dict
from longctx.model.rope import apply_rope_changes
from longctx.plan.states import model_states
from longctx.train.gpus import RESOURCE_MARKERS, gpu_by_kind
from longctx.train.metrics import count_params, model_step_flops

GIB = 2**30
RESERVE_GIB = 2.0
"""Device memory outside PyTorch's allocator: CUDA context (~0.5 GiB), NCCL buffers, cuBLAS workspaces."""
RESERVE_FRACTION = 0.03
"""Share of the device kept for allocator rounding and fragmentation (expandable segments on)."""
DEFAULT_MFU = 0.35
"""Assumed model-FLOPs utilisation (causal convention) for step times: an assumption, not a measurement."""
LAYOUT_KEYS = ("seq_len", "micro_batch_size", "sequence_parallel", "zero_stage", "activation_checkpointing",
               "tiled_mlp", "activation_offload", "offload_optimizer", "offload_params")
"""The keys a plan may change (`Planner.plan(**changes)`); all but seq_len live under train."""


@dataclass
class Plan:
    layout: dict
    params_total: int
    gpu: str | None
    gpu_memory_gib: float | None
    usable_gib: float | None
    per_gpu_gib: dict[str, float]
    detail_gib: dict[str, float]
    cpu_gib_per_node: float
    gpus_per_node: int
    flops_per_step: float
    flops_per_step_full_square: float
    step_seconds: float | None
    tokens_per_s: float | None
    mfu_assumed: float
    attn_implementation: str
    layers_traced: int
    num_layers: int
    trace_seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool | None:
        """None when the GPU's memory is not known."""
        return None if self.usable_gib is None else self.per_gpu_gib["total"] <= self.usable_gib

    @property
    def dominant(self) -> str:
        parts = {k: self.per_gpu_gib[k] for k in ("model_states", "activations", "temporary", "optimizer_step")}
        if parts["optimizer_step"] <= parts["activations"] + parts["temporary"]:
            parts.pop("optimizer_step")
        return max(parts, key=parts.get)

    def as_json(self) -> dict:
        out = {"params_total": self.params_total, "per_gpu_gib": {k: round(v, 3) for k, v in self.per_gpu_gib.items()},
               "gpu": self.gpu, "gpu_memory_gib": self.gpu_memory_gib,
               "usable_gib": None if self.usable_gib is None else round(self.usable_gib, 3), "fits": self.fits,
               "dominant": self.dominant, "cpu_gib_per_node": round(self.cpu_gib_per_node, 3),
               "gpus_per_node": self.gpus_per_node, "flops_per_step": self.flops_per_step,
               "flops_per_step_full_square": self.flops_per_step_full_square, "step_seconds": self.step_seconds,
               "tokens_per_s": self.tokens_per_s, "mfu_assumed": self.mfu_assumed, "layout": self.layout,
               "attn_implementation": self.attn_implementation, "detail_gib": {k: round(v, 3) for k, v in
                                                                                self.detail_gib.items()},
               "layers_traced": self.layers_traced, "num_layers": self.num_layers,
               "trace_seconds": round(self.trace_seconds, 2)}
        out.update(self.extra)
        return out


def read_model_config(cfg: JobConfig, config_dict: dict | None = None):
    """The model's HF config (RoPE changes applied, max_position_embeddings = data.seq_len unless set) from
    `config_dict` or `<model.path>/config.json` (local, builtin: or s3://; nothing else is read)."""
    from transformers import AutoConfig  # deferred: transformers takes seconds; `longctx --help` imports this module

    if config_dict is None:
        uri = storage.join(cfg.model.path, "config.json")
        try:
            config_dict = json.loads(storage.read_text(uri))
        except (storage.StorageError, FileNotFoundError, OSError, ValueError) as e:
            raise ConfigError(f"model.path: cannot read {uri} ({type(e).__name__}: {e}); the plan needs the "
                             "model's config.json (the folder may hold only that file)") from None
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"model.path={cfg.model.path}: config.json has no model_type")
    try:
        hf = AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.path={cfg.model.path}: config.json of model_type {model_type!r} cannot be built by "
                          f"transformers here ({e}); plans need an architecture transformers implements") from None
    apply_rope_changes(hf, rope_theta=cfg.model.rope_theta, scaling=cfg.model.rope_scaling,
                       max_position_embeddings=cfg.model.max_position_embeddings or cfg.data.seq_len)
    return hf


def resolve_gpu(cfg: JobConfig, gpu: str | None = None) -> tuple[str | None, float | None, float | None]:
    """(kind, memory GiB, dense bf16 peak FLOP/s) of the workers' GPU: `gpu` (the --gpu flag), else
    train.gpu_type, else a resource marker of the shipped cluster configs; train.gpu_memory_gib overrides memory."""
    t = cfg.train
    kind = gpu or t.gpu_type or next((RESOURCE_MARKERS[r] for r in t.resources_per_worker if r in RESOURCE_MARKERS),
                                     None)
    spec = gpu_by_kind(kind) if kind else None
    memory = t.gpu_memory_gib or (spec.memory_gib if spec else None)
    return kind, memory, (spec.peak_bf16_flops if spec else None)


def with_layout(cfg: JobConfig, changes: dict) -> JobConfig:
    """`cfg` with layout keys (LAYOUT_KEYS) changed, validated like a loaded config."""
    unknown = set(changes) - set(LAYOUT_KEYS)
    if unknown:
        raise ValueError(f"not layout keys: {sorted(unknown)} (allowed: {LAYOUT_KEYS})")
    tree = json.loads(cfg.model_dump_json())
    for k, v in changes.items():
        (tree["data"] if k == "seq_len" else tree["train"])[k] = v
    if "seq_len" in changes and cfg.model.max_position_embeddings is not None:
        tree["model"]["max_position_embeddings"] = max(cfg.model.max_position_embeddings, changes["seq_len"])
    return config_from_dict(tree, "plan layout")


def layout_of(cfg: JobConfig) -> dict:
    return {k: (cfg.data.seq_len if k == "seq_len" else getattr(cfg.train, k)) for k in LAYOUT_KEYS}


class Planner:
    """Plans of one job under layout changes; traces are cached by the shapes they depend on."""

    def __init__(self, cfg: JobConfig, *, gpu: str | None = None, mfu: float = DEFAULT_MFU, gpus_per_node: int = 8,
                 model_config: dict | None = None):
        import torch  # deferred (here and below): torch and transformers take seconds; the CLI imports this module

        from longctx.model.load import pick_attn_implementation  # deferred: pulls in torch, used only here

        self.cfg = cfg
        self.on_gpu = bool(cfg.train.use_gpu or gpu)
        self.gpu, self.gpu_memory_gib, self.peak_flops = resolve_gpu(cfg, gpu) if self.on_gpu else (None, None, None)
        self.mfu = float(mfu)
        self.gpus_per_node = max(1, min(int(gpus_per_node), cfg.train.num_workers))
        self.hf_config = read_model_config(cfg, model_config)
        self.text_config = self.hf_config.get_text_config()
        device = "cuda" if self.on_gpu else "cpu"
        self.attn_implementation = pick_attn_implementation(cfg.model.attn_implementation, device)
        name = {"auto": "bfloat16" if self.on_gpu else "float32"}.get(cfg.model.dtype, cfg.model.dtype)
        self.dtype = getattr(torch, name)
        self.params_total, self.matmul_params, self.largest_layer = self._count_params()
        self._traces: dict = {}

    def _count_params(self) -> tuple[int, int, int]:
        """(all parameters, those doing matmul work per token, the most one module holds), on the meta device."""
        import torch  # deferred: heavy import, used only here
        from transformers import AutoModelForCausalLM  # deferred: heavy import, used only here

        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(self.hf_config, attn_implementation="sdpa", dtype=self.dtype)
        n = count_params(lm)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in lm.modules())
        return n["total"], n["matmul"], int(largest)

    def _trace(self, cfg: JobConfig):
        from longctx.plan.trace import StepShape, trace_step  # deferred: imports torch and transformers

        t = cfg.train
        key = (cfg.data.seq_len, t.micro_batch_size, t.sequence_parallel, t.activation_checkpointing,
               t.activation_offload, t.tiled_mlp, t.loss_chunk_tokens)
        if key not in self._traces:
            self._traces[key] = trace_step(StepShape(
                self.hf_config, seq_len=cfg.data.seq_len,
                micro_batch_size=t.micro_batch_size, sequence_parallel=t.sequence_parallel,
                attn_implementation=self.attn_implementation, attention=cfg.data.attention, dtype=self.dtype,
                train=t, gpu_kernels=self.on_gpu))
        return self._traces[key]

    def plan(self, **changes) -> Plan:
        cfg = with_layout(self.cfg, changes) if changes else self.cfg
        t = cfg.train
        tr = self._trace(cfg)
        b = self.dtype.itemsize
        st = model_states(params=self.params_total, largest_layer=self.largest_layer, world=t.num_workers, train=t,
                          dtype_bytes=b, overlap_comm=self.on_gpu)
        states = st.gpu_total
        activations, temporary = tr.end_of_forward, max(0, tr.peak - tr.end_of_forward)
        total = states + max(tr.peak, st.step_extra)
        per_gpu = {"model_states": states / GIB, "activations": activations / GIB, "temporary": temporary / GIB,
                   "optimizer_step": st.step_extra / GIB, "total": total / GIB}
        detail = {**{k: v / GIB for k, v in st.gpu.items()}, "activations_per_layer": tr.per_layer / GIB,
                  "cpu_optimizer_per_gpu": st.cpu["optimizer"] / GIB, "cpu_params_per_gpu": st.cpu["params"] / GIB,
                  "cpu_activations_per_gpu": tr.host / GIB}
        cpu_node = (st.cpu["optimizer"] + st.cpu["params"] + tr.host) * self.gpus_per_node / GIB
        usable = None
        if self.gpu_memory_gib is not None:
            usable = self.gpu_memory_gib * (1 - RESERVE_FRACTION) - RESERVE_GIB
        rows = t.global_batch_tokens / cfg.data.seq_len
        flops = model_step_flops(self.hf_config, matmul_params=self.matmul_params, tokens=t.global_batch_tokens,
                                 sum_sq_doc_lengths=int(rows * cfg.data.seq_len ** 2))
        step_s = tok_s = None
        if self.peak_flops:
            step_s = flops["causal"] / t.num_workers / (self.peak_flops * self.mfu)
            tok_s = t.global_batch_tokens / step_s
        return Plan(layout=layout_of(cfg), params_total=self.params_total, gpu=self.gpu,
                    gpu_memory_gib=self.gpu_memory_gib, usable_gib=usable, per_gpu_gib=per_gpu, detail_gib=detail,
                    cpu_gib_per_node=cpu_node, gpus_per_node=self.gpus_per_node, flops_per_step=flops["causal"],
                    flops_per_step_full_square=flops["full_square"], step_seconds=step_s, tokens_per_s=tok_s,
                    mfu_assumed=self.mfu, attn_implementation=self.attn_implementation,
                    layers_traced=tr.layers_traced, num_layers=tr.num_layers, trace_seconds=tr.seconds)

    # ------------------------------------------------------------------------------------------- searches
    def granularity(self, sp: int | None = None) -> int:
        """Step of the seq_len search: a multiple of 1024 and of the sequence-parallel degree."""
        sp = sp or self.cfg.train.sequence_parallel
        return 1024 * sp // math.gcd(1024, sp)

    def max_seq_len(self, *, limit: int = 1 << 26, **changes) -> Plan | None:
        """The plan at the longest data.seq_len (a multiple of 1024 and of the SP degree) that fits with this
        layout, or None when not even one granule fits. Memory grows with the length and almost linearly, so the
        next length to try comes from the secant through the last two plans (regula falsi once a fitting and a
        non-fitting length bracket the answer), ending with the two plans one granule apart that prove it: every
        probe is a full plan, nothing is extrapolated."""
        if self.gpu_memory_gib is None:
            raise ConfigError("--max-seq-len needs the GPU's memory: --gpu, train.gpu_type or train.gpu_memory_gib")
        sp = changes.get("sequence_parallel", self.cfg.train.sequence_parallel)
        g = self.granularity(sp)
        probes: dict[int, float] = {}  # seq_len -> GiB over the usable memory (<= 0: fits)
        plans: dict[int, Plan] = {}

        def over(s: int) -> float:
            if s not in probes:
                plans[s] = self.plan(**{**changes, "seq_len": s})
                probes[s] = plans[s].per_gpu_gib["total"] - plans[s].usable_gib
            return probes[s]

        def secant(a: int, b: int) -> float:
            fa, fb = over(a), over(b)
            return b - fb * (b - a) / (fb - fa) if fb != fa else 2.0 * b

        s0 = min(limit, max(g, self.cfg.data.seq_len // g * g))
        s1 = min(limit, 2 * s0) if over(s0) <= 0 else max(g, s0 // 2 // g * g)
        if s1 != s0:
            over(s1)
        for _ in range(64):  # each round plans at least one new length; 64 is far more than a search needs
            fit = [s for s, v in probes.items() if v <= 0]
            miss = [s for s, v in probes.items() if v > 0]
            lo, hi = (max(fit) if fit else None), (min(miss) if miss else None)
            if lo is None and (hi is None or hi <= g):
                return None
            if hi is None and lo >= limit:
                break
            if lo is not None and hi is not None and hi - lo <= g:
                break
            if lo is not None and hi is not None:
                guess = secant(lo, hi)
            else:
                a, b = sorted(probes)[-2:] if hi is None else sorted(probes)[:2]
                guess = secant(a, b)
                guess = min(guess, 8.0 * lo) if hi is None else max(guess, hi / 8.0)
            s = int(guess) // g * g
            s = min(s, (hi - g) if hi is not None else limit)
            s = max(s, (lo + g) if lo is not None else g)
            if s in probes:  # the estimate stalls at a probed length: halve the bracket instead
                s = ((lo + hi) // 2 // g * g) if lo is not None and hi is not None else s + g
            if over(s) <= 0 and (hi is None or s + g < hi):
                over(s + g)  # the granule above: usually the non-fitting bound that ends the search
        best = plans[lo]
        best.extra["max_seq_len"] = lo
        best.extra["probes"] = len(probes)
        return best

    def ladder(self) -> list[dict]:
        """ALST's savers as rungs, each adding to the one before, in the order they cost throughput: activation
        checkpointing, micro-batch 1, ZeRO-3, each larger sequence-parallel degree, then (at the largest) tiled
        MLP, activation offload, optimizer offload, parameter offload."""
        t, text = self.cfg.train, self.text_config
        kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        rungs, cur = [], {}

        def add(**kw):
            cur.update(kw)
            rungs.append(dict(cur))

        if not t.activation_checkpointing:
            add(activation_checkpointing=True)
        if t.micro_batch_size > 1:
            add(micro_batch_size=1)
        if t.zero_stage < 3:
            add(zero_stage=3)
        for sp in range(t.sequence_parallel + 1, t.num_workers + 1):
            if (t.num_workers % sp == 0 and text.num_attention_heads % sp == 0 and (kv % sp == 0 or sp % kv == 0)
                    and self.cfg.data.seq_len % sp == 0):
                add(sequence_parallel=sp)
        for k in ("tiled_mlp", "activation_offload", "offload_optimizer", "offload_params"):
            if not getattr(t, k):
                add(**{k: True})
        return rungs

    def nearest_fit(self) -> tuple[dict, Plan] | None:
        """(changes, plan) of the first rung of `ladder` that fits, then without every change it does not need
        (tried most expensive first; a sequence-parallel degree as low as it can go); None when not even the
        last rung fits."""
        for rung in self.ladder():
            p = self.plan(**rung)
            if p.fits:
                break
        else:
            return None
        t = self.cfg.train
        for key in reversed(list(rung)):
            if key == "sequence_parallel":
                lower = [sp for sp in range(t.sequence_parallel, rung[key]) if t.num_workers % sp == 0
                         and self.text_config.num_attention_heads % sp == 0 and self.cfg.data.seq_len % sp == 0]
                candidates = [{**rung, key: sp} for sp in lower]
            else:
                candidates = [{k: v for k, v in rung.items() if k != key}]
            for cand in candidates:
                if cand.get("sequence_parallel") == t.sequence_parallel:
                    cand.pop("sequence_parallel")
                try:
                    q = self.plan(**cand)
                except ConfigError:  # e.g. activation offload without checkpointing: not a layout
                    continue
                if q.fits:
                    rung, p = cand, q
                    break
        return rung, p
