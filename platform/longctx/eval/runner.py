"""Evaluate several models (a trained one and training-free baselines of its base) through Ray Data actors.

    specs = default_model_specs(cfg, base_uri="builtin:tiny-llama", trained_uri="runs/x/train/final_model")
    metrics = evaluate_models(cfg, specs, out_dir="runs/x/eval")   # writes runs/x/eval/metrics.json

The driver tokenizes the held-out documents and builds the prompts (token-exact, see `haystack.py`), then
turns them into one Ray Dataset of work items (model name, task, token ids). `map_batches` runs them on an
actor pool: each actor holds model replicas (loaded once, cached), one GPU each when the cluster has GPUs,
fractional CPUs otherwise (`ray.cpus_per_task`), and returns per-item results as JSON. The driver sums them
into per-model metrics. The same code runs on a laptop and on a GPU pool; only the pool size changes.

Model code stays free of Ray: the actor calls the plain functions of `perplexity.py` and `passkey.py`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longctx import storage
from longctx.config import JobConfig, RopeScalingConfig
from longctx.eval.documents import iter_texts
from longctx.eval.passkey import PasskeyPrompt, build_passkey_prompts, run_passkey_batch, score_passkey_rows
from longctx.eval.perplexity import select_documents, summarize_position_nll

log = logging.getLogger(__name__)

BASELINE_LABELS = {"naive": "naive", "pi": "PI", "dynamic_ntk": "dynamic NTK", "yarn": "YaRN"}
BASELINE_SCALING = {"pi": "linear", "dynamic_ntk": "dynamic", "yarn": "yarn"}
# NOTE: an actor keeps every model it has loaded while their parameters total at most this; bigger models
# are evicted least-recently-used first so a GPU holds one replica at a time.
_CACHE_PARAMS = 200_000_000


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: a checkpoint plus optional RoPE overrides applied at load time."""

    uri: str
    rope_theta: float | None = None
    scaling: RopeScalingConfig | None = None
    max_position_embeddings: int | None = None
    role: str = ""
    """What the model is in the comparison: naive, pi, dynamic_ntk, yarn, trained (report verdicts use it)."""
    tokenizer: str | None = None
    """Tokenizer location; default: the model folder, else the job's data.tokenizer."""

    def __post_init__(self):
        if isinstance(self.scaling, dict):
            object.__setattr__(self, "scaling", RopeScalingConfig(**self.scaling))

    def to_dict(self) -> dict:
        return {
            "uri": self.uri,
            "rope_theta": self.rope_theta,
            "scaling": self.scaling.model_dump() if self.scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "role": self.role,
        }

    def load(self, model_cfg=None, device: str = "cpu"):
        from longctx.model.load import load_causal_lm

        kwargs: dict[str, Any] = {}
        if self.rope_theta is not None:
            kwargs["rope_theta"] = self.rope_theta
        if self.scaling is not None:
            kwargs["scaling"] = self.scaling
        if self.max_position_embeddings is not None:
            kwargs["max_position_embeddings"] = self.max_position_embeddings
        # Evaluation must not inherit the job's training-time RoPE overrides: each spec says what it wants.
        kwargs.setdefault("rope_theta", None)
        kwargs.setdefault("scaling", None)
        kwargs.setdefault("max_position_embeddings", None)
        model = load_causal_lm(self.uri, model_cfg, device=device, **kwargs)
        model.eval()
        return model


def base_max_positions(base_uri: str) -> int:
    """max_position_embeddings of a model's config (its training length for a model that was not extended)."""
    from transformers import AutoConfig

    from longctx.model.load import local_model_dir

    return int(AutoConfig.from_pretrained(local_model_dir(base_uri)).max_position_embeddings)


def eval_lengths(cfg: JobConfig, base_uri: str) -> tuple[int, int]:
    """(evaluation context length, base training length) from the config and the base model."""
    context = cfg.eval.context_length or cfg.data.seq_len
    base_len = cfg.eval.base_context_length or base_max_positions(base_uri)
    return int(context), int(base_len)


def default_model_specs(
    cfg: JobConfig, base_uri: str, trained_uri: str | None = None, trained_name: str = "Long-PT"
) -> dict[str, ModelSpec]:
    """The baselines of `cfg.eval.baselines` on the base model, plus the trained model when given.

    Factor: `cfg.eval.scaling_factor`, else context_length / base_context_length. Names read like
    "base (naive)", "base + PI x4", "base + dynamic NTK x4", "base + YaRN x4", "Long-PT".
    """
    context, base_len = eval_lengths(cfg, base_uri)
    factor = float(cfg.eval.scaling_factor or context / base_len)
    specs: dict[str, ModelSpec] = {}
    for b in cfg.eval.baselines:
        if b == "naive":
            specs["base (naive)"] = ModelSpec(base_uri, role="naive")
            continue
        # NOTE: HF dynamic NTK takes the original length from max_position_embeddings, so it stays as is.
        scaling = RopeScalingConfig(type=BASELINE_SCALING[b], factor=factor, original_max_position_embeddings=base_len)
        specs[f"base + {BASELINE_LABELS[b]} x{factor:g}"] = ModelSpec(base_uri, scaling=scaling, role=b)
    if trained_uri:
        specs[trained_name] = ModelSpec(trained_uri, role="trained")
    return specs


def _tokenizer_uri(spec: ModelSpec, cfg: JobConfig) -> str:
    if spec.tokenizer:
        return spec.tokenizer
    from longctx.model.load import local_model_dir

    try:
        d = local_model_dir(spec.uri)
        if any(os.path.exists(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return spec.uri
    except storage.StorageError:
        pass
    return cfg.data.tokenizer


# ------------------------------------------------------------------------------------------------ actor
class EvalActor:
    """Ray Data callable class: runs a batch of work items, loading and caching model replicas."""

    def __init__(self, specs: dict[str, ModelSpec], tokenizers: dict[str, str], model_cfg, prefill_chunk: int):
        import torch

        self.specs = specs
        self.tokenizer_uris = tokenizers
        self.model_cfg = model_cfg
        self.prefill_chunk = prefill_chunk
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.tokenizers: dict[str, Any] = {}

    def _model(self, name: str):
        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        model = self.specs[name].load(self.model_cfg, self.device)
        self.models[name] = model
        while len(self.models) > 1 and sum(sum(p.numel() for p in m.parameters()) for m in self.models.values()) > _CACHE_PARAMS:
            self.models.popitem(last=False)
        return model

    def _tokenizer(self, name: str):
        from longctx.model.load import load_tokenizer

        uri = self.tokenizer_uris[name]
        if uri not in self.tokenizers:
            self.tokenizers[uri] = load_tokenizer(uri)
        return self.tokenizers[uri]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from longctx.eval.perplexity import token_nll

        n = len(batch["model"])
        results: list[str | None] = [None] * n
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(n):
            groups[(str(batch["model"][i]), str(batch["task"][i]), len(batch["ids"][i]))].append(i)
        for (name, task, _), idx in groups.items():
            model = self._model(name)
            if task == "ppl":
                ids = torch.tensor(np.stack([np.asarray(batch["ids"][i]) for i in idx]), dtype=torch.long)
                nll = token_nll(model, ids).numpy()
                for row, i in zip(nll, idx):
                    results[i] = json.dumps({"nll": [round(float(x), 6) for x in row]})
            elif task == "passkey":
                prompts = []
                for i in idx:
                    meta = json.loads(str(batch["meta"][i]))
                    prompts.append(PasskeyPrompt(input_ids=[int(t) for t in batch["ids"][i]], **meta))
                rows = run_passkey_batch(model, self._tokenizer(name), prompts, self.prefill_chunk)
                for row, i in zip(rows, idx):
                    results[i] = json.dumps(row)
            else:
                raise ValueError(f"unknown evaluation task {task!r}")
        return {"model": batch["model"], "task": batch["task"], "index": batch["index"], "result": np.array(results, dtype=object)}


# ----------------------------------------------------------------------------------------------- driver
def _pool_size(cfg: JobConfig, n_models: int, gpus_per_actor: float) -> int:
    import ray

    if cfg.eval.num_actors:
        return cfg.eval.num_actors
    resources = ray.cluster_resources()
    if gpus_per_actor > 0:
        return max(1, min(n_models, int(resources.get("GPU", 1) // gpus_per_actor)))
    return max(1, min(n_models, int(resources.get("CPU", 1))))


def build_work_items(cfg: JobConfig, specs: dict[str, ModelSpec], tokenizers: dict[str, str], base_len: int | None):
    """Rows of work for every model, plus what the driver needs to aggregate (counts of skipped docs)."""
    from longctx.model.load import load_tokenizer

    context = cfg.eval.context_length or cfg.data.seq_len
    rows: list[dict] = []
    info: dict[str, dict] = {}
    by_tok: dict[str, tuple] = {}
    for name, spec in specs.items():
        tok_uri = tokenizers[name]
        if tok_uri not in by_tok:
            tok = load_tokenizer(tok_uri)
            docs, skipped = select_documents(tok, iter_texts(cfg.eval.documents, cfg.eval.text_field), context, cfg.eval.num_documents)
            if not docs:
                raise ValueError(
                    f"{cfg.eval.documents}: no document has eval.context_length={context} tokens "
                    f"({skipped} too short); give longer documents or a shorter context length"
                )
            pk = cfg.eval.passkey
            prompts = build_passkey_prompts(tok, pk.lengths, pk.depths, pk.trials, cfg.eval.seed) if pk.enabled else []
            by_tok[tok_uri] = (docs, skipped, prompts)
        docs, skipped, prompts = by_tok[tok_uri]
        info[name] = {"documents": len(docs), "skipped_short": skipped}
        for i, ids in enumerate(docs):
            rows.append({"model": name, "task": "ppl", "index": i, "ids": np.asarray(ids, dtype=np.int32), "meta": "{}"})
        for i, p in enumerate(prompts):
            meta = {k: v for k, v in p.to_row().items() if k != "input_ids"}
            rows.append({"model": name, "task": "passkey", "index": i, "ids": np.asarray(p.input_ids, dtype=np.int32),
                         "meta": json.dumps(meta)})
    return rows, info, context


def evaluate_models(cfg: JobConfig, models: dict[str, ModelSpec], out_dir: str) -> dict:
    """Perplexity by position and passkey accuracy for every model; writes `out_dir/metrics.json`.

    Returns {"context_length", "base_context_length", "bucket_edges", "models": {name: {"spec",
    "perplexity": {...}, "passkey": {...}}}, "timing_s": {...}}. Ray must be initialised (jobs do it);
    otherwise Ray Data starts a local cluster.
    """
    import ray

    if not models:
        raise ValueError("evaluate_models: no models to evaluate")
    t0 = time.time()
    first = next(iter(models.values()))
    base_uri = next((s.uri for s in models.values() if s.role != "trained"), first.uri)
    _, base_len = eval_lengths(cfg, base_uri)
    tokenizers = {name: _tokenizer_uri(spec, cfg) for name, spec in models.items()}
    rows, info, context = build_work_items(cfg, models, tokenizers, base_len)
    t_build = time.time() - t0

    gpus = cfg.eval.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    pool = _pool_size(cfg, len(models), gpus)
    blocks = max(1, min(len(rows), pool * 4 * len(models)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        EvalActor,
        fn_constructor_kwargs={"specs": models, "tokenizers": tokenizers, "model_cfg": cfg.model,
                               "prefill_chunk": cfg.eval.prefill_chunk_tokens},
        batch_size=cfg.eval.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_cpus=cfg.ray.data_cpus_per_task,
        num_gpus=gpus,
    )
    results = ds.take_all()
    t_run = time.time() - t0 - t_build

    metrics = aggregate_results(results, models, info, context, cfg.eval.bucket_edges, base_len)
    metrics["timing_s"] = {"build_prompts": round(t_build, 3), "ray_data": round(t_run, 3),
                           "total": round(time.time() - t0, 3), "actors": pool, "gpus_per_actor": gpus}
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    log.info("evaluation of %d models written to %s (%.1f s)", len(models), out_dir, time.time() - t0)
    return metrics


def aggregate_results(results: list[dict], models: dict[str, ModelSpec], info: dict, context: int,
                      bucket_edges: list[int], base_len: int) -> dict:
    """Per-model metrics from the actors' result rows."""
    nll_sum = {m: np.zeros(context, dtype=np.float64) for m in models}
    count = {m: np.zeros(context, dtype=np.int64) for m in models}
    passkey_rows: dict[str, list] = defaultdict(list)
    for r in results:
        name, task, res = str(r["model"]), str(r["task"]), json.loads(r["result"])
        if task == "ppl":
            nll_sum[name] += np.asarray(res["nll"], dtype=np.float64)
            count[name][1:] += 1
        else:
            passkey_rows[name].append(res)
    out: dict[str, Any] = {"context_length": context, "base_context_length": base_len,
                           "bucket_edges": list(bucket_edges), "models": {}}
    for name, spec in models.items():
        entry: dict[str, Any] = {"spec": spec.to_dict()}
        if count[name].sum():
            ppl = summarize_position_nll(nll_sum[name], count[name], bucket_edges, base_len)
            ppl.update(info[name], context_length=context)
            entry["perplexity"] = ppl
        if passkey_rows[name]:
            rows = sorted(passkey_rows[name], key=lambda r: (r["length"], r["depth"], r["trial"]))
            entry["passkey"] = score_passkey_rows(rows)
            entry["passkey"]["examples"] = [{k: r[k] for k in ("length", "depth", "key", "prediction", "correct")} for r in rows[:2]]
        out["models"][name] = entry
    return out
