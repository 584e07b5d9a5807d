"""The papers' orderings, measured side by side on a laptop: `jobs/study.py` / `longctx study`.

    from longctx.study import run_study
    report = run_study(load_config(None), "runs/study", steps=10)        # parts a, b, c, d, e

Parts (letters as in docs/study.md):
  a. training-free baselines (naive, PI, dynamic NTK, YaRN) vs Long-PT: NLL beyond base, passkey at 4x base;
  b. Fu et al.'s data strategies on a per-source long-tailed corpus (`data.synthetic.longtail`), same token
     budget: per-source upsampling vs global upsampling vs cut at the base length; NLL beyond base per source;
  c. LongSkywork's long-SFT stage: part a's Long-PT model, then a short Long-SFT run on the platform's own
     synthetic retrieval (passkey, key-value, multi-needle) and SynL table conversations at lengths between the
     base length and the training length; passkey and needle at 4x base, before and after the SFT stage;
  d. Index's RoPE base sweep around the `rope suggest` bound: NLL beyond base per base;
  e. Fu et al.'s data-quantity curve: passkey and NLL beyond base vs tokens trained, from part a's run with
     `eval.during_training` on.

Every trial saves its evaluation (`trials/<name>/eval/metrics.json`, and part e's `checkpoint_eval.jsonl`);
`study.json` holds the numbers taken from them (`trial_numbers`) and the verdicts computed from those
(`verdicts`), so anyone can recompute the report from the saved per-trial metrics. The report's first lines
state which ordering held and which did not, with the numbers; an ordering that failed is never hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
import math
import time
from typing import Any

from longctx import storage
from longctx.config import EMBEDDED_DEFAULT, JobConfig, dump_config

STRATEGIES = {"per-source": "per-source", "global": "global", "cut-at-base": "cut-4k"}
TARGET_NLL = "NLL beyond base: Long-PT < YaRN ~ dynamic NTK < PI < naive"
TARGET_PASSKEY_NAIVE = "passkey at 4x: naive <= 10%"
TARGET_PASSKEY_SFT = "passkey at 4x: Long-PT + synthetic long-SFT >= 90%"
TARGET_DATA = "per-source upsampling: lowest NLL beyond base of the three strategies, no source worse than cut-at-base by > 0.02"
TARGET_ROPE = "RoPE sweep: best base >= the `rope suggest` bound"


def _cfg(base: JobConfig, **updates: Any) -> JobConfig:
    """A copy of `base` with dotted-path updates (validated like a config file)."""
    tree = json.loads(base.model_dump_json())
    for path, value in updates.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return JobConfig.model_validate(tree)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------ numbers
def model_numbers(ev_metrics: dict, passkey_len: int) -> dict[str, dict]:
    """Per model of one evaluation: NLL beyond/within base and passkey at `passkey_len` (None when not run)."""
    out = {}
    for name, m in ev_metrics.get("models", {}).items():
        ppl = m.get("perplexity") or {}
        pk = (m.get("passkey") or {}).get("accuracy_by_length", {})
        out[name] = {"role": m["spec"].get("role"), "nll_beyond_base": ppl.get("nll_beyond_base"),
                     "nll_within_base": ppl.get("nll_within_base"), "passkey_4x": pk.get(str(passkey_len))}
    return out


def trial_numbers(root: str) -> dict:
    """The study's numbers, read back from the saved per-trial metrics under `root/trials/`."""
    plan = json.loads(storage.read_text(storage.join(root, "plan.json")))
    pk_len = plan["passkey_length"]
    out: dict[str, Any] = {"plan": plan}
    if "a" in plan["parts"]:
        ev = json.loads(storage.read_text(storage.join(root, "trials", "a-long-pt", "eval", "metrics.json")))
        out["a"] = model_numbers(ev, pk_len)
    if "b" in plan["parts"]:
        b: dict[str, dict] = {}
        for src in plan["sources"]:
            ev = json.loads(storage.read_text(storage.join(root, "trials", "b-strategies", f"eval-{src}", "metrics.json")))
            for name, nums in model_numbers(ev, pk_len).items():
                entry = b.setdefault(name, {"nll_beyond_base_by_source": {}, "passkey_4x": None})
                entry["nll_beyond_base_by_source"][src] = nums["nll_beyond_base"]
                if nums["passkey_4x"] is not None:
                    entry["passkey_4x"] = nums["passkey_4x"]
        for entry in b.values():
            vals = list(entry["nll_beyond_base_by_source"].values())
            entry["nll_beyond_base_mean"] = sum(vals) / len(vals) if vals and all(_finite(v) for v in vals) else None
        out["b"] = b
    if "c" in plan["parts"]:
        ev = json.loads(storage.read_text(storage.join(root, "trials", "c-long-sft", "eval", "metrics.json")))
        c = {}
        for name, m in ev.get("models", {}).items():
            pk = (m.get("passkey") or {}).get("accuracy_by_length", {})
            needle = ((m.get("needle") or {}).get("single") or {}).get("by_length", {})
            key_nll = ((m.get("passkey") or {}).get("key_nll_by_length") or {}).get(str(pk_len))
            c[name] = {"role": m["spec"].get("role"), "passkey_4x": pk.get(str(pk_len)),
                       "passkey_key_nll_4x": key_nll, "needle_4x": needle.get(str(pk_len))}
        out["c"] = c
    if "d" in plan["parts"]:
        d = {}
        for theta, trial in plan["rope_trials"].items():
            ev = json.loads(storage.read_text(storage.join(root, "trials", trial, "eval", "metrics.json")))
            nums = next(v for v in model_numbers(ev, pk_len).values() if v["role"] == "trained")
            d[theta] = nums["nll_beyond_base"]
        out["d"] = {"nll_beyond_base_by_theta": d, "bound": plan["rope_bound"]}
    if "e" in plan["parts"]:
        from longctx.eval.during_training import read_ledger

        recs = read_ledger(storage.join(root, "trials", "a-long-pt", "train", "checkpoint_eval.jsonl"))
        out["e"] = [{"step": r["step"], "tokens": r["tokens"], "passkey_4x": (r.get("passkey_by_length") or {}).get(str(pk_len)),
                     "nll_beyond_base": r.get("nll_beyond_base")} for r in recs]
    return out


def verdicts(nums: dict) -> list[dict]:
    """One verdict per target: {"target", "status": held | did not hold | not run, "detail"} (numbers inline)."""
    out = []
    a = nums.get("a")
    if a:
        by_role = {v["role"]: v for v in a.values()}
        nll = {r: by_role[r]["nll_beyond_base"] for r in ("trained", "yarn", "dynamic_ntk", "pi", "naive") if r in by_role}
        if len(nll) == 5 and all(_finite(v) for v in nll.values()):
            held = nll["trained"] < min(nll["yarn"], nll["dynamic_ntk"]) and max(nll["yarn"], nll["dynamic_ntk"]) < nll["pi"] < nll["naive"]
            detail = (f"Long-PT {nll['trained']:.3f}, YaRN {nll['yarn']:.3f}, dynamic NTK {nll['dynamic_ntk']:.3f}, "
                      f"PI {nll['pi']:.3f}, naive {nll['naive']:.3f}")
            out.append({"target": TARGET_NLL, "status": "held" if held else "did not hold", "detail": detail})
        else:
            out.append({"target": TARGET_NLL, "status": "not run", "detail": f"models evaluated: {sorted(nll)}"})
        naive_pk = by_role.get("naive", {}).get("passkey_4x")
        if naive_pk is None:
            out.append({"target": TARGET_PASSKEY_NAIVE, "status": "not run", "detail": "no passkey at 4x"})
        else:
            detail = "; ".join(f"{n} {100 * v['passkey_4x']:.0f}%" for n, v in a.items() if v["passkey_4x"] is not None)
            out.append({"target": TARGET_PASSKEY_NAIVE, "status": "held" if naive_pk <= 0.10 else "did not hold",
                        "detail": detail + (" (the base cannot retrieve even at its own length: 0% everywhere says "
                                            "nothing about extension)" if all(v["passkey_4x"] == 0 for v in a.values()
                                                                              if v["passkey_4x"] is not None) else "")})
    else:
        out += [{"target": t, "status": "not run", "detail": "part a not run"} for t in (TARGET_NLL, TARGET_PASSKEY_NAIVE)]
    c = nums.get("c")
    by_role_c = {v["role"]: v for v in (c or {}).values()}
    sft_pk = by_role_c.get("long_sft", {}).get("passkey_4x")
    if sft_pk is None:
        out.append({"target": TARGET_PASSKEY_SFT, "status": "not run", "detail": "part c not run"})
    else:
        detail = "; ".join(f"{n}: passkey {_pct(v['passkey_4x'])}, needle score {_score(v['needle_4x'])}"
                           for n, v in c.items())
        if all(v["passkey_4x"] == 0 for v in c.values() if v["passkey_4x"] is not None):
            detail += " (0% before and after: the base never learned to retrieve, see docs/study.md)"
        out.append({"target": TARGET_PASSKEY_SFT, "status": "held" if sft_pk >= 0.9 else "did not hold",
                    "detail": detail})
    b = nums.get("b")
    if b and all(_finite(v.get("nll_beyond_base_mean")) for v in b.values()) and set(b) == set(STRATEGIES):
        means = {k: v["nll_beyond_base_mean"] for k, v in b.items()}
        per, cut = b["per-source"]["nll_beyond_base_by_source"], b["cut-at-base"]["nll_beyond_base_by_source"]
        worst = max(per[s] - cut[s] for s in per)
        held = means["per-source"] < min(means["global"], means["cut-at-base"]) and worst <= 0.02
        detail = (", ".join(f"{k} {v:.3f}" for k, v in means.items()) + "; per source (per-source vs cut-at-base): "
                  + ", ".join(f"{s} {per[s]:.3f} vs {cut[s]:.3f}" for s in sorted(per))
                  + f"; worst source {worst:+.3f} nats")
        out.append({"target": TARGET_DATA, "status": "held" if held else "did not hold", "detail": detail})
    else:
        out.append({"target": TARGET_DATA, "status": "not run", "detail": "part b not run"})
    d = nums.get("d")
    if d and d["nll_beyond_base_by_theta"] and all(_finite(v) for v in d["nll_beyond_base_by_theta"].values()):
        by = {float(k): v for k, v in d["nll_beyond_base_by_theta"].items()}
        best = min(by, key=by.get)
        detail = ", ".join(f"{t:.3g}: {v:.3f}" for t, v in sorted(by.items())) + f"; best {best:.3g}, bound {d['bound']:.3g}"
        out.append({"target": TARGET_ROPE, "status": "held" if best >= d["bound"] else "did not hold", "detail": detail})
    else:
        out.append({"target": TARGET_ROPE, "status": "not run", "detail": "part d not run"})
    return out


# ----------------------------------------------------------------------------------------------- running
def _train_trial(cfg: JobConfig, root: str, name: str, data_uri: str, specs_fn,
                 eval_cfg: JobConfig | None = None) -> dict:
    """Train one trial and evaluate it (with `specs_fn(final_model_uri)` models, under `eval_cfg`, default `cfg`);
    writes the trial's config.yaml, eval/metrics.json and train_summary.json, and returns that summary."""
    from longctx.eval.runner import evaluate_models
    from longctx.train.trainer import run_training

    trial = storage.join(root, "trials", name)
    storage.write_text(storage.join(trial, "config.yaml"), dump_config(cfg))
    t0 = time.time()
    out = run_training(cfg, data_uri, trial)
    evaluate_models(eval_cfg or cfg, specs_fn(out.final_model_uri), storage.join(trial, "eval"))
    summary = {"steps": out.steps, "tokens": out.tokens, "final_loss": out.final_loss,
               "final_model": out.final_model_uri, "seconds": round(time.time() - t0, 1)}
    storage.write_json(storage.join(trial, "train_summary.json"), summary)
    return summary


def _long_sft(base: JobConfig, root: str, long_pt_model: str, sft_steps: int, base_len: int, pk_len: int) -> dict:
    """Part c: synthetic retrieval + SynL table conversations (between the base length and the training length),
    a Long-SFT run of `sft_steps` from `long_pt_model`, and passkey + needle at `pk_len` before and after it.
    Returns what the SFT data holds (for the report)."""
    from longctx.data.pipeline import load_manifest
    from longctx.data.synthetic import synth_retrieval, synth_tables
    from longctx.eval.runner import ModelSpec
    from longctx.train.sft_data import prepare_sft_data

    seq_len = base.data.seq_len
    rows = sft_steps * max(1, base.train.global_batch_tokens // seq_len)
    synth_out = storage.join(root, "synth")
    s_cfg = _cfg(base, **{
        "synth.output": synth_out, "synth.seed": base.train.seed,
        # about two conversations per packed row (lengths spread over [base, seq_len]), retrieval twice the tables
        "synth.retrieval.num_samples": max(4, 2 * rows), "synth.retrieval.min_tokens": base_len,
        "synth.retrieval.max_tokens": seq_len, "synth.retrieval.haystack_max_chars": 2_000_000,
        "synth.tables.num_samples": max(2, rows), "synth.tables.min_tokens": base_len,
        "synth.tables.max_tokens": seq_len})
    sets = {}
    for kind, fn in (("retrieval", synth_retrieval), ("tables", synth_tables)):
        uri = storage.join(synth_out, kind)
        if storage.is_committed(uri):
            sets[kind] = load_manifest(uri)
        else:
            sets[kind] = fn(s_cfg)
    sft_cfg = _cfg(s_cfg, **{
        "model.path": long_pt_model, "train.max_steps": sft_steps, "train.epochs": 2, "train.checkpoint_every": 0,
        "train.lr": base.train.lr / 2,  # Index: Long-SFT at half the Long-PT learning rate
        "data.sources": {"retrieval": storage.join(synth_out, "retrieval", "part-*.jsonl"),
                         "synl": storage.join(synth_out, "tables", "part-*.jsonl")},
        "data.sft.mix": {"retrieval": 2 / 3, "synl": 1 / 3}, "data.token_budget": None})
    data_uri = storage.join(root, "data", "long-sft")
    manifest = load_manifest(data_uri) if storage.is_committed(data_uri) else prepare_sft_data(sft_cfg, data_uri)
    e_cfg = _cfg(base, **{"eval.passkey.lengths": [pk_len], "eval.needle.enabled": True,
                          "eval.needle.lengths": [pk_len], "eval.perplexity": False, "eval.baselines": []})
    out = _train_trial(sft_cfg, root, "c-long-sft", data_uri,
                       lambda final: {"Long-PT": ModelSpec(long_pt_model, role="long_pt"),
                                      "Long-PT + long-SFT": ModelSpec(final, role="long_sft")}, eval_cfg=e_cfg)
    totals = manifest.get("totals", {})
    return {"conversations": manifest.get("conversations"), "rows": totals.get("rows"),
            "loss_tokens": totals.get("loss_tokens"), "steps": out["steps"], "final_loss": out["final_loss"],
            "samples": {k: v.get("totals", {}).get("samples", v.get("totals", {}).get("records"))
                        for k, v in sets.items()}}


def _heldout_by_source(cfg: JobConfig, root: str, sources: list[str]) -> dict[str, str]:
    """Per-source held-out files (eval.documents split on its `source` field)."""
    import gzip

    raw = storage.read_bytes(cfg.eval.documents)
    text = gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode()
    out = {}
    for src in sources:
        lines = [ln for ln in text.splitlines() if ln.strip() and json.loads(ln).get("source") == src]
        if not lines:
            raise ValueError(f"{cfg.eval.documents}: no held-out document of source {src!r} (records need a 'source' field)")
        uri = storage.join(root, "heldout", f"{src}.jsonl")
        storage.write_text(uri, "\n".join(lines) + "\n")
        out[src] = uri
    return out


def run_study(cfg: JobConfig, out_dir: str, *, steps: int = 40, parts: str = "abcde",
              rope_factors: tuple[float, ...] = (0.1, 1.0, 10.0), corpus_max_documents: int | None = None,
              eval_documents: int | None = None, sft_steps: int | None = None) -> dict:
    """Run the study's parts into `out_dir`; returns {"verdicts", "numbers", "report"}. Part c trains
    `sft_steps` Long-SFT steps (default: half of `steps`, at least 1) from part a's model."""
    from longctx.data.pipeline import prepare_data
    from longctx.data.synthetic.longtail import build_long_tailed_corpus
    from longctx.eval.runner import ModelSpec, default_model_specs, eval_lengths
    from longctx.eval.runner import evaluate_models
    from longctx.model.rope import suggest_rope_base
    from longctx.train.trainer import run_training
    from longctx.workflow import connect_ray, setup_logging

    setup_logging()
    storage.configure(cfg.storage)
    connect_ray(cfg)
    root = storage.normalize(out_dir)
    t_start = time.time()
    context, base_len = eval_lengths(cfg, cfg.model.path)
    pk_len = 4 * base_len
    common = {"train.max_steps": steps, "train.checkpoint_every": 0, "eval.context_length": context,
              "eval.base_context_length": base_len, "eval.passkey.lengths": [pk_len],
              "eval.scaling_factor": context / base_len}
    if eval_documents:
        common["eval.num_documents"] = eval_documents
    base = _cfg(cfg, **common)
    head_dim = _head_dim(cfg.model.path)
    bound = suggest_rope_base(head_dim, base_len, context)["base_lower_bound"]
    plan: dict[str, Any] = {"parts": parts, "steps": steps, "context_length": context, "base_length": base_len,
                            "passkey_length": pk_len, "rope_bound": bound, "seed": cfg.train.seed, "sources": [],
                            "rope_trials": {}, "timings_s": {}}
    storage.write_json(storage.join(root, "plan.json"), plan)
    timings = plan["timings_s"]

    data_uri = None
    if set(parts) & set("acde"):
        t0 = time.time()
        data_uri = storage.join(root, "data", "default")
        if not storage.is_committed(data_uri):
            prepare_data(base, data_uri)
        timings["data_default"] = round(time.time() - t0, 1)
    if "a" in parts or "c" in parts or "e" in parts:
        t0 = time.time()
        a_cfg = _cfg(base, **{"eval.baselines": ["naive", "pi", "dynamic_ntk", "yarn"],
                              "train.checkpoint_every": max(1, steps // 4),
                              "eval.during_training.enabled": "e" in parts,
                              "eval.during_training.passkey_lengths": [pk_len],
                              "eval.during_training.num_documents": min(8, base.eval.num_documents)})
        _train_trial(a_cfg, root, "a-long-pt", data_uri,
                 lambda final: default_model_specs(a_cfg, a_cfg.model.path, final))
        timings["a"] = round(time.time() - t0, 1)
    if "c" in parts:
        t0 = time.time()
        plan["sft_steps"] = sft_steps or max(1, steps // 2)
        plan["c_data"] = _long_sft(base, root, storage.join(root, "trials", "a-long-pt", "train", "final_model"),
                                   plan["sft_steps"], base_len, pk_len)
        timings["c"] = round(time.time() - t0, 1)
    if "b" in parts:
        t0 = time.time()
        corpus = storage.join(root, "corpus")
        stats = build_long_tailed_corpus(corpus, seed=cfg.data.seed, max_documents=corpus_max_documents,
                                         short_max_tokens=base_len)
        plan["corpus"] = stats
        sources = sorted(stats["sources"])
        plan["sources"] = sources
        budget = int(1.25 * steps * base.train.global_batch_tokens)  # every strategy trains `steps` full steps
        finals = {}
        for label, strategy in STRATEGIES.items():
            s_cfg = _cfg(base, **{"data.sources": {s: stats["sources"][s]["uri"] for s in sources},
                                  "data.strategy": strategy, "data.cut_len": base_len, "data.token_budget": budget})
            uri = storage.join(root, "data", label)
            manifest = prepare_data(s_cfg, uri, overwrite=True)
            plan.setdefault("b_data", {})[label] = {
                s: {"long_share_in": v.get("in", {}).get("long_share"), "long_share_out": v.get("out", {}).get("long_share"),
                    "share_out": v.get("out_share")} for s, v in manifest.get("sources", {}).items()}
            out = run_training(s_cfg, uri, storage.join(root, "trials", f"b-{label}"))
            finals[label] = out.final_model_uri
        held = _heldout_by_source(base, root, sources)
        for i, src in enumerate(sources):
            e_cfg = _cfg(base, **{"eval.documents": held[src], "eval.passkey.enabled": i == 0,
                                  "eval.num_documents": min(base.eval.num_documents, 16)})
            specs = {label: ModelSpec(uri, role=label) for label, uri in finals.items()}
            evaluate_models(e_cfg, specs, storage.join(root, "trials", "b-strategies", f"eval-{src}"))
        timings["b"] = round(time.time() - t0, 1)
    if "d" in parts:
        t0 = time.time()
        thetas = {rope_grid_point(bound, f) for f in rope_factors}
        if "a" in parts and cfg.model.rope_theta:
            plan["rope_trials"][f"{cfg.model.rope_theta:g}"] = "a-long-pt"  # part a's run is one point
            thetas.discard(float(cfg.model.rope_theta))
        for theta in sorted(thetas):
            name = f"d-rope-{theta:g}"
            d_cfg = _cfg(base, **{"model.rope_theta": theta})
            _train_trial(d_cfg, root, name, data_uri, lambda final: {"Long-PT": ModelSpec(final, role="trained")})
            plan["rope_trials"][f"{theta:g}"] = name
        timings["d"] = round(time.time() - t0, 1)
    timings["total"] = round(time.time() - t_start, 1)
    storage.write_json(storage.join(root, "plan.json"), plan)
    nums = trial_numbers(root)
    verdict = verdicts(nums)
    storage.write_json(storage.join(root, "study.json"), {"numbers": nums, "verdicts": verdict})
    report = write_study_report(root, nums, verdict)
    print(f"[longctx] study report: {report}", flush=True)
    return {"verdicts": verdict, "numbers": nums, "report": report}


def rope_grid_point(bound: float, factor: float) -> float:
    """bound x factor rounded *up* to 4 significant digits: the point at factor 1 is never below the bound (a
    rounded-down 1.138e5 under a 1.1383e5 bound would fail the sweep's verdict by rounding alone)."""
    x = bound * factor
    e = math.floor(math.log10(x)) - 3
    return float(f"{math.ceil(x / 10 ** e - 1e-9) * 10 ** e:.6g}")


def _head_dim(model_uri: str) -> int:
    from transformers import AutoConfig

    from longctx.model.load import local_model_dir

    c = AutoConfig.from_pretrained(local_model_dir(model_uri))
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


# ------------------------------------------------------------------------------------------------- report
def verdict_lines(verdict: list[dict]) -> list[str]:
    return [f"- **{v['status'].upper()}**: {v['target']} — {v['detail']}" for v in verdict]


def write_study_report(root: str, nums: dict, verdict: list[dict]) -> str:
    """`root/report.md` (+ PNGs): verdicts first, then one table per part."""
    plan = nums["plan"]
    held = sum(v["status"] == "held" for v in verdict)
    failed = sum(v["status"] == "did not hold" for v in verdict)
    lines = ["# longctx study: the papers' orderings at toy scale",
             "", f"{held} held, {failed} did not hold, {len(verdict) - held - failed} not run "
             f"({plan['steps']} training steps per trial, base length {plan['base_length']}, evaluated at "
             f"{plan['context_length']} tokens, passkey at {plan['passkey_length']}).", "", *verdict_lines(verdict), ""]
    png = plot_study(nums)
    if png:
        storage.write_bytes(storage.join(root, STUDY_PLOT), png)
        lines += [f"![the study's numbers, one panel per part]({STUDY_PLOT})", ""]
    if "a" in nums:
        lines += ["## a. Training-free baselines vs Long-PT", "",
                  "| model | NLL within base | NLL beyond base | passkey at 4x |", "|---|---:|---:|---:|"]
        for name, v in nums["a"].items():
            lines.append(f"| {name} | {_f(v['nll_within_base'])} | {_f(v['nll_beyond_base'])} | {_pct(v['passkey_4x'])} |")
        lines.append("")
    if "b" in nums:
        srcs = plan["sources"]
        lines += ["## b. Data strategies on the long-tailed corpus (same token budget)", "",
                  "| strategy | " + " | ".join(f"NLL beyond base: {s}" for s in srcs) + " | mean | passkey at 4x |",
                  "|---|" + "---:|" * (len(srcs) + 2)]
        for name, v in nums["b"].items():
            lines.append(f"| {name} | " + " | ".join(_f(v["nll_beyond_base_by_source"].get(s)) for s in srcs)
                         + f" | {_f(v['nll_beyond_base_mean'])} | {_pct(v['passkey_4x'])} |")
        lines += ["", "Long-token share per source, in -> out (how much each strategy upsampled):", "",
                  "| strategy | " + " | ".join(srcs) + " |", "|---|" + "---:|" * len(srcs)]
        for label, per in plan.get("b_data", {}).items():
            lines.append(f"| {label} | " + " | ".join(
                f"{_pct(per.get(s, {}).get('long_share_in'))} -> {_pct(per.get(s, {}).get('long_share_out'))}" for s in srcs) + " |")
        lines.append("")
    if "c" in nums:
        cd = plan.get("c_data", {})
        lines += ["## c. Long-PT, then a short synthetic long-SFT stage (LongSkywork)", "",
                  f"{cd.get('steps')} Long-SFT steps from part a's model on {cd.get('rows')} packed rows of synthetic "
                  f"retrieval and table conversations (final loss {_f(cd.get('final_loss'))}).", "",
                  "| model | passkey at 4x | pass key NLL at 4x (teacher-forced, nats/token) "
                  "| needle at 4x (NeedleBench score, 0-100) |", "|---|---:|---:|---:|"]
        for name, v in nums["c"].items():
            lines.append(f"| {name} | {_pct(v['passkey_4x'])} | {_f(v.get('passkey_key_nll_4x'))} "
                         f"| {_score(v['needle_4x'])} |")
        lines += ["", "The needle score gives 100 when the needle's keyword is in the answer and otherwise 0.2 x the "
                  "string similarity to the reference (so a few points without any retrieval).", ""]
        lines.append("")
    if "d" in nums:
        lines += [f"## d. RoPE base sweep (rope suggest bound {nums['d']['bound']:.4g})", "",
                  "| rope_theta | NLL beyond base |", "|---:|---:|"]
        for t, v in sorted(nums["d"]["nll_beyond_base_by_theta"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {float(t):.4g} | {_f(v)} |")
        lines.append("")
    if "e" in nums:
        lines += ["## e. Retrieval and NLL beyond base vs tokens trained (part a's run, every checkpoint)", ""]
        if nums["e"]:
            lines += ["![retrieval and NLL beyond base vs tokens trained](trials/a-long-pt/train/checkpoint_eval.png)", "",
                      "| step | tokens trained | passkey at 4x | NLL beyond base |", "|---:|---:|---:|---:|"]
            lines += [f"| {r['step']} | {r['tokens']:,} | {_pct(r['passkey_4x'])} | {_f(r['nll_beyond_base'])} |" for r in nums["e"]]
        else:
            lines.append("No checkpoint evaluation was recorded.")
        lines.append("")
    lines += ["Timings (s): " + ", ".join(f"{k} {v}" for k, v in plan.get("timings_s", {}).items()), "",
              "Numbers: `study.json` (recomputable from `trials/*/eval/metrics.json` with `longctx.study.trial_numbers`)."]
    uri = storage.join(root, "report.md")
    storage.write_text(uri, "\n".join(lines) + "\n")
    return uri


STUDY_PLOT = "study.png"


def plot_study(nums: dict) -> bytes | None:
    """PNG, one panel per part run (a, b, c, d): NLL beyond the base length of every model (a), per source and
    strategy (b), the pass key's NLL before/after long-SFT (c), against the RoPE base with the bound (d)."""
    from longctx.report.plots import _STYLE, _png, plt

    panels = [k for k in ("a", "b", "c", "d") if nums.get(k)]
    if not panels:
        return None
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
        for ax, part in zip(axes[0], panels):
            if part == "a":
                names = list(nums["a"])
                vals = [nums["a"][n]["nll_beyond_base"] for n in names]
                ax.bar(range(len(names)), [v if _finite(v) else 0 for v in vals],
                       color=["tab:green" if nums["a"][n]["role"] == "trained" else "tab:gray" for n in names])
                ax.set_xticks(range(len(names)), [n.replace("base + ", "") for n in names], rotation=30, ha="right")
                lo = min(v for v in vals if _finite(v)) if any(_finite(v) for v in vals) else 0
                ax.set_ylim(max(0.0, lo - 0.5), None)
                ax.set_title("a. baselines vs Long-PT")
                ax.set_ylabel("NLL beyond base (nats)")
            elif part == "b":  # per source, against cut-at-base (the sources' NLLs differ by ~2 nats)
                ref = (nums["b"].get("cut-at-base") or {}).get("nll_beyond_base_by_source", {})
                strategies = [st for st in nums["b"] if st != "cut-at-base"]
                sources = sorted({s for v in nums["b"].values() for s in v["nll_beyond_base_by_source"]})
                width = 0.8 / max(1, len(strategies))
                for i, st in enumerate(strategies):
                    per = nums["b"][st]["nll_beyond_base_by_source"]
                    ax.bar([j + i * width for j in range(len(sources))],
                           [per[s] - ref[s] if _finite(per.get(s)) and _finite(ref.get(s)) else 0 for s in sources],
                           width, label=st)
                ax.axhline(0, color="black", lw=0.8)
                ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sources))], sources)
                ax.legend(fontsize=7)
                ax.set_title("b. data strategies vs cut at base length")
                ax.set_ylabel("NLL beyond base minus cut-at-base (nats)")
            elif part == "c":
                names = list(nums["c"])
                vals = [nums["c"][n].get("passkey_key_nll_4x") for n in names]
                ax.bar(range(len(names)), [v if _finite(v) else 0 for v in vals], color="tab:purple")
                ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
                for j, n in enumerate(names):
                    ax.annotate(f"passkey {_pct(nums['c'][n]['passkey_4x'])}", (j, 0), xytext=(0, 4),
                                textcoords="offset points", ha="center", fontsize=8, color="white")
                ax.set_title("c. Long-PT, then long-SFT")
                ax.set_ylabel("pass key NLL at 4x (nats/token)")
            else:
                pts = sorted((float(t), v) for t, v in nums["d"]["nll_beyond_base_by_theta"].items() if _finite(v))
                if pts:
                    ax.plot(*zip(*pts), "o-")
                ax.axvline(nums["d"]["bound"], color="tab:red", ls="--", label="rope suggest bound")
                ax.set_xscale("log")
                ax.legend(fontsize=7)
                ax.set_title("d. RoPE base sweep")
                ax.set_xlabel("rope_theta")
                ax.set_ylabel("NLL beyond base (nats)")
        fig.tight_layout()
        return _png(fig)


def _f(v) -> str:
    return "n/a" if v is None or not _finite(v) else f"{v:.3f}"


def _score(v) -> str:
    return "n/a" if v is None else f"{v:.1f}/100"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


# -------------------------------------------------------------------------------------------------- command
def add_study_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The study's command-line options (`jobs/study.py` and `longctx study`)."""
    p.add_argument("--config", default=EMBEDDED_DEFAULT, help="base job config (default: the embedded tiny recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every trial (repeatable)")
    p.add_argument("--output", default="runs/study", help="study folder (local or s3://)")
    p.add_argument("--steps", type=int, default=10, help="training steps per trial (default 10: every part in "
                   "about 15 minutes on 2 CPU cores)")
    p.add_argument("--parts", default="abcde", help="parts to run: a (baselines vs Long-PT), b (data strategies), "
                   "c (Long-PT + synthetic long-SFT, from part a's model), d (RoPE base sweep), e (retrieval vs "
                   "tokens trained, from part a's run)")
    p.add_argument("--sft-steps", type=int, default=None, help="part c: Long-SFT steps (default: twice --steps)")
    p.add_argument("--rope-factors", default="0.1,1,10", help="RoPE bases of part d as multiples of the "
                   "`rope suggest` bound (part a's rope_theta is one more point)")
    p.add_argument("--corpus-max-documents", type=int, default=200,
                   help="part b: read only the first N documents per source of the shipped corpus (default 200; "
                   "0: all of it)")
    p.add_argument("--eval-documents", type=int, default=8, help="held-out documents per evaluation (default 8; "
                   "0: the config's eval.num_documents)")
    return p


def run_from_args(args) -> int:
    """Run the study from parsed `add_study_args` options; 2 on a usage error."""
    from longctx.config import ConfigError, load_config

    bad = set(args.parts) - set("abcde")
    if bad or args.steps < 1 or (args.sft_steps is not None and args.sft_steps < 1) or args.eval_documents < 0 \
            or args.corpus_max_documents < 0:
        print(f"study: --parts takes letters from 'abcde' (got {args.parts!r}); --steps and --sft-steps >= 1; "
              "--eval-documents and --corpus-max-documents >= 0",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        factors = tuple(float(x) for x in args.rope_factors.split(",") if x.strip())
    except (ConfigError, ValueError) as e:
        print(f"study: {e}", file=sys.stderr)
        return 2
    out = run_study(cfg, args.output, steps=args.steps, parts=args.parts, rope_factors=factors,
                    corpus_max_documents=args.corpus_max_documents or None, eval_documents=args.eval_documents or None,
                    sft_steps=args.sft_steps or 2 * args.steps)
    for v in out["verdicts"]:
        print(f"[study] {v['status'].upper()}: {v['target']} -- {v['detail']}")
    print(out["report"])
    return 0
