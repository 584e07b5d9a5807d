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
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from longctx import storage
from longctx.config import JobConfig, RopeScalingConfig
from longctx.data.fingerprint import fingerprint_of
from longctx.eval import infinitebench, metrics as M
from longctx.eval.documents import SUFFIXES, iter_texts
from longctx.eval.generate import greedy_generate
from longctx.eval.haystack import load_haystack_text
from longctx.eval.items import document_id, document_items, passkey_items, ruler_items
from longctx.eval.longbench import build_prompts, dataset_name, read_task_file, score_rows
from longctx.eval.needle import build_needle_prompts, score_needle, summarize_needle
from longctx.eval.passkey import PasskeyPrompt, build_passkey_prompts, run_passkey_batch, score_passkey_rows
from longctx.eval.perplexity import select_documents, summarize_position_nll, token_nll
from longctx.eval.ruler.suite import RulerWork, build_ruler_items, ruler_lengths, ruler_metrics
from longctx.model.load import load_causal_lm, load_tokenizer, local_model_dir
from longctx.progress import Progress

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
    from transformers import AutoConfig  # deferred: heavy import, used only here

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


def tokenizer_uri(spec: ModelSpec, cfg: JobConfig) -> str:
    if spec.tokenizer:
        return spec.tokenizer

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
        uri = self.tokenizer_uris[name]
        if uri not in self.tokenizers:
            self.tokenizers[uri] = load_tokenizer(uri)
        return self.tokenizers[uri]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["model"])
        results: list[str | None] = [None] * n
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(n):
            task = str(batch["task"][i])
            # generation settings are part of the group key so one batch decodes with one setting
            gen_key = str(batch["meta"][i]) if task == "gen" else ""
            if task == "gen":
                meta = json.loads(gen_key)
                gen_key = json.dumps([meta["max_new_tokens"], meta.get("stop_ids", []), meta.get("min_new_tokens", 0)])
            groups[(str(batch["model"][i]), task, len(batch["ids"][i]), gen_key)].append(i)
        for (name, task, _, _), idx in groups.items():
            model = self._model(name)
            if task == "ppl":
                ids = torch.tensor(np.stack([np.asarray(batch["ids"][i], dtype=np.int64) for i in idx]))
                nll = token_nll(model, ids).numpy()
                for row, i in zip(nll, idx):
                    results[i] = json.dumps({"nll": [round(float(x), 6) for x in row]})
            elif task == "gen":
                metas = [json.loads(str(batch["meta"][i])) for i in idx]
                tok = self._tokenizer(name)
                # rows of a group share length; decode settings come from the first (grouping includes them)
                m0 = metas[0]
                stop = [tok.eos_token_id, *m0.get("stop_ids", [])] if tok.eos_token_id is not None else m0.get("stop_ids", [])
                outs = greedy_generate(model, [[int(t) for t in batch["ids"][i]] for i in idx],
                                       max_new_tokens=int(m0["max_new_tokens"]), eos_token_id=stop,
                                       prefill_chunk=self.prefill_chunk, min_new_tokens=int(m0.get("min_new_tokens", 0)))
                for out, i in zip(outs, idx):
                    results[i] = json.dumps({"prediction": tok.decode(out, skip_special_tokens=True)}, ensure_ascii=False)
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
    import ray  # deferred: heavy import, used only here

    if cfg.eval.num_actors:
        return cfg.eval.num_actors
    resources = ray.cluster_resources()
    if gpus_per_actor > 0:
        return max(1, min(n_models, int(resources.get("GPU", 1) // gpus_per_actor)))
    return max(1, min(n_models, int(resources.get("CPU", 1))))


def _task_files(cfg: JobConfig) -> list[tuple[str, str]]:
    """(dataset, uri) of the LongBench/LEval files to run."""
    lb = cfg.eval.longbench
    if not lb.data:
        raise ValueError("eval.longbench.enabled needs eval.longbench.data (a folder, glob or s3:// prefix of JSONL files)")
    files = []
    for uri in storage.expand(lb.data, SUFFIXES):
        name = dataset_name(uri)
        if not lb.datasets or name in lb.datasets:
            files.append((name, uri))
    missing = set(lb.datasets) - {n for n, _ in files}
    if missing:
        raise ValueError(f"{lb.data}: no file for dataset(s) {sorted(missing)}")
    return files


def build_work_items(cfg: JobConfig, specs: dict[str, ModelSpec], tokenizers: dict[str, str],
                     base_len: int | None = None):
    """Rows of work for every model and task, plus per-tokenizer side information for the driver.

    Generation rows ("gen") are numbered per model: needle prompts, LongBench-format samples, RULER samples,
    InfiniteBench samples, in that order (`gen_offsets` in the info says where each starts).
    """
    ev = cfg.eval
    context = ev.context_length or cfg.data.seq_len
    rows: list[dict] = []
    info: dict[str, dict] = {}
    by_tok: dict[str, dict] = {}
    task_files = _task_files(cfg) if ev.longbench.enabled else []
    fingerprints: dict[str, str] = {}
    loaded: dict[str, Any] = {}
    for name, spec in specs.items():
        tok = loaded.get(tokenizers[name]) or loaded.setdefault(tokenizers[name], load_tokenizer(tokenizers[name]))
        # the trained model usually ships the base's tokenizer: build its prompts once
        tok_uri = fingerprints.setdefault(tokenizers[name], fingerprint_of(tok))
        if tok_uri not in by_tok:
            w: dict[str, Any] = {"docs": {}, "skipped": {}, "passkey": [], "needle": [], "tasks": [],
                                 "ruler": RulerWork(), "infinitebench": []}
            if ev.perplexity:
                for length in [context, *[n for n in ev.extra_context_lengths if n != context]]:
                    docs, skipped = select_documents(tok, iter_texts(ev.documents, ev.text_field), length, ev.num_documents)
                    if not docs:
                        raise ValueError(
                            f"{ev.documents}: no document has {length} tokens ({skipped} too short); give longer "
                            "documents or shorter eval.context_length / eval.extra_context_lengths")
                    w["docs"][length], w["skipped"][length] = docs, skipped
                    w.setdefault("doc_ids", {})[length] = [document_id(d) for d in docs]
            if ev.passkey.enabled:
                w["passkey"] = build_passkey_prompts(tok, ev.passkey.lengths, ev.passkey.depths, ev.passkey.trials, ev.seed)
            if ev.needle.enabled:
                nd = ev.needle
                text = load_haystack_text(nd.haystack, nd.text_field, min_chars=16 * max(nd.lengths))
                w["needle"] = build_needle_prompts(tok, text, nd.lengths, nd.depths, nd.variants, nd.num_needles, nd.trials, ev.seed)
            max_seq = ev.longbench.max_seq_len or context
            for ds, uri in task_files:
                _, records = read_task_file(uri)
                w["tasks"] += build_prompts(tok, ds, records, max_seq, chat_template=ev.longbench.chat_template,
                                            max_samples=ev.longbench.max_samples)
            if ev.ruler.enabled:
                w["ruler"] = build_ruler_items(tok, ev.ruler, ruler_lengths(ev.ruler, context, base_len))
            if ev.infinitebench.enabled:
                w["infinitebench"] = infinitebench.build_prompts(tok, ev.infinitebench,
                                                                 ev.infinitebench.max_seq_len or context)
            by_tok[tok_uri] = w
        w = by_tok[tok_uri]
        offsets = {"needle": 0, "longbench": len(w["needle"])}
        offsets["ruler"] = offsets["longbench"] + len(w["tasks"])
        offsets["infinitebench"] = offsets["ruler"] + len(w["ruler"].items)
        info[name] = {"documents": {n: len(d) for n, d in w["docs"].items()}, "skipped_short": w["skipped"],
                      "doc_ids": w.get("doc_ids", {}),
                      "needle": w["needle"], "tasks": w["tasks"], "ruler": w["ruler"],
                      "infinitebench": w["infinitebench"], "gen_offsets": offsets}
        ids32 = lambda ids: np.asarray(ids, dtype=np.int32)  # noqa: E731
        for docs in w["docs"].values():
            for i, ids in enumerate(docs):
                rows.append({"model": name, "task": "ppl", "index": i, "ids": ids32(ids), "meta": "{}"})
        for i, p in enumerate(w["passkey"]):
            meta = {k: v for k, v in p.to_row().items() if k != "input_ids"}
            rows.append({"model": name, "task": "passkey", "index": i, "ids": ids32(p.input_ids), "meta": json.dumps(meta)})
        for i, p in enumerate(w["needle"]):
            meta = {"kind": "needle", "max_new_tokens": p.max_new_tokens}
            rows.append({"model": name, "task": "gen", "index": i, "ids": ids32(p.input_ids), "meta": json.dumps(meta)})
        for i, t in enumerate(w["tasks"]):
            meta = {"kind": "longbench", "max_new_tokens": t.max_new_tokens, "stop_ids": t.stop_ids,
                    "min_new_tokens": 1 if t.stop_ids else 0}
            # gen indices: needle prompts first, then the LongBench-format samples
            rows.append({"model": name, "task": "gen", "index": len(w["needle"]) + i, "ids": ids32(t.input_ids),
                         "meta": json.dumps(meta)})
        extra = [("ruler", it.input_ids, it.max_new_tokens) for it in w["ruler"].items]
        extra += [("infinitebench", s.input_ids, s.max_new_tokens) for s in w["infinitebench"]]
        for i, (kind, ids, budget) in enumerate(extra):
            rows.append({"model": name, "task": "gen", "index": offsets["ruler"] + i, "ids": ids32(ids),
                         "meta": json.dumps({"kind": kind, "max_new_tokens": budget})})
    return rows, info, context


def evaluate_models(cfg: JobConfig, models: dict[str, ModelSpec], out_dir: str) -> dict:
    """Every enabled evaluation for every model through Ray Data actors; writes `out_dir/metrics.json`.

    Returns {"context_length", "base_context_length", "bucket_edges", "models": {name: {"spec",
    "perplexity", "passkey", "needle", "longbench", "items"}}, "timing_s"}; "items" are the per-document,
    per-prompt and per-RULER-sample results behind the means (`longctx.eval.items`). LongBench predictions go to
    `out_dir/longbench/<model>/<dataset>.jsonl` (scorable with `score_predictions`). Ray must be initialised
    (jobs do it); otherwise Ray Data starts a local cluster.
    """
    import ray  # deferred: heavy import, used only here

    if not models:
        raise ValueError("evaluate_models: no models to evaluate")
    t0 = time.time()
    first = next(iter(models.values()))
    base_uri = next((s.uri for s in models.values() if s.role != "trained"), first.uri)
    _, base_len = eval_lengths(cfg, base_uri)
    tokenizers = {name: tokenizer_uri(spec, cfg) for name, spec in models.items()}
    rows, info, context = build_work_items(cfg, models, tokenizers, base_len)
    if not rows:
        raise ValueError("evaluate_models: every evaluation is disabled (eval.perplexity, eval.passkey.enabled, ...)")
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

    bar = Progress("eval", total=len(rows), unit="work items")  # a line every 10 s (LONGCTX_PROGRESS_EVERY_S)
    results = []
    for row in ds.iter_rows():  # what take_all does, with counts, rate and ETA on the way
        results.append(row)
        bar.update(len(results))
    t_run = time.time() - t0 - t_build

    metrics = aggregate_results(results, models, info, context, cfg.eval.bucket_edges, base_len)
    if cfg.eval.longbench.enabled:
        score_longbench(cfg, results, models, info, metrics, out_dir)
    if cfg.eval.ruler.enabled or cfg.eval.infinitebench.enabled:
        score_ruler_infinitebench(cfg, results, models, info, metrics, out_dir)
    metrics["timing_s"] = {"build_prompts": round(t_build, 3), "ray_data": round(t_run, 3),
                           "total": round(time.time() - t0, 3), "actors": pool, "gpus_per_actor": gpus}
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    log.info("evaluation of %d models written to %s (%.1f s)", len(models), out_dir, time.time() - t0)
    return metrics


def aggregate_results(results: list[dict], models: dict[str, ModelSpec], info: dict, context: int,
                      bucket_edges: list[int], base_len: int) -> dict:
    """Per-model metrics from the actors' result rows."""
    nll_sum: dict[tuple[str, int], np.ndarray] = {}
    count: dict[tuple[str, int], np.ndarray] = {}
    doc_rows: dict[tuple[str, int], dict[int, np.ndarray]] = defaultdict(dict)  # per-document rows (items)
    passkey_rows: dict[str, list] = defaultdict(list)
    gen: dict[str, dict[int, str]] = defaultdict(dict)
    for r in results:
        name, task, res = str(r["model"]), str(r["task"]), json.loads(r["result"])
        if task == "ppl":
            nll = np.asarray(res["nll"], dtype=np.float64)
            key = (name, len(nll))
            if key not in nll_sum:
                nll_sum[key], count[key] = np.zeros(len(nll)), np.zeros(len(nll), dtype=np.int64)
            nll_sum[key] += nll
            count[key][1:] += 1
            doc_rows[key][int(r["index"])] = nll
        elif task == "passkey":
            passkey_rows[name].append(res)
        else:
            gen[name][int(r["index"])] = res["prediction"]
    out: dict[str, Any] = {"context_length": context, "base_context_length": base_len,
                           "bucket_edges": list(bucket_edges), "models": {}}
    for name, spec in models.items():
        entry: dict[str, Any] = {"spec": spec.to_dict()}
        for (model, length) in sorted(k for k in nll_sum if k[0] == name):
            ppl = summarize_position_nll(nll_sum[(model, length)], count[(model, length)], bucket_edges, base_len)
            ppl.update(documents=info[name]["documents"][length], skipped_short=info[name]["skipped_short"][length],
                       context_length=length)
            entry.setdefault("items", {}).setdefault("perplexity", {})[str(length)] = document_items(
                info[name]["doc_ids"][length], doc_rows[(model, length)], base_len)
            if length == context:
                entry["perplexity"] = ppl
            else:  # further context lengths: same documents' first `length` tokens
                entry.setdefault("perplexity_at", {})[str(length)] = ppl
        if passkey_rows[name]:
            rows = sorted(passkey_rows[name], key=lambda r: (r["length"], r["depth"], r["trial"]))
            entry["passkey"] = score_passkey_rows(rows)
            entry.setdefault("items", {})["passkey"] = passkey_items(rows)
            entry["passkey"]["examples"] = [{k: r[k] for k in ("length", "depth", "key", "prediction", "correct")} for r in rows[:2]]
        needle_prompts = info[name]["needle"]
        if needle_prompts:
            nrows = []
            for i, p in enumerate(needle_prompts):
                pred = gen[name].get(i, "")
                nrows.append({"variant": p.variant, "length": p.length, "depth": p.depth, "prediction": pred,
                              "score": score_needle(p.variant, pred, p.reference, p.keywords)})
            entry["needle"] = summarize_needle(nrows)
        out["models"][name] = entry
    return out


def score_longbench(cfg: JobConfig, results: list[dict], models: dict[str, ModelSpec], info: dict,
                    metrics: dict, out_dir: str) -> None:
    """Write each model's LongBench-format predictions and add their scores to `metrics`."""
    from longctx.report.markdown import slug  # deferred: pulls in matplotlib, used only here

    lb = cfg.eval.longbench
    for name in models:
        tasks = info[name]["tasks"]
        offset = len(info[name]["needle"])
        preds = {int(r["index"]): json.loads(r["result"])["prediction"] for r in results
                 if str(r["model"]) == name and str(r["task"]) == "gen"}
        by_ds: dict[str, list[dict]] = defaultdict(list)
        for i, t in enumerate(tasks):
            by_ds[t.dataset].append({"pred": preds.get(offset + i, ""), "answers": t.answers,
                                     "all_classes": t.all_classes, "length": t.length, "dataset": t.dataset,
                                     "metric": t.metric, "truncated": t.truncated})
        for ds, rows in by_ds.items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            storage.write_text(storage.join(out_dir, "longbench", slug(name), f"{ds}.jsonl"), text)
        all_rows = [r for rows in by_ds.values() for r in rows]
        scores = score_rows(all_rows, longbench_e=lb.longbench_e, code_sim_backend=lb.code_sim_backend)
        flat = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
        metrics["models"][name]["longbench"] = {
            "scores": scores, "categories": M.category_averages(flat),
            "samples": {ds: len(rows) for ds, rows in by_ds.items()},
            "truncated": {ds: sum(r["truncated"] for r in rows) for ds, rows in by_ds.items()},
        }


def _generations(results: list[dict], name: str) -> dict[int, str]:
    """{gen index: decoded answer} of one model."""
    return {int(r["index"]): json.loads(r["result"])["prediction"] for r in results
            if str(r["model"]) == name and str(r["task"]) == "gen"}


def score_ruler_infinitebench(cfg: JobConfig, results: list[dict], models: dict[str, ModelSpec], info: dict,
                              metrics: dict, out_dir: str) -> None:
    """RULER's table and InfiniteBench's scores per model; their prediction files go under out_dir."""
    from longctx.report.markdown import slug  # deferred: pulls in matplotlib, used only here

    for name in models:
        preds, off = _generations(results, name), info[name]["gen_offsets"]
        work: RulerWork = info[name]["ruler"]
        if cfg.eval.ruler.enabled:
            answers = [preds.get(off["ruler"] + i, "") for i in range(len(work.items))]
            metrics["models"][name]["ruler"] = ruler_metrics(work, answers, cfg.eval.ruler, out_dir, slug(name))
            metrics["models"][name].setdefault("items", {})["ruler"] = ruler_items(work.items, answers)
        samples = info[name]["infinitebench"]
        if cfg.eval.infinitebench.enabled and samples:
            rows = [{"id": s.id, "prediction": preds.get(off["infinitebench"] + i, ""), "ground_truth": s.ground_truth,
                     "task": s.task, "truncated": s.truncated} for i, s in enumerate(samples)]
            for task in sorted({s.task for s in samples}):
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["task"] == task)
                storage.write_text(storage.join(out_dir, "infinitebench", slug(name), f"preds_{task}.jsonl"), text)
            metrics["models"][name]["infinitebench"] = {
                "scores": infinitebench.score_infinitebench_rows(rows),
                "samples": dict(Counter(r["task"] for r in rows)),
                "truncated": dict(Counter(r["task"] for r in rows if r["truncated"])),
                "commit": infinitebench.INFINITEBENCH_COMMIT}
